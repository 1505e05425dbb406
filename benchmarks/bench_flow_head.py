"""Best of N on a toy bimodal problem: a flow head's samples chosen by a trained energy head, against the sampler
alone and an L1 head.

    OMP_NUM_THREADS=1 python benchmarks/bench_flow_head.py --out runs/bench_flow_head
    OMP_NUM_THREADS=1 python benchmarks/bench_flow_head.py --seeds 0 --steps 300 --flow_steps 2 10 --num_samples 16

Placeholder states [H, D] encode a chunk c; the demonstrated chunk is +c or -c at random (two equally valid modes,
vla_energy.testing.toys.bimodal_chunks). Per seed, an L1 ActionHead, a FlowActionHead (flow-matching MSE) and an
EnergyHead (in-batch InfoNCE + Gaussian-noise negatives around the truth, sigma 0.1/0.2/0.4, tau 0.3, bounded
sigmoid energy: the plugin's defaults) are trained on the same batches. On held-out contexts every way of choosing a
chunk is measured by its distance to the nearest mode, mean |a - (+/-c)| over steps and dims, relative to mean |c|
(0: a demonstrated action; 1: the average of the two modes, what a regression predicts), and by the share of chunks
"on a mode" (that distance below 0.25 |c|). The L1 to the realized target cannot tell these apart: predicting 0 and
predicting +c both cost |c| on average against a random sign.

Choices: l1 (the L1 head), flow/policy (the flow head's deterministic chunk, fixed noise), flow/zero_noise (the
chunk integrated from the zero noise chunk instead, the alternative deterministic choice), flow/sample (one draw),
rerank (the lowest-energy of N: the policy chunk + N-1 draws, scored in one energy-head call), mean (their
energy-weighted mean), oracle (the draw nearest a mode: the best any selection could do). Each at several Euler step
counts (the same trained flow head). Also the seconds per call of sampling N chunks and scoring them for a batch.
Writes <out>/results.json and prints a markdown table (mean and standard deviation over seeds).
"""

from __future__ import annotations

import argparse
import json
import time
from functools import partial
from pathlib import Path

import torch

H, DA, D = 4, 2, 16
ON_MODE = 0.25  # a chunk is on a mode when its distance to it is below this share of |c|


def train_heads(seed: int, steps: int, batch: int) -> tuple:
    """The L1, flow and energy heads trained on the same seeded bimodal batches."""
    from vla_energy import EnergyHead, EnergyHeadConfig
    from vla_energy.losses.infonce import inbatch_infonce_loss, infonce_loss
    from vla_energy.modeling.action_head import ActionHead, ActionHeadConfig
    from vla_energy.modeling.flow_action_head import FlowActionHead, FlowActionHeadConfig
    from vla_energy.testing.toys import bimodal_chunks

    torch.manual_seed(seed)
    l1 = ActionHead(ActionHeadConfig(hidden_size=D, action_dim=DA, horizon=H, mlp_dim=64))
    flow = FlowActionHead(FlowActionHeadConfig(hidden_size=D, action_dim=DA, horizon=H, mlp_dim=64))
    # A larger init than the default 0.02 skips the long flat start of a tiny head (as tests/test_inference.py).
    energy = EnergyHead(EnergyHeadConfig(context_dim=D, action_dim=DA, horizon=H, hidden_dim=32, num_heads=4,
                                         num_layers=1, initializer_range=0.2))
    opt = torch.optim.AdamW([{"params": l1.parameters(), "lr": 1e-2}, {"params": flow.parameters(), "lr": 1e-2},
                             {"params": energy.parameters(), "lr": 5e-3}])
    g = torch.Generator().manual_seed(seed)
    sigmas = torch.tensor([0.1, 0.2, 0.4])[None, :, None, None]
    for _ in range(steps):
        hidden, target, _ = bimodal_chunks(batch, g, H, DA, D)
        l1_loss = (l1(hidden) - target).abs().mean()
        flow_loss = flow(hidden, target, generator=g).mean()
        pooled, _ = inbatch_infonce_loss(energy(hidden, pool=target), torch.arange(batch), tau=0.3)
        negatives = target[:, None] + sigmas * torch.randn(batch, 3, H, DA, generator=g)
        e = energy(hidden, torch.cat([target[:, None], negatives], dim=1))
        explicit, _ = infonce_loss(e[:, 0], e[:, 1:], tau=0.3)
        opt.zero_grad()
        (l1_loss + flow_loss + pooled + explicit).backward()
        opt.step()
    return l1.eval(), flow.eval(), energy.eval()


def mode_distance(chunks: torch.Tensor, mode: torch.Tensor) -> torch.Tensor:
    """[n(,K)]: mean |chunk -/+ c| to the nearer of the two modes, relative to mean |c| of the row."""
    c = mode[:, None] if chunks.dim() == 4 else mode
    near = torch.minimum((chunks - c).abs().mean((-2, -1)), (chunks + c).abs().mean((-2, -1)))
    return near / mode.abs().mean((-2, -1)).view(-1, *([1] * (near.dim() - 1)))


@torch.no_grad()
def measure(heads: tuple, seed: int, flow_steps: list[int], num_samples: int, n: int) -> dict[str, float]:
    """Distance to the nearest mode and the share on a mode per choice, on n held-out contexts."""
    from vla_energy.inference.candidates import make_candidates
    from vla_energy.inference.rerank import energy_weighted_mean, rerank
    from vla_energy.testing.toys import bimodal_chunks

    l1, flow, energy = heads
    hidden, _, mode = bimodal_chunks(n, torch.Generator().manual_seed(10_000 + seed), H, DA, D)
    out: dict[str, float] = {}

    def record(name: str, chunks: torch.Tensor) -> None:
        d = mode_distance(chunks, mode)
        out[f"{name}/dist"], out[f"{name}/on_mode"] = float(d.mean()), float((d < ON_MODE).float().mean())

    record("l1", l1(hidden))
    cond = flow.condition(hidden)
    for steps in flow_steps:
        policy = flow.integrate(cond, flow.policy_noise(hidden.device).expand(n, H, DA), steps)
        g = torch.Generator().manual_seed(seed)
        cands = make_candidates("samples", policy, num_samples, generator=g, low=None, high=None,
                                sampler=partial(flow.sample, hidden, steps=steps))
        ranked = rerank(energy, hidden, cands)
        record(f"flow{steps}/policy", policy)
        record(f"flow{steps}/zero_noise", flow.integrate(cond, torch.zeros(n, H, DA), steps))
        record(f"flow{steps}/sample", cands[:, 1])
        record(f"flow{steps}/rerank", ranked.best)
        record(f"flow{steps}/mean", energy_weighted_mean(cands, ranked.energies, 0.3))
        best = mode_distance(cands, mode).argmin(dim=1)
        record(f"flow{steps}/oracle", cands[torch.arange(n), best])
        out[f"flow{steps}/rerank_plus_share"] = float(((ranked.best - mode).abs().mean((-2, -1)) <
                                                       (ranked.best + mode).abs().mean((-2, -1))).float().mean())
    return out


@torch.no_grad()
def call_seconds(heads: tuple, batch: int, num_samples: int, steps: int, repeats: int = 5) -> dict[str, float]:
    """Seconds per call for a batch: N flow samples from one condition, and one energy-head call scoring all N."""
    _, flow, energy = heads
    hidden = torch.randn(batch, H, D)
    timings = {}
    for name, fn in (("sample", lambda: flow.sample(hidden, num_samples, steps=steps)),
                     ("score", lambda: energy(hidden, torch.randn(batch, num_samples, H, DA)))):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        timings[f"seconds/{name}_b{batch}_n{num_samples}_steps{steps}"] = (time.perf_counter() - start) / repeats
    return timings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=600, help="training steps of every head")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--flow_steps", type=int, nargs="+", default=[1, 2, 4, 10], help="Euler steps at sampling")
    p.add_argument("--num_samples", type=int, default=16, help="N: the policy chunk + N-1 draws")
    p.add_argument("--eval_contexts", type=int, default=512)
    p.add_argument("--out", default="runs/bench_flow_head")
    args = p.parse_args()
    torch.set_num_threads(1)
    per_seed = []
    for seed in args.seeds:
        start = time.perf_counter()
        heads = train_heads(seed, args.steps, args.batch)
        result = measure(heads, seed, args.flow_steps, args.num_samples, args.eval_contexts)
        result.update(call_seconds(heads, 32, args.num_samples, max(args.flow_steps)))
        per_seed.append(result)
        print(f"seed {seed}: {time.perf_counter() - start:.1f}s")
    keys = list(per_seed[0])
    stats = {k: (float(torch.tensor([r[k] for r in per_seed]).mean()),
                 float(torch.tensor([r[k] for r in per_seed]).std()) if len(per_seed) > 1 else 0.0) for k in keys}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "per_seed": per_seed, "mean_std": stats},
                                                 indent=1))
    print(f"\n{len(args.seeds)} seeds, N = {args.num_samples}, {args.eval_contexts} held-out contexts; distance to the "
          "nearest mode / |c| (lower is better), share on a mode (higher is better)\n")
    print("| choice | Euler steps | distance to nearest mode | on a mode |\n|---|---|---|---|")
    print(f"| l1 head | - | {stats['l1/dist'][0]:.3f} ± {stats['l1/dist'][1]:.3f} | "
          f"{stats['l1/on_mode'][0]:.3f} ± {stats['l1/on_mode'][1]:.3f} |")
    for steps in args.flow_steps:
        for choice in ("policy", "zero_noise", "sample", "rerank", "mean", "oracle"):
            d, m = stats[f"flow{steps}/{choice}/dist"], stats[f"flow{steps}/{choice}/on_mode"]
            print(f"| flow {choice} | {steps} | {d[0]:.3f} ± {d[1]:.3f} | {m[0]:.3f} ± {m[1]:.3f} |")
    for k, (mean, _) in stats.items():
        if k.startswith("seconds/") or k.endswith("plus_share"):
            print(f"{k}: {mean:.4g}")


if __name__ == "__main__":
    main()
