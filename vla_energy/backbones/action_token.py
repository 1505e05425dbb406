"""The action placeholder and state tokens: added to a real HF tokenizer as special tokens, embeddings grown to fit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["add_action_token", "add_state_token", "check_action_token"]


def check_action_token(tokenizer: Any, token: str, token_id: int) -> None:
    """Raise unless the tokenizer turns every `token` in a text into exactly one id, `token_id`."""
    ids = tokenizer("go" + token + token + "go", add_special_tokens=False)["input_ids"]
    if ids.count(token_id) != 2:
        pieces = tokenizer.convert_ids_to_tokens(tokenizer(token, add_special_tokens=False)["input_ids"])
        raise ValueError(
            f"action_token={token!r}: {type(tokenizer).__name__} splits it into {pieces} instead of keeping id "
            f"{token_id}; add it as a special token (vla_energy.backbones.action_token.add_action_token) or choose "
            "an action_token the tokenizer keeps whole"
        )


def add_action_token(processor: Any, model: nn.Module, token: str = "<|action|>") -> int:
    """Add the action placeholder as a special token of a real HF processor and resize the embeddings."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
        # Many checkpoints pad the embedding matrix past the tokenizer (e.g. to a multiple of 128): grow, never shrink.
        old_rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > old_rows:
            model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            # A new row at the mean of the others, not a random draw: the same weights in every process and on
            # every rebuild, so that a resumed run or a checkpoint loaded as a policy sees the same token.
            out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
            with torch.no_grad():
                for module in (model.get_input_embeddings(), out):
                    if module is not None and module.weight.shape[0] == len(tokenizer):
                        weight = module.weight
                        weight[old_rows:] = weight[:old_rows].float().mean(dim=0).to(weight.dtype)
    token_id = int(tokenizer.convert_tokens_to_ids(token))
    check_action_token(tokenizer, token, token_id)
    return token_id


def add_state_token(processor: Any, model: nn.Module, token: str = "<|state|>") -> int:
    """Add the proprioceptive state token (its embedding is the state projector's output) like the action token."""
    return add_action_token(processor, model, token)
