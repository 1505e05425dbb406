"""ActionHead: the policy's L1-regression MLP (OpenVLA-OFT style) reading the action placeholder hidden states."""

from __future__ import annotations

from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel

from vla_energy.checks import check_tensor

__all__ = ["ActionHeadConfig", "ActionHead"]


class ActionHeadConfig(PretrainedConfig):
    """Sizes of the action head: H placeholder states of the backbone's width in, an H x Da chunk out."""

    model_type = "vla_action_head"

    def __init__(
        self,
        hidden_size: int = 256,
        action_dim: int = 7,
        horizon: int = 8,
        mlp_dim: int = 512,
        num_blocks: int = 2,
        initializer_range: float = 0.02,
        **kwargs,
    ) -> None:
        for name, value in (("hidden_size", hidden_size), ("action_dim", action_dim), ("horizon", horizon),
                            ("mlp_dim", mlp_dim)):
            if int(value) < 1:
                raise ValueError(f"{name}={value}, expected a positive integer")
        self.hidden_size = int(hidden_size)
        self.action_dim = int(action_dim)
        self.horizon = int(horizon)
        self.mlp_dim = int(mlp_dim)
        self.num_blocks = int(num_blocks)
        self.initializer_range = float(initializer_range)
        super().__init__(**kwargs)


class _ResidualMLP(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear with a residual connection."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.net(x)


class ActionHead(PreTrainedModel):
    """Maps the hidden states at the H action placeholders [..., H, D] to an action chunk [..., H, Da].

    The H placeholder states are read jointly (flattened to H*D), as OpenVLA-OFT's L1 head reads all action
    tokens: identical placeholder tokens at adjacent positions have similar states, so a per-token head could not
    give different steps different actions.
    """

    config_class = ActionHeadConfig
    base_model_prefix = "action_head"
    main_input_name = "hidden"

    def __init__(self, config: ActionHeadConfig) -> None:
        super().__init__(config)
        flat = config.horizon * config.hidden_size
        self.inp = nn.Sequential(nn.LayerNorm(flat), nn.Linear(flat, config.mlp_dim))
        self.blocks = nn.Sequential(*(_ResidualMLP(config.mlp_dim) for _ in range(config.num_blocks)))
        self.out = nn.Sequential(nn.LayerNorm(config.mlp_dim), nn.Linear(config.mlp_dim,
                                                                         config.horizon * config.action_dim))
        self.post_init()

    def forward(self, hidden: Tensor) -> Tensor:
        """hidden [..., H, D] (any leading dims, e.g. [L, B, H, D] for every layer at once) -> [..., H, Da]."""
        cfg = self.config
        if hidden.dim() < 2 or tuple(hidden.shape[-2:]) != (cfg.horizon, cfg.hidden_size):
            check_tensor("hidden", hidden, ("B", "H", "D"), H=cfg.horizon, D=cfg.hidden_size)
        flat = hidden.to(self.dtype).reshape(*hidden.shape[:-2], cfg.horizon * cfg.hidden_size)
        return self.out(self.blocks(self.inp(flat))).view(*hidden.shape[:-2], cfg.horizon, cfg.action_dim)


# Known to the Auto classes: AutoConfig / AutoModel.from_pretrained(<action_head dir>) once vla_energy.modeling is
# imported.
AutoConfig.register(ActionHeadConfig.model_type, ActionHeadConfig, exist_ok=True)
AutoModel.register(ActionHeadConfig, ActionHead, exist_ok=True)
