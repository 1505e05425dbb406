"""EnergyArguments: the plugin's one configuration (losses, negatives, temperature and every head size).

An HfArgumentParser dataclass, so its fields are YAML keys and --flags of the training recipe, and the configuration
a saved policy records. The heads' own configs are built from it (`energy_head_config`, `action_head_config`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vla_energy.losses.negatives import LAYER_MODES
from vla_energy.losses.strategy import STRATEGIES
from vla_energy.losses.temperature import TEMPERATURE_KINDS
from vla_energy.modeling.action_head import ActionHeadConfig
from vla_energy.modeling.configuration_energy_head import ENERGY_ACTIVATIONS, EnergyHeadConfig
from vla_energy.modeling.flow_action_head import TIME_SAMPLINGS, FlowActionHeadConfig

__all__ = ["EnergyArguments", "ACTION_HEADS", "RANKING_CANDIDATES"]

# What candidate_ranking ranks: chunks around the policy's (its errors and noise), or the flow head's own samples.
RANKING_CANDIDATES = ("policy", "samples")

# l1: a deterministic regression head (OpenVLA-OFT); flow: a stochastic head trained by flow matching (pi0, SmolVLA).
ACTION_HEADS = ("l1", "flow")


@dataclass
class EnergyArguments:
    """Energy-head options: loss weights, negatives, temperature, head size (docs/background.md: the defaults)."""

    energy_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the energy loss in the total."})
    l1_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the policy's action L1 loss."})
    strategy: str = field(
        default="combined",
        metadata={"help": f"Which negatives each positive meets, one of {STRATEGIES} (docs/concepts.md)."},
    )
    tau: float = field(default=0.3, metadata={"help": "InfoNCE temperature (logits = -energy / tau)."})
    temperature: str = field(
        default="fixed",
        metadata={"help": "fixed | adaptive (tau halves when the energy gap is < 0.1, doubles when > 1.0) | "
                          "learnable (CLIP-style, clamped)."},
    )
    num_negatives: int = field(default=8, metadata={"help": "Explicit negatives per positive (M)."})
    layer_negatives: str = field(
        default="fixed",
        metadata={"help": "Layer-wise action predictions as negatives: fixed (layers [0, L//3, L//2, -2]) | "
                          "mid_energy (the middle-energy layer) | none."},
    )
    noise_sigmas: list[float] = field(
        default_factory=lambda: [0.1, 0.2, 0.4],
        metadata={"help": "Standard deviations of the Gaussian-noise negatives (ground truth + noise)."},
    )
    shuffle_negative: bool = field(default=True, metadata={"help": "Add a temporal-shuffle negative of the chunk."})
    false_negative_eps: float = field(
        default=1e-2, metadata={"help": "Negatives within this RMS distance of the positive are masked."}
    )
    bound_negatives: bool = field(
        default=False, metadata={"help": "Keep generated negatives and ranking candidates (noise, policy perturbations, "
                                         "flow samples) within the data's normalized bounds, as inference keeps its "
                                         "candidates (NormStats.normalized_bounds): a dimension constant in the data "
                                         "(an unused gripper, a padded dimension) stays at its value instead of "
                                         "making every negative trivially off the data. The training recipe and "
                                         "EnergyTrainer set the bounds; a loop of your own calls "
                                         "plugin.set_action_bounds."}
    )
    policy_error_negatives: int = field(
        default=0, metadata={"help": "Near negatives per positive: truth + noise at the running policy error's scale "
                                     "per step and action dim (0: none; needs explicit negatives)."}
    )
    policy_negative: bool = field(
        default=False, metadata={"help": "The policy's own chunk (detached) as a negative when farther than "
                                         "false_negative_eps from the truth (needs explicit negatives)."}
    )
    sample_negatives: int = field(
        default=0, metadata={"help": "action_head flow: this many of the flow head's own samples (detached) as "
                                     "negatives, each masked within false_negative_eps of the truth, so that the head "
                                     "learns where the demonstrations are denser than the sampler: what choosing "
                                     "among its samples needs (0: none; needs explicit negatives)."}
    )
    candidate_ranking: int = field(
        default=0, metadata={"help": "Candidates per positive for a listwise ranking loss (0: off): the policy's chunk, "
                                     "it plus other rows' errors and it plus noise at its error scale, whose energies "
                                     "are trained to follow their distance to the truth (docs/selection.md)."}
    )
    ranking_candidates: str = field(
        default="policy", metadata={"help": "What candidate_ranking ranks: policy (the chunks above) or samples "
                                            "(action_head flow: the policy's chunk and the flow head's own samples, "
                                            "the candidates of best-of-N, so that the head learns to pick among them "
                                            "the one nearest the demonstration)."}
    )
    candidate_ranking_weight: float = field(default=1.0, metadata={"help": "Weight of the candidate ranking loss."})
    ranking_target_temperature: float = field(
        default=0.1, metadata={"help": "Ranking targets softmax(-d / (t * mean d)) over candidate distances d: this t."}
    )
    grad_align_weight: float = field(
        default=0.0, metadata={"help": "Weight of a term making -dE/da at truth + policy-scale noise point toward the "
                                       "truth (for refinement; 0: off)."}
    )
    bank_size: int = field(default=0, metadata={"help": "ActionBank size: recent gathered chunks as negatives (0: none)."})
    symmetric: bool = field(default=False, metadata={"help": "Add the symmetric (action -> contexts) term."})
    context_layer: int = field(default=-1, metadata={"help": "Backbone layer whose hidden states are the context."})
    state_in_energy_context: bool = field(
        default=True, metadata={"help": "With use_state: the projected state is one more token of the energy head's "
                                        "context (besides its state token in the backbone's input)."}
    )
    context_includes_placeholders: bool = field(
        default=True, metadata={"help": "The energy context includes the action placeholders' hidden states."}
    )
    detach_context: bool = field(
        default=True, metadata={"help": "Stop the energy loss's gradient at the backbone (it then moves only heads)."}
    )
    energy_hidden_dim: int = field(default=128, metadata={"help": "Energy head width."})
    energy_num_heads: int = field(default=4, metadata={"help": "Energy head attention heads."})
    energy_num_layers: int = field(default=2, metadata={"help": "Energy head blocks."})
    energy_dropout: float = field(default=0.0, metadata={"help": "Energy head dropout."})
    energy_activation: str = field(
        default="sigmoid",
        metadata={"help": "Bounding of the energy: sigmoid (E = scale * sigmoid(input_scale * raw) + offset) | "
                          "softplus | none."},
    )
    energy_input_scale: float = field(default=0.5, metadata={"help": "Factor on the raw energy inside the sigmoid."})
    energy_scale: float = field(default=2.0, metadata={"help": "Range of the bounded energy."})
    energy_offset: float = field(default=0.1, metadata={"help": "Lowest energy: E in (offset, offset + scale)."})
    action_head: str = field(
        default="l1",
        metadata={"help": f"The policy's action head, one of {ACTION_HEADS}: l1 (L1 regression, OpenVLA-OFT style) or "
                          "flow (flow matching as in pi0/SmolVLA: samples chunks from noise; its samples are the "
                          "candidates of candidates='samples')."},
    )
    action_head_dim: int = field(default=256, metadata={"help": "Width of the action head's MLP (either kind)."})
    flow_loss_weight: float = field(
        default=1.0, metadata={"help": "action_head flow: weight of its flow-matching MSE in the total (in place of "
                                       "l1_loss_weight x the L1, which the flow head has no term for)."}
    )
    flow_steps: int = field(default=10, metadata={"help": "action_head flow: Euler steps from noise to a chunk."})
    flow_time_sampling: str = field(
        default="beta", metadata={"help": f"action_head flow: training times t, one of {TIME_SAMPLINGS}: beta "
                                          "(0.001 + 0.999 Beta(1.5, 1), more weight on noisy times, as pi0/SmolVLA) "
                                          "or uniform."}
    )
    flow_noise_seed: int = field(
        default=0, metadata={"help": "action_head flow: seed of the one fixed noise chunk whose sample is the policy's "
                                     "chunk (the L1 metric, layer-wise and policy negatives, mode='policy')."}
    )
    negatives_seed: int = field(
        default=0, metadata={"help": "Seed of the noise/shuffle negatives (mixed with the process index and step)."}
    )

    def __post_init__(self) -> None:
        if self.candidate_ranking < 0 or self.candidate_ranking == 1:
            raise ValueError(f"candidate_ranking={self.candidate_ranking}, expected 0 (off) or >= 2 candidates")
        if self.grad_align_weight < 0 or self.candidate_ranking_weight < 0:
            raise ValueError(f"grad_align_weight={self.grad_align_weight} and candidate_ranking_weight="
                             f"{self.candidate_ranking_weight}: expected >= 0")
        if self.ranking_target_temperature <= 0:
            raise ValueError(f"ranking_target_temperature={self.ranking_target_temperature}, expected > 0")
        if self.sample_negatives < 0 or (self.sample_negatives and self.action_head != "flow"):
            raise ValueError(f"sample_negatives={self.sample_negatives} with action_head={self.action_head!r}: "
                             "expected >= 0, and samples to draw them from (action_head flow)")
        if self.ranking_candidates == "samples" and self.action_head != "flow":
            raise ValueError(f"ranking_candidates='samples' with action_head={self.action_head!r}: expected samples "
                             "to rank (action_head flow)")
        if self.flow_steps < 1 or self.flow_loss_weight < 0:
            raise ValueError(f"flow_steps={self.flow_steps} and flow_loss_weight={self.flow_loss_weight}: expected "
                             ">= 1 Euler steps and a weight >= 0")
        for name, allowed in (("strategy", STRATEGIES), ("temperature", TEMPERATURE_KINDS),
                              ("layer_negatives", LAYER_MODES), ("energy_activation", ENERGY_ACTIVATIONS),
                              ("action_head", ACTION_HEADS), ("flow_time_sampling", TIME_SAMPLINGS),
                              ("ranking_candidates", RANKING_CANDIDATES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r}, expected one of {allowed}")

    def energy_head_config(self, context_dim: int, action_dim: int, horizon: int) -> EnergyHeadConfig:
        """The energy head's config: its sizes from these options, its inputs from the backbone and the data."""
        return EnergyHeadConfig(
            context_dim=context_dim, action_dim=action_dim, horizon=horizon, hidden_dim=self.energy_hidden_dim,
            num_heads=self.energy_num_heads, num_layers=self.energy_num_layers, dropout=self.energy_dropout,
            energy_activation=self.energy_activation, energy_input_scale=self.energy_input_scale,
            energy_scale=self.energy_scale, energy_offset=self.energy_offset,
        )

    def action_head_config(self, hidden_size: int, action_dim: int, horizon: int
                           ) -> ActionHeadConfig | FlowActionHeadConfig:
        """The action head's config (of the kind `action_head` names): its width and sampling from these options."""
        if self.action_head == "flow":
            return FlowActionHeadConfig(hidden_size=hidden_size, action_dim=action_dim, horizon=horizon,
                                        mlp_dim=self.action_head_dim, flow_steps=self.flow_steps,
                                        time_sampling=self.flow_time_sampling, noise_seed=self.flow_noise_seed)
        return ActionHeadConfig(hidden_size=hidden_size, action_dim=action_dim, horizon=horizon,
                                mlp_dim=self.action_head_dim)
