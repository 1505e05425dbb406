"""The action placeholder token: added to a real HF tokenizer as a special token, embeddings grown to fit."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["add_action_token"]


def add_action_token(processor: Any, model: nn.Module, token: str = "<|action|>") -> int:
    """Add the action placeholder as a special token of a real HF processor and resize the embeddings."""
    tokenizer = getattr(processor, "tokenizer", processor)
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token], special_tokens=True)
        # Many checkpoints pad the embedding matrix past the tokenizer (e.g. to a multiple of 128): grow, never shrink.
        if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))
    return int(tokenizer.convert_tokens_to_ids(token))
