"""EnergyHead: E(context, action chunk), candidates as queries of one cross-attention over the context."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, PreTrainedModel

from vla_energy.checks import check_mask, check_tensor
from vla_energy.modeling.configuration_energy_head import EnergyHeadConfig

try:  # transformers >= 5: init functions that leave loaded weights alone
    from transformers.initialization import normal_ as _normal
    from transformers.initialization import zeros_ as _zeros
except ImportError:  # transformers 4.x
    from torch.nn.init import normal_ as _normal
    from torch.nn.init import zeros_ as _zeros

__all__ = ["EnergyHeadConfig", "EnergyHead", "EncodedContext"]


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[..., T, d] -> [..., heads, T, d/heads]."""
    *lead, t, d = x.shape
    return x.view(*lead, t, num_heads, d // num_heads).transpose(-3, -2)


def _merge_heads(x: Tensor) -> Tensor:
    """[..., heads, T, dh] -> [..., T, heads*dh]."""
    *lead, h, t, dh = x.shape
    return x.transpose(-3, -2).reshape(*lead, t, h * dh)


@dataclass
class EncodedContext:
    """A context as the energy head's blocks read it (EnergyHead.encode_context): per-block keys and values."""

    kv: tuple[tuple[Tensor, Tensor], ...]  # per block: keys, values [B, heads, S, d/heads]
    keep: Optional[Tensor]  # [B,1,1,S] True = a real token; None = every token is real
    batch_size: int

    @property
    def device(self) -> torch.device:
        """Where the keys and values are."""
        return self.kv[0][0].device


class EnergyBlock(nn.Module):
    """Pre-LN block: cross-attention to the context, self-attention within one chunk, MLP."""

    def __init__(self, config: EnergyHeadConfig) -> None:
        super().__init__()
        d = config.hidden_dim
        self.num_heads = config.num_heads
        self.dropout = config.dropout
        self.cross_norm = nn.LayerNorm(d)
        self.cross_q = nn.Linear(d, d)
        self.cross_kv = nn.Linear(d, 2 * d)
        self.cross_out = nn.Linear(d, d)
        self.self_norm = nn.LayerNorm(d)
        self.self_qkv = nn.Linear(d, 3 * d)
        self.self_out = nn.Linear(d, d)
        self.mlp_norm = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, config.mlp_ratio * d), nn.GELU(), nn.Linear(config.mlp_ratio * d, d))

    def context_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of the projected context [B,S,d], computed once per context."""
        k, v = self.cross_kv(context).chunk(2, dim=-1)
        return _split_heads(k, self.num_heads), _split_heads(v, self.num_heads)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], context_keep: Tensor, step_keep: Tensor) -> Tensor:
        """x [B,K,H,d] candidate tokens; context_keep [B,1,1,S]; step_keep [B,K,1,1,H] (True = attend)."""
        b, k, h, d = x.shape
        p = self.dropout if self.training else 0.0
        # All K*H candidate tokens are queries of one attention call: the context is never copied per candidate.
        q = _split_heads(self.cross_q(self.cross_norm(x)).reshape(b, k * h, d), self.num_heads)
        att = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=context_keep, dropout_p=p)
        x = x + self.cross_out(_merge_heads(att)).view(b, k, h, d)
        q, key, val = (_split_heads(t, self.num_heads) for t in self.self_qkv(self.self_norm(x)).chunk(3, dim=-1))
        att = F.scaled_dot_product_attention(q, key, val, attn_mask=step_keep, dropout_p=p)
        x = x + self.self_out(_merge_heads(att))
        return x + self.mlp(self.mlp_norm(x))


class EnergyHead(PreTrainedModel):
    """Energy of action chunks given backbone hidden states; low energy = the chunk fits the context."""

    config_class = EnergyHeadConfig
    base_model_prefix = "energy_head"
    main_input_name = "context"

    def __init__(self, config: EnergyHeadConfig) -> None:
        super().__init__(config)
        d = config.hidden_dim
        self.context_proj = nn.Sequential(nn.Linear(config.context_dim, d), nn.LayerNorm(d))
        self.action_embed = nn.Sequential(nn.Linear(config.action_dim, d), nn.GELU(), nn.Linear(d, d))
        self.step_embed = nn.Embedding(config.horizon, d)
        self.blocks = nn.ModuleList(EnergyBlock(config) for _ in range(config.num_layers))
        self.out_norm = nn.LayerNorm(d)
        self.out = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        # A small last layer keeps the initial raw output near 0 (E near 1.1, the sigmoid's steep part): at the
        # trunk's scale it starts saturated and its gradient vanishes (a bounded energy's failure mode); at exactly 0 the
        # trunk gets no gradient on the first steps and a toy task did not learn.
        if module is self.out[-1]:
            _normal(module.weight, std=self.config.initializer_range / self.config.hidden_dim**0.5)
            _zeros(module.bias)

    @property
    def energy_range(self) -> tuple[float, float] | None:
        """(min, max) energy for a bounded activation, None when unbounded."""
        return self.config.energy_range

    def encode_context(self, context: Tensor, context_mask: Optional[Tensor] = None) -> EncodedContext:
        """The context [B,S,D] projected and turned into every block's keys and values, once for any number of calls.

        Pass the result as `context` to forward / score_pool (and rerank / refine): energies are the same as from
        the raw context, without recomputing the projection per call.
        """
        b = self._check_context(context, context_mask)
        ctx = self.context_proj(context.to(self.dtype))
        keep = None if context_mask is None else context_mask.bool()[:, None, None, :]
        return EncodedContext(tuple(block.context_kv(ctx) for block in self.blocks), keep, b)

    def forward(
        self,
        context: Union[Tensor, EncodedContext],
        actions: Optional[Tensor] = None,
        context_mask: Optional[Tensor] = None,
        action_mask: Optional[Tensor] = None,
        pool: Optional[Tensor] = None,
        pool_action_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Energies: actions [B,H,Da] -> [B]; [B,K,H,Da] -> [B,K]; pool [N,H,Da] -> [B,N] (every context x chunk).

        With both `pool` and per-sample `actions` [B,K,H,Da]: [B, N+K], pool columns first, in one forward (one
        DDP/FSDP forward per step even when a loss needs both kinds of candidates). `context`: hidden states [B,S,D]
        or what encode_context made of them (then without context_mask, which it holds).
        """
        if actions is None and pool is None:
            raise ValueError("pass `actions` [B,H,Da] / [B,K,H,Da], `pool` [N,H,Da], or both")
        encoded = self._encoded(context, context_mask)
        if pool is not None:
            pooled = self.score_pool(encoded, pool, pool_action_mask=pool_action_mask)
            if actions is None:
                return pooled
            if actions.dim() != 4:
                raise ValueError(f"actions has shape {tuple(actions.shape)}, expected (B, K, H, Da) with a pool")
            own = self.forward(encoded, actions, action_mask=action_mask)
            return torch.cat([pooled, own], dim=1)
        cfg = self.config
        b, device = encoded.batch_size, encoded.device
        single = actions.dim() == 3
        shape = ("B", "H", "Da") if single else ("B", "K", "H", "Da")
        check_tensor("actions", actions, shape, B=b, H=cfg.horizon, Da=cfg.action_dim, device=device)
        chunks = actions.unsqueeze(1) if single else actions
        if action_mask is not None:
            check_mask("action_mask", action_mask, tuple(actions.shape[:-1]), device=device)
            action_mask = action_mask.unsqueeze(1) if single else action_mask
        energies = self._energies(encoded, self._embed(chunks), action_mask)
        return energies.squeeze(1) if single else energies

    def score_pool(
        self,
        context: Union[Tensor, EncodedContext],
        pool: Tensor,
        context_mask: Optional[Tensor] = None,
        pool_action_mask: Optional[Tensor] = None,
    ) -> Tensor:
        """Energy of every context against every chunk of a shared pool [N,H,Da] -> [B,N]."""
        cfg = self.config
        encoded = self._encoded(context, context_mask)
        b, device = encoded.batch_size, encoded.device
        check_tensor("pool", pool, ("N", "H", "Da"), H=cfg.horizon, Da=cfg.action_dim, device=device)
        n = pool.shape[0]
        if pool_action_mask is not None:
            check_mask("pool_action_mask", pool_action_mask, (n, cfg.horizon), device=device)
            pool_action_mask = pool_action_mask.unsqueeze(0).expand(b, n, cfg.horizon)
        # The pool is embedded once and shared by all B contexts.
        tokens = self._embed(pool.unsqueeze(0)).expand(b, n, cfg.horizon, cfg.hidden_dim)
        return self._energies(encoded, tokens, pool_action_mask)

    def _encoded(self, context: Union[Tensor, EncodedContext], context_mask: Optional[Tensor]) -> EncodedContext:
        """`context` as encode_context returns it (encoded now when it is hidden states)."""
        if not isinstance(context, EncodedContext):
            return self.encode_context(context, context_mask)
        if context_mask is not None:
            raise ValueError("context is already encoded (encode_context), with its mask: pass no context_mask")
        if len(context.kv) != len(self.blocks):
            raise ValueError(f"the encoded context has keys and values of {len(context.kv)} blocks, this head has "
                             f"{len(self.blocks)}: encode it with this head's encode_context")
        return context

    def _check_context(self, context: Tensor, context_mask: Optional[Tensor]) -> int:
        check_tensor("context", context, ("B", "S", "D"), D=self.config.context_dim)
        b, s = context.shape[:2]
        if context_mask is not None:
            check_mask("context_mask", context_mask, (b, s), device=context.device)
            empty = ~context_mask.bool().any(dim=1)
            if bool(empty.any()):
                rows = empty.nonzero().flatten().tolist()
                raise ValueError(f"context_mask rows {rows} have no real token (all zeros); drop those samples")
        return b

    def _embed(self, chunks: Tensor) -> Tensor:
        """Action tokens [..., K, H, d]: action embedding plus a learned position over the H steps."""
        steps = torch.arange(self.config.horizon, device=chunks.device)
        return self.action_embed(chunks.to(self.dtype)) + self.step_embed(steps)

    def _energies(self, encoded: EncodedContext, tokens: Tensor, action_mask: Optional[Tensor]) -> Tensor:
        """Run the blocks on candidate tokens [B,K,H,d] and map the pooled result to energies [B,K] (float32)."""
        b, k, h, _ = tokens.shape
        if action_mask is None:
            step_keep, weights = None, tokens.new_full((b, k, h, 1), 1.0 / h)
        else:
            keep = action_mask.bool()
            if bool((~keep.any(dim=-1)).any()):
                raise ValueError("action_mask has a chunk with no real step (all zeros)")
            step_keep = keep[:, :, None, None, :]
            weights = keep.to(tokens.dtype).unsqueeze(-1)
            weights = weights / weights.sum(dim=2, keepdim=True)
        x = tokens
        for block, kv in zip(self.blocks, encoded.kv):
            x = block(x, kv, encoded.keep, step_keep)
        # Only real steps contribute to a chunk's energy.
        pooled = (self.out_norm(x) * weights).sum(dim=2)
        # Energies and logits in float32 (or float64) even under bf16/fp16 autocast.
        out_dtype = torch.promote_types(self.dtype, torch.float32)
        first, last = self.out[0], self.out[2]
        with torch.autocast(device_type=pooled.device.type, enabled=False):
            hidden = F.gelu(F.linear(pooled.to(out_dtype), first.weight.to(out_dtype), first.bias.to(out_dtype)))
            raw = F.linear(hidden, last.weight.to(out_dtype), last.bias.to(out_dtype)).squeeze(-1)
            return self._activate(raw)

    def _activate(self, raw: Tensor) -> Tensor:
        """Output activation: sigmoid(s * raw) * scale + offset (default), softplus(s * raw) * scale + offset, or raw."""
        cfg = self.config
        if cfg.energy_activation == "sigmoid":
            return torch.sigmoid(cfg.energy_input_scale * raw) * cfg.energy_scale + cfg.energy_offset
        if cfg.energy_activation == "softplus":
            return F.softplus(cfg.energy_input_scale * raw) * cfg.energy_scale + cfg.energy_offset
        return raw


# Known to the Auto classes: AutoConfig / AutoModel.from_pretrained(<energy_head dir>) once vla_energy.modeling is
# imported.
AutoConfig.register(EnergyHeadConfig.model_type, EnergyHeadConfig, exist_ok=True)
AutoModel.register(EnergyHeadConfig, EnergyHead, exist_ok=True)
