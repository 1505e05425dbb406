"""EnergyPlugin: the action head, energy head, temperature and state projector as one module, and their loss.

The plugin reads a backbone's hidden states (`read`), predicts the policy's chunk and its layer-wise predictions
(`predict_actions`), and its forward computes the total loss: the action head's loss (`l1_loss_weight` x the action
L1, or with action_head flow `flow_loss_weight` x the flow-matching MSE) plus `energy_loss_weight` x the energy
InfoNCE with the configured negatives (`energy_loss`). A flow head also samples candidate chunks (`sample_actions`).
It owns every head, so one `accelerator.prepare` of the model that holds it covers all of them, and what a step
computed is returned (`PluginOutput`), never kept.

Beside its parameters the plugin keeps the loss's running state: the action bank, the running policy error and
the count of negative draws that seeds their RNG. `loss_state_dict()` / `load_loss_state_dict()` save and restore
it with a checkpoint; `after_optimizer_step()` / `skip_step()` advance or drop a step's part of it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch import Tensor, nn

from vla_energy.backbones.readout import BackboneReadout, read_backbone
from vla_energy.checks import real_steps
from vla_energy.losses.bank import ActionBank
from vla_energy.losses.candidate_ranking import candidate_ranking_loss, ranking_candidates
from vla_energy.losses.gradient_alignment import gradient_alignment_loss
from vla_energy.losses.negatives import Negatives, build_negatives, false_negative_mask
from vla_energy.losses.perturbation import Bound, check_bounds, clamp_to_bounds, perturb
from vla_energy.losses.policy_l1 import masked_l1, masked_mean
from vla_energy.losses.policy_negatives import RunningPolicyError, concat_negatives, policy_negatives
from vla_energy.losses.strategy import StrategyPlan, plan_strategy, strategy_loss
from vla_energy.losses.temperature import make_temperature
from vla_energy.modeling.action_head import ActionHead
from vla_energy.modeling.configuration_energy import EnergyArguments
from vla_energy.modeling.flow_action_head import FlowActionHead
from vla_energy.modeling.modeling_energy_head import EnergyHead
from vla_energy.modeling.state_projector import StateProjector, StateProjectorConfig

__all__ = ["EnergyPlugin", "PluginOutput"]

# Seeds the explicit negatives of evaluation calls apart from the training draws (which eval must not advance).
_EVAL_STREAM = 2**31 - 1
# Seeds the flow head's training noise and times apart from the negatives of the same call.
_FLOW_STREAM = 2**31 - 2


@dataclass
class PluginOutput:
    """What one loss computation produced: the total, its parts, the readout and policy chunk, flat metrics. `l1`:
    the policy chunk's L1 (with a flow head a metric, not a term of the loss)."""

    loss: Tensor
    l1: Tensor
    energy_loss: Tensor
    readout: BackboneReadout
    policy: Tensor  # [B,H,Da] detached
    metrics: dict[str, float]


class EnergyPlugin(nn.Module):
    """Action head + energy head + temperature (+ state projector) and the loss that trains them.

    Built from its options (`EnergyArguments`, which holds every head size) and the sizes of the backbone
    (`hidden_size`) and the data (`action_dim`, `horizon`). With `state_dim` (use_state) it also holds a
    StateProjector whose output is the embedding of the state token (`state_token_id`) and, with
    args.state_in_energy_context, one more token of the energy head's context.
    """

    def __init__(
        self,
        args: EnergyArguments,
        hidden_size: int,
        action_dim: int,
        horizon: int,
        action_token_id: int,
        state_dim: Optional[int] = None,
        state_token_id: Optional[int] = None,
    ) -> None:
        super().__init__()
        if (state_dim is None) != (state_token_id is None):
            raise ValueError(f"state_dim={state_dim} and state_token_id={state_token_id}: the state projector needs "
                             "both (use_state) or neither")
        self.args = args
        self.hidden_size, self.action_dim, self.horizon = int(hidden_size), int(action_dim), int(horizon)
        self.action_token_id = int(action_token_id)
        self.state_dim = None if state_dim is None else int(state_dim)
        self.state_token_id = None if state_token_id is None else int(state_token_id)
        head_config = args.action_head_config(hidden_size, action_dim, horizon)
        self.action_head = FlowActionHead(head_config) if args.action_head == "flow" else ActionHead(head_config)
        self.energy_head = EnergyHead(args.energy_head_config(hidden_size, action_dim, horizon))
        self.temperature = make_temperature(args.temperature, args.tau)
        self.state_projector = (None if state_dim is None else
                                StateProjector(StateProjectorConfig(state_dim=state_dim, hidden_size=hidden_size)))
        self.bank = ActionBank(args.bank_size, horizon, action_dim, eps=args.false_negative_eps) if args.bank_size else None
        uses_error = args.policy_error_negatives or args.candidate_ranking or args.grad_align_weight
        self.policy_error = RunningPolicyError(horizon, action_dim) if uses_error else None
        self.plan: Optional[StrategyPlan] = None
        self.generator: Optional[torch.Generator] = None
        self.flow_generator: Optional[torch.Generator] = None
        self.process_index = 0
        self.draws = 0  # energy_loss calls so far: with the process index it seeds that call's negatives
        self.is_evaluating = False
        self.action_bounds: Optional[tuple[Bound, Bound]] = None  # the data's, for bound_negatives

    # Configuration ------------------------------------------------------------------------------------------------

    def config_dict(self) -> dict[str, Any]:
        """Everything the plugin is built from, as JSON-able values (what a saved policy records)."""
        return {"args": asdict(self.args), "hidden_size": self.hidden_size, "action_dim": self.action_dim,
                "horizon": self.horizon, "action_token_id": self.action_token_id, "state_dim": self.state_dim,
                "state_token_id": self.state_token_id}

    @classmethod
    def from_config_dict(cls, config: Mapping[str, Any]) -> EnergyPlugin:
        """A fresh plugin from what config_dict wrote."""
        return cls(EnergyArguments(**config["args"]), config["hidden_size"], config["action_dim"], config["horizon"],
                   config["action_token_id"], config.get("state_dim"), config.get("state_token_id"))

    def policy_modules(self) -> list[nn.Module]:
        """The policy's heads: the action head and, with use_state, the state projector."""
        return [m for m in (self.action_head, self.state_projector) if m is not None]

    def energy_modules(self) -> list[nn.Module]:
        """The modules trained at the energy learning rate: the energy head and the temperature."""
        return [self.energy_head, self.temperature]

    def parts_that_learn(self) -> dict[str, nn.Module]:
        """Each part that training must move, by name: the heads, the state projector and a learnable temperature."""
        parts = {"action_head": self.action_head, "energy_head": self.energy_head}
        if self.state_projector is not None:
            parts["state_projector"] = self.state_projector
        if self.args.temperature == "learnable":
            parts["temperature"] = self.temperature
        return parts

    # The loss's running state -----------------------------------------------------------------------------------

    def setup(self, group: Any, local_batch: int) -> StrategyPlan:
        """Fix the strategy from the configured layout (never from a smaller last batch) and the RNG per process.

        `group`: the accelerator, or anything with num_processes, process_index and device (ProcessGroup)."""
        self.plan = plan_strategy(self.args.strategy, group.num_processes, local_batch)
        self.generator = torch.Generator(device=group.device)
        self.flow_generator = torch.Generator(device=group.device) if self.is_flow else None
        self.process_index = group.process_index
        if self.bank is not None:
            self.bank.to(group.device)
        return self.plan

    @contextmanager
    def evaluating(self, flag: bool = True) -> Iterator[None]:
        """Within: losses and metrics as in training, but nothing is staged into the bank and draws do not advance."""
        before, self.is_evaluating = self.is_evaluating, flag
        try:
            yield
        finally:
            self.is_evaluating = before

    def after_optimizer_step(self) -> None:
        """Enqueue this step's gathered actions into the bank (identical on every rank)."""
        if self.bank is not None:
            self.bank.commit()

    def skip_step(self) -> None:
        """Forget what this step staged (a skipped, non-finite step)."""
        if self.bank is not None:
            self.bank.discard()

    def loss_state_dict(self) -> dict[str, Any]:
        """Bank, running policy error and the count of negative draws: what a checkpoint saves beside the weights."""
        state: dict[str, Any] = {"draws": self.draws}
        if self.bank is not None:
            state["bank"] = self.bank.state_dict()
        if self.policy_error is not None:
            state["policy_error"] = self.policy_error.state_dict()
        return state

    def load_loss_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what loss_state_dict saved."""
        if self.bank is not None:
            if "bank" not in state:
                raise ValueError("the checkpoint has no action bank state but bank_size > 0")
            self.bank.load_state_dict(state["bank"])
        if self.policy_error is not None and "policy_error" in state:
            self.policy_error.load_state_dict(state["policy_error"])
        self.draws = int(state.get("draws", 0))

    # Reading the backbone -------------------------------------------------------------------------------------------

    def project_state(self, batch: Mapping[str, Tensor]) -> Optional[Tensor]:
        """The state token's embedding [B, D] from batch["state"] [B, Ds]; None without a state projector."""
        if self.state_projector is None:
            return None
        state = batch.get("state")
        if state is None:
            raise ValueError(f"use_state is on (the model has a state projector) but the batch has no 'state' (keys: "
                             f"{sorted(batch)}): build the dataset with use_state and a state_key column")
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

    @property
    def is_flow(self) -> bool:
        """Whether the action head is a flow head (action_head flow): stochastic, with samples as candidates."""
        return isinstance(self.action_head, FlowActionHead)

    def predict_actions(self, readout: BackboneReadout) -> tuple[Tensor, list[Tensor]]:
        """Policy chunk (last layer) and the detached layer-wise predictions of layers 1..L.

        L1 head: the policy chunk carries the gradient of its L1 loss. Flow head: every chunk is the deterministic
        sample (the fixed noise chunk) conditioned on that layer's placeholder states, without gradient (its loss
        is the flow-matching MSE, not a function of the sample)."""
        if self.is_flow:
            with torch.no_grad():
                preds = self.action_head(readout.action_hidden)  # [L,B,H,Da], the L layers integrated together
            return preds[-1], list(preds)
        preds = self.action_head(readout.action_hidden)  # [L,B,H,Da] in one call
        return preds[-1], [p.detach() for p in preds]

    @torch.no_grad()
    def sample_actions(self, readout: BackboneReadout, num_samples: int,
                       generator: Optional[torch.Generator] = None) -> Tensor:
        """[B,N,H,Da]: N chunks of the flow head from independent noise (`generator`) under the last layer's
        placeholder states, computed from this one readout (no backbone run)."""
        if not self.is_flow:
            raise ValueError(f"sample_actions needs a flow action head (action_head='flow'); this plugin's is "
                             f"{self.args.action_head!r}, which is deterministic")
        return self.action_head.sample(readout.action_hidden[-1], num_samples, generator)

    def set_action_bounds(self, low: Bound, high: Bound) -> None:
        """Where the data's normalized chunks lie (`NormStats.normalized_bounds()`), for bound_negatives."""
        check_bounds(low, high)
        self.action_bounds = (low, high)

    def generated_bounds(self) -> tuple[Bound, Bound]:
        """The bounds generated negatives and candidates are kept in: the data's with bound_negatives, else [-1, 1]
        for candidates (negatives are then left as drawn)."""
        if not self.args.bound_negatives:
            return -1.0, 1.0
        if self.action_bounds is None:
            raise ValueError("bound_negatives needs the data's bounds: call plugin.set_action_bounds(*norm_stats."
                             "normalized_bounds()) before training (the training recipe and EnergyTrainer do)")
        return self.action_bounds

    def bound(self, negatives: Negatives, actions: Tensor, action_mask: Optional[Tensor]) -> Negatives:
        """With bound_negatives: the negatives within the data's bounds, masked again where that brought one within
        false_negative_eps of the truth; otherwise unchanged."""
        if not self.args.bound_negatives:
            return negatives
        chunks = clamp_to_bounds(negatives.actions, *self.generated_bounds())
        keep = negatives.mask & false_negative_mask(actions.detach(), chunks, action_mask, self.args.false_negative_eps)
        return Negatives(chunks, negatives.types, keep)

    def _draw(self, readout: BackboneReadout, num: int, option: str) -> Tensor:
        """num flow samples per row from this call's generator, for a training option that needs them."""
        if readout.action_hidden.shape[0] == 0:
            raise ValueError(f"{option} needs the backbone's placeholder states to sample from (a head trained on "
                             "collected contexts alone has none)")
        return self.sample_actions(readout, num, self.generator)

    def sample_negatives(self, readout: BackboneReadout, actions: Tensor, action_mask: Optional[Tensor]) -> Negatives:
        """args.sample_negatives chunks of the flow head (this call's generator), each masked within
        false_negative_eps of the truth."""
        drawn = self._draw(readout, self.args.sample_negatives, "sample_negatives").to(actions.dtype)
        keep = false_negative_mask(actions.detach(), drawn, action_mask, self.args.false_negative_eps)
        return Negatives(drawn, ["flow_sample"] * drawn.shape[1], keep)

    def ranking_samples(self, readout: BackboneReadout, policy: Tensor, num_candidates: int) -> Tensor:
        """[B,K,H,Da]: best-of-N's candidates for candidate_ranking: the policy's chunk and K-1 flow samples (this
        call's generator), within `generated_bounds()`, detached."""
        drawn = self._draw(readout, num_candidates - 1, "ranking_candidates='samples'").to(policy.dtype)
        return clamp_to_bounds(torch.cat([policy.detach()[:, None], drawn], dim=1), *self.generated_bounds())

    # The loss -----------------------------------------------------------------------------------------------------

    def forward(self, outputs: Any, batch: Mapping[str, Tensor], group: Any,
                state_embedding: Optional[Tensor] = None) -> PluginOutput:
        """Total loss = l1_loss_weight * L1(policy, actions) (flow head: flow_loss_weight * its flow-matching MSE) +
        energy_loss_weight * energy InfoNCE, from one backbone output (with hidden_states) and its batch; `group` is
        the accelerator or a ProcessGroup; `state_embedding`: the projected state of this batch (project_state)."""
        if self.plan is None:
            raise RuntimeError("call plugin.setup(accelerator, local_batch) before computing the loss")
        readout = self.read(outputs, batch, state_embedding)
        actions = batch["actions"]
        action_mask = batch.get("action_mask")
        if actions.dim() != 3 or tuple(actions.shape[1:]) != (self.horizon, self.action_dim):
            raise ValueError(
                f"actions has shape {tuple(actions.shape)}, expected (B, H={self.horizon}, Da={self.action_dim})"
            )
        policy, layer_actions = self.predict_actions(readout)
        sample_mask = batch.get("sample_mask")  # padding rows (False) count in no loss
        l1_mask = action_mask if sample_mask is None else (
            real_steps(action_mask, actions.shape[:2], actions.device) & sample_mask.bool()[:, None])
        l1 = masked_l1(policy, actions, l1_mask, group)
        energy_loss, stats = self.energy_loss(readout, actions, action_mask, batch.get("sample_id"), layer_actions,
                                              group, sample_mask)
        metrics: dict[str, float] = {}
        if self.is_flow:
            self._seed(self.flow_generator, _FLOW_STREAM)  # after energy_loss: this call's draw count
            errors = self.action_head(readout.action_hidden[-1], actions, generator=self.flow_generator)
            flow = masked_mean(errors, l1_mask, group)
            metrics["flow_loss"] = float(flow.detach())
            action_loss = self.args.flow_loss_weight * flow
        else:
            action_loss = self.args.l1_loss_weight * l1
        total = action_loss + self.args.energy_loss_weight * energy_loss
        metrics.update({"loss": float(total.detach()), "l1": float(l1.detach()),
                        "energy_loss": float(energy_loss.detach())})
        metrics.update({f"energy/{k}": v for k, v in stats.items()})
        return PluginOutput(total, l1.detach(), energy_loss.detach(), readout, policy.detach(), metrics)

    def _seed(self, generator: torch.Generator, *stream: int) -> None:
        """Seed this call's draws of `generator` from (seed, rank, call, stream): the main process saves the
        checkpoint, and one saved generator state would give every rank rank 0's stream after a resume."""
        key = [self.args.negatives_seed, self.process_index, self.draws, *stream]
        seed = np.random.SeedSequence(key + [_EVAL_STREAM] if self.is_evaluating else key)
        generator.manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))

    def energy_loss(
        self,
        readout: BackboneReadout,
        actions: Tensor,
        action_mask: Optional[Tensor],
        sample_ids: Optional[Tensor],
        layer_actions: Optional[list[Tensor]],
        group: Any,
        sample_mask: Optional[Tensor] = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Energy InfoNCE with the planned strategy (plus the optional ranking and alignment terms); users with their
        own context and layer-wise predictions call this directly. `sample_mask` [B] (True = a sample) leaves
        padding rows out of the InfoNCE."""
        if self.plan is None:
            raise RuntimeError("call plugin.setup(accelerator, local_batch) before computing the loss")
        args, head, ctx, cmask = self.args, self.energy_head, readout.context, readout.context_mask
        uses_policy_terms = bool(args.candidate_ranking or args.grad_align_weight)
        if not self.is_evaluating:
            self.draws += 1
        if self.plan.explicit or uses_policy_terms:
            self._seed(self.generator)
        policy = layer_actions[-1] if layer_actions else None
        if policy is None and uses_policy_terms:
            raise ValueError("candidate_ranking and grad_align_weight need the policy's chunk (layer_actions)")
        scale = None
        if self.policy_error is not None and policy is not None:  # evaluation reads the running error, never moves it
            scale = (self.policy_error.scale.to(actions.device) if self.is_evaluating else
                     self.policy_error.update(group, policy, actions, action_mask))
            scale = scale if self.policy_error.initialized else None
        negatives = None
        if self.plan.explicit:

            def energy_fn(chunk: Tensor) -> Tensor:
                with torch.no_grad():
                    return head(ctx, chunk, context_mask=cmask, action_mask=action_mask)

            negatives = build_negatives(
                actions,
                layer_actions if args.layer_negatives != "none" else None,
                num_negatives=args.num_negatives,
                layer_mode=args.layer_negatives,
                noise_sigmas=tuple(args.noise_sigmas),
                shuffle=args.shuffle_negative,
                energy_fn=energy_fn if args.layer_negatives == "mid_energy" else None,
                false_negative_eps=args.false_negative_eps,
                action_mask=action_mask,
                generator=self.generator,
            )
            if policy is not None and (args.policy_error_negatives or args.policy_negative):
                negatives = concat_negatives(negatives, policy_negatives(
                    actions, policy, scale, args.policy_error_negatives, args.policy_negative,
                    action_mask, args.false_negative_eps, self.generator))
            if args.sample_negatives:
                negatives = concat_negatives(negatives, self.sample_negatives(readout, actions, action_mask))
            negatives = self.bound(negatives, actions, action_mask)
        staged = self.bank.num_staged() if self.bank is not None else 0
        try:
            loss, stats = strategy_loss(
                self.plan, head, ctx, actions, group,
                context_mask=cmask, tau=self.temperature, negatives=negatives, bank=self.bank,
                action_mask=action_mask, sample_ids=sample_ids, symmetric=args.symmetric,
                false_negative_eps=args.false_negative_eps, row_mask=sample_mask,
            )
        finally:
            if self.is_evaluating and self.bank is not None:
                self.bank.discard(keep=staged)  # the bank only holds training data
        if args.candidate_ranking and ctx.shape[0] > 0:
            cands = (self.ranking_samples(readout, policy.to(actions.dtype), args.candidate_ranking)
                     if args.ranking_candidates == "samples" else
                     ranking_candidates(actions, policy, scale, args.candidate_ranking, action_mask, self.generator,
                                        *self.generated_bounds()))
            rank_loss, rank_stats = candidate_ranking_loss(
                head, ctx, cands, actions, args.tau, context_mask=cmask, action_mask=action_mask,
                target_temperature=args.ranking_target_temperature)
            loss = loss + args.candidate_ranking_weight * rank_loss
            stats.update(ranking_loss=float(rank_loss.detach()), **rank_stats)
        if args.grad_align_weight and ctx.shape[0] > 0:
            perturbed = perturb(actions, 0.1 if scale is None else scale, self.generator)
            if args.bound_negatives:
                perturbed = clamp_to_bounds(perturbed, *self.generated_bounds())
            align_loss, align_stats = gradient_alignment_loss(head, ctx, actions, perturbed, cmask, action_mask)
            loss = loss + args.grad_align_weight * align_loss
            stats.update(grad_align_loss=float(align_loss.detach()), **align_stats)
        return loss, stats
