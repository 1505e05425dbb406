"""EnergyPlugin: action head + energy head + negatives + strategy; the one object a training loop talks to."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from accelerate import Accelerator
from torch import Tensor, nn

from vla_energy.backbones.readout import BackboneReadout, read_backbone
from vla_energy.losses.bank import ActionBank
from vla_energy.losses.candidate_ranking import candidate_ranking_loss, ranking_candidates
from vla_energy.losses.gradient_alignment import gradient_alignment_loss
from vla_energy.losses.negatives import build_negatives
from vla_energy.losses.policy_l1 import masked_l1
from vla_energy.losses.policy_negatives import RunningPolicyError, concat_negatives, policy_negatives
from vla_energy.losses.strategy import StrategyPlan, plan_strategy, strategy_loss
from vla_energy.losses.temperature import make_temperature
from vla_energy.modeling.action_head import ActionHead, ActionHeadConfig
from vla_energy.modeling.modeling_energy_head import EnergyHead, EnergyHeadConfig
from vla_energy.modeling.state_projector import StateProjector, StateProjectorConfig
from vla_energy.training.arguments import EnergyArguments

__all__ = ["EnergyPlugin", "LossParts"]

# Seeds the explicit negatives of evaluation calls apart from the training draws (which eval must not advance).
_EVAL_STREAM = 2**31 - 1


@dataclass
class LossParts:
    """What the last compute_loss call computed besides the total: for a model's output."""

    readout: BackboneReadout
    policy: Tensor
    l1: Tensor
    energy_loss: Tensor


class EnergyPlugin:
    """Holds the action head and energy head (modules for accelerator.prepare) and computes the total loss.

    With `state_dim` (use_state) it also holds a StateProjector whose output is the embedding of the state token
    (`state_token_id`) and, with args.state_in_energy_context, one more token of the energy head's context.
    """

    def __init__(
        self,
        args: EnergyArguments,
        hidden_size: int,
        action_dim: int,
        horizon: int,
        action_token_id: int,
        action_head: Optional[ActionHead] = None,
        energy_head: Optional[EnergyHead] = None,
        state_dim: Optional[int] = None,
        state_token_id: Optional[int] = None,
        state_projector: Optional[StateProjector] = None,
    ) -> None:
        self.args = args
        self.horizon = int(horizon)
        self.action_dim = int(action_dim)
        self.action_token_id = int(action_token_id)
        self.action_head: nn.Module = action_head if action_head is not None else ActionHead(
            ActionHeadConfig(hidden_size=hidden_size, action_dim=action_dim, horizon=horizon,
                             mlp_dim=args.action_head_dim)
        )
        self.energy_head: nn.Module = energy_head if energy_head is not None else EnergyHead(
            EnergyHeadConfig(
                context_dim=hidden_size, action_dim=action_dim, horizon=horizon, hidden_dim=args.energy_hidden_dim,
                num_heads=args.energy_num_heads, num_layers=args.energy_num_layers, dropout=args.energy_dropout,
                energy_activation=args.energy_activation, energy_input_scale=args.energy_input_scale,
                energy_scale=args.energy_scale, energy_offset=args.energy_offset,
            )
        )
        if state_projector is None and state_dim is not None:
            state_projector = StateProjector(StateProjectorConfig(state_dim=state_dim, hidden_size=hidden_size))
        if (state_projector is None) != (state_token_id is None):
            raise ValueError(f"state_token_id={state_token_id} needs a state projector (state_dim) and a state "
                             "projector needs the state token's id: pass both or neither")
        self.state_projector: Optional[nn.Module] = state_projector
        self.state_token_id = None if state_token_id is None else int(state_token_id)
        self.temperature: nn.Module = make_temperature(args.temperature, args.tau)
        self.bank = ActionBank(args.bank_size, horizon, action_dim, eps=args.false_negative_eps) if args.bank_size else None
        uses_error = args.policy_error_negatives or args.candidate_ranking or args.grad_align_weight
        self.policy_error = RunningPolicyError(horizon, action_dim) if uses_error else None
        self.plan: Optional[StrategyPlan] = None
        self.generator: Optional[torch.Generator] = None
        self.process_index = 0
        self.draws = 0  # energy_loss calls so far: with the process index it seeds that call's negatives
        self.is_evaluating = False
        self.last_parts: Optional[LossParts] = None

    @contextmanager
    def evaluating(self, flag: bool = True) -> Iterator[None]:
        """Within: losses and metrics as in training, but nothing is staged into the bank and draws do not advance."""
        before, self.is_evaluating = self.is_evaluating, flag
        try:
            yield
        finally:
            self.is_evaluating = before

    @classmethod
    def from_pretrained_heads(cls, args: EnergyArguments, action_head: ActionHead, energy_head: EnergyHead,
                              action_token_id: int, state_projector: Optional[StateProjector] = None,
                              state_token_id: Optional[int] = None) -> EnergyPlugin:
        """A plugin around already trained heads (loading a run directory)."""
        cfg = energy_head.config
        return cls(args, cfg.context_dim, cfg.action_dim, cfg.horizon, action_token_id, action_head, energy_head,
                   state_token_id=state_token_id, state_projector=state_projector)

    def setup(self, accelerator: Accelerator, local_batch: int) -> StrategyPlan:
        """Fix the strategy from the configured layout (never from a smaller last batch) and the RNG per process."""
        self.plan = plan_strategy(self.args.strategy, accelerator.num_processes, local_batch)
        self.generator = torch.Generator(device=accelerator.device)
        self.process_index = accelerator.process_index
        self.temperature.to(accelerator.device)
        if self.bank is not None:
            self.bank.to(accelerator.device)
        return self.plan

    def energy_modules(self) -> list[nn.Module]:
        """Modules trained at the energy learning rate (the head, and a learnable temperature)."""
        learnable = any(p.requires_grad for p in self.temperature.parameters())
        return [self.energy_head, self.temperature] if learnable else [self.energy_head]

    def project_state(self, batch: Mapping[str, Tensor]) -> Optional[Tensor]:
        """The state token's embedding [B, D] from batch["state"] [B, Ds]; None without a state projector."""
        if self.state_projector is None:
            return None
        state = batch.get("state")
        if state is None:
            raise ValueError(f"use_state is on (the model has a state projector) but the batch has no 'state' (keys: "
                             f"{sorted(batch)}): build the dataset with use_state and a state_key column")
        ds = self.state_projector.config.state_dim
        if state.dim() != 2 or state.shape[1] != ds:
            raise ValueError(f"state has shape {tuple(state.shape)}, expected (B, Ds={ds}): the state projector was "
                             f"built for {ds}-dimensional states")
        return self.state_projector(state)

    def read(self, outputs: Any, batch: Mapping[str, Tensor], state_embedding: Optional[Tensor] = None
             ) -> BackboneReadout:
        """Context and placeholder hidden states from a backbone output (with hidden_states); with
        `state_embedding` [B, D] and args.state_in_energy_context, the context ends with it as one more token."""
        hidden = getattr(outputs, "hidden_states", None) if not isinstance(outputs, (tuple, list)) else outputs
        readout = read_backbone(
            hidden, batch["input_ids"], batch.get("attention_mask"), self.action_token_id, self.horizon,
            context_layer=self.args.context_layer, detach_context=self.args.detach_context,
            include_placeholders=self.args.context_includes_placeholders,
        )
        if state_embedding is None or not self.args.state_in_energy_context:
            return readout
        ctx = readout.context
        token = state_embedding.to(ctx.dtype)[:, None, :]
        token = token.detach() if self.args.detach_context else token
        readout.context = torch.cat([ctx, token], dim=1)
        readout.context_mask = torch.cat([readout.context_mask, readout.context_mask.new_ones(ctx.shape[0], 1)], dim=1)
        return readout

    def predict_actions(self, readout: BackboneReadout) -> tuple[Tensor, list[Tensor]]:
        """Policy chunk (last layer, with grad) and the detached layer-wise predictions of layers 1..L."""
        preds = self.action_head(readout.action_hidden)  # [L,B,H,Da] in one call
        return preds[-1], [p.detach() for p in preds]

    def compute_loss(
        self, outputs: Any, batch: Mapping[str, Tensor], accelerator: Accelerator,
        state_embedding: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Total loss = l1_weight * L1(policy, actions) + energy_weight * energy InfoNCE; plus flat metrics.
        `state_embedding`: the projected state of this batch (project_state), for the energy context."""
        if self.plan is None:
            raise RuntimeError("call plugin.setup(accelerator, local_batch) before compute_loss")
        readout = self.read(outputs, batch, state_embedding)
        actions = batch["actions"]
        action_mask = batch.get("action_mask")
        if actions.dim() != 3 or tuple(actions.shape[1:]) != (self.horizon, self.action_dim):
            raise ValueError(
                f"actions has shape {tuple(actions.shape)}, expected (B, H={self.horizon}, Da={self.action_dim})"
            )
        policy, layer_actions = self.predict_actions(readout)
        l1 = masked_l1(policy, actions, action_mask, accelerator)
        energy_loss, stats = self.energy_loss(readout, actions, action_mask, batch.get("sample_id"),
                                              layer_actions, accelerator)
        total = self.args.l1_loss_weight * l1 + self.args.energy_loss_weight * energy_loss
        self.last_parts = LossParts(readout, policy.detach(), l1.detach(), energy_loss.detach())
        metrics = {"loss": float(total.detach()), "l1": float(l1.detach()), "energy_loss": float(energy_loss.detach())}
        metrics.update({f"energy/{k}": v for k, v in stats.items()})
        return total, metrics

    def energy_loss(
        self,
        readout: BackboneReadout,
        actions: Tensor,
        action_mask: Optional[Tensor],
        sample_ids: Optional[Tensor],
        layer_actions: Optional[list[Tensor]],
        accelerator: Accelerator,
    ) -> tuple[Tensor, dict[str, float]]:
        """Energy InfoNCE with the planned strategy; users with their own context/layer_actions call this."""
        head, ctx, cmask = self.energy_head, readout.context, readout.context_mask
        negatives = None
        if not self.is_evaluating:
            self.draws += 1
        if self.plan.explicit or self._uses_policy_terms():
            # Reseeded from (seed, rank, call) rather than carried along: the main process saves the checkpoint,
            # and one saved generator state would give every rank rank 0's stream after a resume.
            key = [self.args.negatives_seed, self.process_index, self.draws]
            seed = np.random.SeedSequence(key + [_EVAL_STREAM] if self.is_evaluating else key)
            self.generator.manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))
        policy = layer_actions[-1] if layer_actions else None
        if policy is None and self._uses_policy_terms():
            raise ValueError("candidate_ranking and grad_align_weight need the policy's chunk (layer_actions)")
        scale = None
        if self.policy_error is not None and policy is not None:  # evaluation reads the running error, never moves it
            scale = (self.policy_error.scale.to(actions.device) if self.is_evaluating else
                     self.policy_error.update(accelerator, policy, actions, action_mask))
            scale = scale if self.policy_error.initialized else None
        if self.plan.explicit:

            def energy_fn(chunk: Tensor) -> Tensor:
                with torch.no_grad():
                    return head(ctx, chunk, context_mask=cmask, action_mask=action_mask)

            negatives = build_negatives(
                actions,
                layer_actions if self.args.layer_negatives != "none" else None,
                num_negatives=self.args.num_negatives,
                layer_mode=self.args.layer_negatives,
                noise_sigmas=tuple(self.args.noise_sigmas),
                shuffle=self.args.shuffle_negative,
                energy_fn=energy_fn if self.args.layer_negatives == "mid_energy" else None,
                false_negative_eps=self.args.false_negative_eps,
                action_mask=action_mask,
                generator=self.generator,
            )
            if policy is not None and (self.args.policy_error_negatives or self.args.policy_negative):
                negatives = concat_negatives(negatives, policy_negatives(
                    actions, policy, scale, self.args.policy_error_negatives, self.args.policy_negative,
                    action_mask, self.args.false_negative_eps, self.generator))
        staged = self.bank.num_staged() if self.bank is not None else 0
        try:
            loss, stats = strategy_loss(
                self.plan, head, ctx, actions, accelerator,
                context_mask=cmask, tau=self.temperature, negatives=negatives, bank=self.bank,
                action_mask=action_mask, sample_ids=sample_ids, symmetric=self.args.symmetric,
                false_negative_eps=self.args.false_negative_eps,
            )
        finally:
            if self.is_evaluating and self.bank is not None:
                self.bank.discard(keep=staged)  # the bank only holds training data
        if self.args.candidate_ranking and ctx.shape[0] > 0:
            cands = ranking_candidates(actions, policy, scale, self.args.candidate_ranking, action_mask,
                                       self.generator)
            rank_loss, rank_stats = candidate_ranking_loss(
                head, ctx, cands, actions, self.args.tau, context_mask=cmask, action_mask=action_mask,
                target_temperature=self.args.ranking_target_temperature)
            loss = loss + self.args.candidate_ranking_weight * rank_loss
            stats.update(ranking_loss=float(rank_loss.detach()), **rank_stats)
        if self.args.grad_align_weight and ctx.shape[0] > 0:
            s = (torch.full(actions.shape[1:], 0.1, device=actions.device) if scale is None else scale)
            noise = torch.randn(actions.shape, generator=self.generator, device=actions.device, dtype=actions.dtype)
            perturbed = actions + s.to(actions.device, actions.dtype) * noise
            align_loss, align_stats = gradient_alignment_loss(head, ctx, actions, perturbed, cmask, action_mask)
            loss = loss + self.args.grad_align_weight * align_loss
            stats.update(grad_align_loss=float(align_loss.detach()), **align_stats)
        return loss, stats

    def _uses_policy_terms(self) -> bool:
        """Whether a term beside the InfoNCE scores chunks built from the policy's (candidate ranking, alignment)."""
        return bool(self.args.candidate_ranking or self.args.grad_align_weight)

    def after_optimizer_step(self) -> None:
        """Enqueue this step's gathered actions into the bank (identical on every rank)."""
        if self.bank is not None:
            self.bank.commit()

    def skip_step(self) -> None:
        """Forget what this step staged (a skipped, non-finite step)."""
        if self.bank is not None:
            self.bank.discard()

    def state_dict(self) -> dict[str, Any]:
        """Bank, temperature and the count of negatives draws (it seeds their RNG): what checkpoints save."""
        state: dict[str, Any] = {"temperature": self.temperature.state_dict()}
        if self.bank is not None:
            state["bank"] = self.bank.state_dict()
        if self.policy_error is not None:
            state["policy_error"] = self.policy_error.state_dict()
        state["draws"] = self.draws
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what state_dict saved."""
        self.temperature.load_state_dict(state.get("temperature", {}))  # empty when it has no state
        if self.bank is not None:
            if "bank" not in state:
                raise ValueError("checkpoint has no action bank state but bank_size > 0")
            self.bank.load_state_dict(state["bank"])
        if self.policy_error is not None and "policy_error" in state:
            self.policy_error.load_state_dict(state["policy_error"])
        self.draws = int(state.get("draws", 0))

    def config_dict(self) -> dict[str, Any]:
        """The plugin's settings as JSON-able values (saved beside the heads)."""
        return {"args": asdict(self.args), "horizon": self.horizon, "action_dim": self.action_dim,
                "action_token_id": self.action_token_id, "state_token_id": self.state_token_id}
