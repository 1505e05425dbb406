"""FlowActionHead: a stochastic action head trained by flow matching (as the action experts of pi0 and SmolVLA).

It reads the H action-placeholder hidden states jointly, like ActionHead, and predicts the velocity of a noisy chunk
x_t = t * noise + (1 - t) * actions at time t in (0, 1]; the target velocity is noise - actions. Sampling integrates
from pure noise (t = 1) to t = 0 with `flow_steps` Euler steps. The placeholder states are encoded once into a
condition vector; N samples are a batch dimension of the small velocity network, never a re-run of the backbone.

`forward(hidden)` is the head's deterministic chunk: the sample from one fixed noise chunk (drawn from `noise_seed`,
shared by every row and call), so the policy is a function of the observation alone.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from vla_energy.checks import check_tensor
from vla_energy.modeling.action_head import ActionHeadConfig, _ResidualMLP

__all__ = ["FlowActionHeadConfig", "FlowActionHead", "TIME_SAMPLINGS"]

# beta: t = 0.001 + 0.999 * Beta(1.5, 1), more weight on the noisier times (pi0, SmolVLA); uniform: U(0.001, 1).
TIME_SAMPLINGS = ("beta", "uniform")
_T_MIN = 1e-3
_BETA_ALPHA = 1.5


class FlowActionHeadConfig(ActionHeadConfig):
    """The action head's sizes (H placeholder states of the backbone's width in, an H x Da chunk out) and the flow's
    sampling options."""

    model_type = "vla_flow_action_head"

    def __init__(
        self,
        hidden_size: int = 256,
        action_dim: int = 7,
        horizon: int = 8,
        mlp_dim: int = 512,
        num_blocks: int = 2,
        flow_steps: int = 10,
        time_sampling: str = "beta",
        noise_seed: int = 0,
        min_period: float = 4e-3,
        max_period: float = 4.0,
        initializer_range: float = 0.02,
        **kwargs,
    ) -> None:
        if int(flow_steps) < 1:
            raise ValueError(f"flow_steps={flow_steps}, expected a positive integer")
        if int(mlp_dim) % 2:
            raise ValueError(f"mlp_dim={mlp_dim}, expected an even width (the sinusoidal time embedding halves it)")
        if time_sampling not in TIME_SAMPLINGS:
            raise ValueError(f"time_sampling={time_sampling!r}, expected one of {TIME_SAMPLINGS}")
        if not 0 < min_period < max_period:
            raise ValueError(f"min_period={min_period}, max_period={max_period}: expected 0 < min_period < max_period")
        self.flow_steps = int(flow_steps)
        self.time_sampling = time_sampling
        self.noise_seed = int(noise_seed)
        self.min_period = float(min_period)
        self.max_period = float(max_period)
        super().__init__(hidden_size, action_dim, horizon, mlp_dim, num_blocks, initializer_range, **kwargs)


def sample_time(shape: tuple[int, ...], sampling: str, generator: Optional[torch.Generator] = None,
                device: Optional[torch.device] = None) -> Tensor:
    """Flow-matching times in [0.001, 1] of `shape` (float32): beta = 0.001 + 0.999 * Beta(1.5, 1) | uniform."""
    if sampling not in TIME_SAMPLINGS:
        raise ValueError(f"time sampling {sampling!r}, expected one of {TIME_SAMPLINGS}")
    u = torch.rand(shape, generator=generator, device=device)
    # Beta(a, 1) has CDF x^a: inverse-CDF sampling draws it from the seeded generator (torch's Beta takes none).
    x = u.pow(1.0 / _BETA_ALPHA) if sampling == "beta" else u
    return _T_MIN + (1.0 - _T_MIN) * x


class FlowActionHead(PreTrainedModel):
    """Velocity field v(x_t, t | placeholder states [..., H, D]) over action chunks [..., H, Da], and its sampler."""

    config_class = FlowActionHeadConfig
    base_model_prefix = "action_head"
    main_input_name = "hidden"

    def __init__(self, config: FlowActionHeadConfig) -> None:
        super().__init__(config)
        flat, chunk, width = config.horizon * config.hidden_size, config.horizon * config.action_dim, config.mlp_dim
        self.cond = nn.Sequential(nn.LayerNorm(flat), nn.Linear(flat, width))
        self.x_in = nn.Linear(chunk, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.Sequential(*(_ResidualMLP(width) for _ in range(config.num_blocks)))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, chunk))
        self.post_init()

    def time_frequencies(self, device: torch.device) -> Tensor:
        """Angular frequencies [C/2] of the sinusoidal time embedding, periods from min_period to max_period."""
        cfg = self.config
        fraction = torch.linspace(0.0, 1.0, cfg.mlp_dim // 2, dtype=torch.float64, device=device)
        return (2 * math.pi / (cfg.min_period * (cfg.max_period / cfg.min_period) ** fraction)).float()

    def policy_noise(self, device: torch.device) -> Tensor:
        """The fixed noise chunk [H, Da] of the deterministic sample, drawn from noise_seed on the CPU (so every
        device gets the same numbers)."""
        cfg = self.config
        return torch.randn(cfg.horizon, cfg.action_dim,
                           generator=torch.Generator().manual_seed(cfg.noise_seed)).to(device)

    # The pieces ---------------------------------------------------------------------------------------------------

    def condition(self, hidden: Tensor) -> Tensor:
        """hidden [..., H, D] (any leading dims) -> the condition vector [..., C], computed once per context."""
        cfg = self.config
        if hidden.dim() < 2 or tuple(hidden.shape[-2:]) != (cfg.horizon, cfg.hidden_size):
            check_tensor("hidden", hidden, ("B", "H", "D"), H=cfg.horizon, D=cfg.hidden_size)
        return self.cond(hidden.to(self.dtype).reshape(*hidden.shape[:-2], cfg.horizon * cfg.hidden_size))

    def velocity(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Predicted velocity [..., H, Da] of noisy chunks x [..., H, Da] at times t [...] under cond [..., C]."""
        cfg = self.config
        angles = t.float()[..., None] * self.time_frequencies(t.device)
        t_emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=-1).to(self.dtype))
        h = self.x_in(x.to(self.dtype).reshape(*x.shape[:-2], cfg.horizon * cfg.action_dim)) + cond + t_emb
        return self.out(self.blocks(h)).view(*x.shape[:-2], cfg.horizon, cfg.action_dim)

    def integrate(self, cond: Tensor, noise: Tensor, steps: Optional[int] = None) -> Tensor:
        """Euler integration of dx/dt = v from x = noise [..., H, Da] at t = 1 to t = 0 (float32 state)."""
        steps = self.config.flow_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps={steps}, expected >= 1 Euler steps")
        x = noise.float()
        for i in range(steps):
            t = torch.full(x.shape[:-2], 1.0 - i / steps, device=x.device)
            x = x - self.velocity(x, t, cond).float() / steps
        return x

    # What the plugin calls ----------------------------------------------------------------------------------------

    def forward(self, hidden: Tensor, actions: Optional[Tensor] = None, *, generator: Optional[torch.Generator] = None,
                noise: Optional[Tensor] = None, time: Optional[Tensor] = None) -> Tensor:
        """Without actions: hidden [..., H, D] (e.g. [L, B, H, D], every layer at once) -> the deterministic chunk
        [..., H, Da], the sample from the fixed noise chunk (noise_seed), in the head's dtype. With actions [B, H, Da]:
        flow_loss's per-element errors [B, H, Da] (through forward, so that a wrapped head sees the call)."""
        if actions is not None:
            return self.flow_loss(hidden, actions, generator, noise, time)
        cond = self.condition(hidden)
        noise = self.policy_noise(cond.device).expand(*cond.shape[:-1], self.config.horizon, self.config.action_dim)
        return self.integrate(cond, noise).to(self.dtype)

    def sample(self, hidden: Tensor, num_samples: int, generator: Optional[torch.Generator] = None,
               steps: Optional[int] = None) -> Tensor:
        """[..., N, H, Da]: N chunks integrated from independent N(0, 1) noise drawn from `generator`, the condition
        computed once and shared by the N samples."""
        if int(num_samples) < 1:
            raise ValueError(f"num_samples={num_samples}, expected >= 1")
        cond = self.condition(hidden)
        shape = (*cond.shape[:-1], int(num_samples), self.config.horizon, self.config.action_dim)
        noise = torch.randn(shape, generator=generator, device=cond.device)
        return self.integrate(cond[..., None, :], noise, steps).to(self.dtype)

    def flow_loss(self, hidden: Tensor, actions: Tensor, generator: Optional[torch.Generator] = None,
                  noise: Optional[Tensor] = None, time: Optional[Tensor] = None) -> Tensor:
        """Per-element squared error [B, H, Da] of the velocity at x_t = t * noise + (1 - t) * actions against
        noise - actions; noise ~ N(0, 1) and t (time_sampling) drawn from `generator` unless given."""
        cfg = self.config
        check_tensor("hidden", hidden, ("B", "H", "D"), H=cfg.horizon, D=cfg.hidden_size)
        check_tensor("actions", actions, ("B", "H", "Da"), B=hidden.shape[0], H=cfg.horizon, Da=cfg.action_dim)
        actions = actions.float()
        if noise is None:
            noise = torch.randn(actions.shape, generator=generator, device=actions.device)
        if time is None:
            time = sample_time((actions.shape[0],), cfg.time_sampling, generator, actions.device)
        check_tensor("noise", noise, ("B", "H", "Da"), B=actions.shape[0], H=cfg.horizon, Da=cfg.action_dim)
        check_tensor("time", time, ("B",), B=actions.shape[0])
        tt = time.float()[:, None, None]
        x_t = tt * noise + (1 - tt) * actions
        v = self.velocity(x_t, time, self.condition(hidden)).float()
        return (v - (noise - actions)).square()


# Known to the Auto classes, as ActionHead is.
AutoConfig.register(FlowActionHeadConfig.model_type, FlowActionHeadConfig, exist_ok=True)
AutoModel.register(FlowActionHeadConfig, FlowActionHead, exist_ok=True)
