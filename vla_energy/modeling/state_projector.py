"""StateProjector: the proprioceptive state [B, Ds] -> the embedding of the state token (OpenVLA-OFT's proprio
projector), and the hook that puts it into the backbone's input embeddings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

__all__ = ["StateProjectorConfig", "StateProjector", "inject_state_embedding"]


class StateProjectorConfig(PretrainedConfig):
    """Sizes of the state projector: a Ds state in, one embedding of the backbone's width out."""

    model_type = "vla_state_projector"

    def __init__(self, state_dim: int = 8, hidden_size: int = 256, initializer_range: float = 0.02,
                 **kwargs: Any) -> None:
        for name, value in (("state_dim", state_dim), ("hidden_size", hidden_size)):
            if int(value) < 1:
                raise ValueError(f"{name}={value}, expected a positive integer")
        self.state_dim = int(state_dim)
        self.hidden_size = int(hidden_size)
        self.initializer_range = float(initializer_range)
        super().__init__(**kwargs)


class StateProjector(PreTrainedModel):
    """Linear -> GELU -> Linear from the state [B, Ds] to one token embedding [B, D] (OpenVLA-OFT ProprioProjector)."""

    config_class = StateProjectorConfig
    base_model_prefix = "state_projector"
    main_input_name = "state"

    def __init__(self, config: StateProjectorConfig) -> None:
        super().__init__(config)
        self.fc1 = nn.Linear(config.state_dim, config.hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.hidden_size, config.hidden_size)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            nn.init.zeros_(module.bias)

    def forward(self, state: Tensor) -> Tensor:
        """state [B, Ds] -> [B, D]."""
        ds = self.config.state_dim
        if state.dim() != 2 or state.shape[1] != ds:
            raise ValueError(f"state has shape {tuple(state.shape)}, expected (B, Ds={ds}): the state projector was "
                             f"built for {ds}-dimensional states")
        return self.fc2(self.act(self.fc1(state.to(self.dtype))))


AutoConfig.register(StateProjectorConfig.model_type, StateProjectorConfig, exist_ok=True)
AutoModel.register(StateProjectorConfig, StateProjector, exist_ok=True)


@contextmanager
def inject_state_embedding(backbone: nn.Module, token_id: int, embedding: Optional[Tensor]) -> Iterator[None]:
    """Within: the input embedding at the state token (one per row) is `embedding` [B, D] instead of its table row.

    A forward hook on backbone.get_input_embeddings(): the lookup of input_ids is where every family (LLaVA,
    PaliGemma, Idefics3, Qwen-VL, Prismatic) starts, before image features are merged at the image tokens, so the
    state token survives the merge. `embedding` None: nothing changes.
    """
    if embedding is None:
        yield
        return
    if embedding.dim() != 2:
        raise ValueError(f"state embedding has shape {tuple(embedding.shape)}, expected (B, D)")

    def hook(module: nn.Module, args: tuple, output: Tensor) -> Optional[Tensor]:
        ids = args[0] if args else None
        # Other lookups (e.g. of a single special id) have no rows to replace.
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape[0] != embedding.shape[0]:
            return None
        is_state = ids == token_id
        counts = is_state.sum(dim=1)
        if bool((counts != 1).any()):
            raise ValueError(f"input_ids rows hold {counts.tolist()} state tokens (id {token_id}), expected one per "
                             "row: build the batch with VLACollator(state_token=...) and a `state` per example")
        if output.shape[-1] != embedding.shape[-1]:
            raise ValueError(f"state embedding has width {embedding.shape[-1]}, the backbone's embeddings "
                             f"{output.shape[-1]}")
        return torch.where(is_state[..., None], embedding[:, None, :].to(output.dtype), output)

    handle = backbone.get_input_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
