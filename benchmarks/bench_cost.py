"""Per-rank cost of one global InfoNCE step (ours vs the seed 002 recipe) and of candidate scoring.

    python benchmarks/bench_cost.py [--seq 256 --dim 1024 --local_batch 3 --worlds 2 4 8 --ks 8 32 128]

Every variant runs in a fresh subprocess (one process per measurement): time is the median of `--repeats`
forward+backward passes after one warm-up, peak memory is the growth of the process's max RSS
(resource.getrusage) over the baseline taken after the inputs were built. Ratios are the point: both variants
run on the same machine in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from vla_energy import EnergyHead, EnergyHeadConfig

H, DA = 8, 7


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _head(dim: int, hidden: int) -> EnergyHead:
    torch.manual_seed(0)
    return EnergyHead(EnergyHeadConfig(context_dim=dim, action_dim=DA, horizon=H, hidden_dim=hidden, num_heads=4,
                                       num_layers=2))


def measure(variant: str, world: int, b: int, seq: int, dim: int, hidden: int, k: int, repeats: int) -> dict:
    """One variant, in this process: median fwd+bwd seconds and peak RSS growth."""
    head = _head(dim, hidden)
    n = world * b
    g = torch.Generator().manual_seed(0)
    if variant == "ours":
        # Rank r: its b contexts against all N gathered action chunks, one b x N block.
        ctx = torch.randn(b, seq, dim, generator=g)
        pool = torch.randn(n, H, DA, generator=g)

        def step():
            e = head(ctx, pool=pool)
            torch.nn.functional.cross_entropy(-e / 0.3, torch.arange(b)).backward()

        gathered = n * H * DA * 4 + n * H + n * 8  # actions (float32) + action mask (bool) + sample ids (int64)
    elif variant == "seed":
        # Seed 002: gather hidden states [N,S,D]; every rank builds the full N x N pair batch by copying contexts.
        ctx = torch.randn(n, seq, dim, generator=g)
        acts = torch.randn(n, H, DA, generator=g)

        def step():
            h_rep = ctx.unsqueeze(1).expand(n, n, seq, dim).reshape(n * n, seq, dim)
            a_rep = acts.unsqueeze(0).expand(n, n, H, DA).reshape(n * n, H, DA)
            e = head(h_rep, a_rep).view(n, n)
            torch.nn.functional.cross_entropy(-e / 0.3, torch.arange(n)).backward()

        gathered = n * seq * dim * 4 + n * H * DA * 4 + n * seq  # hidden states + actions + pad mask
    elif variant in ("once", "expand"):
        ctx = torch.randn(b, seq, dim, generator=g)
        cands = torch.randn(b, k, H, DA, generator=g)

        def step():
            if variant == "once":  # context encoded once, K candidates in the query dimension
                e = head(ctx, cands)
            else:  # the context copied per candidate
                e = head(ctx.repeat_interleave(k, dim=0), cands.reshape(b * k, H, DA)).view(b, k)
            e.sum().backward()

        gathered = 0
    else:
        raise ValueError(variant)
    base = _rss_mb()
    step()  # warm-up (also allocates the peak)
    head.zero_grad()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        head.zero_grad()
    return {"variant": variant, "world": world, "b": b, "k": k, "seconds": statistics.median(times),
            "peak_mb": _rss_mb() - base, "bytes_gathered": gathered}


def run_isolated(**kw) -> dict:
    """Run `measure` in a fresh Python process so that peak RSS belongs to this variant only."""
    args = [sys.executable, __file__, "--child", json.dumps(kw)]
    out = subprocess.run(args, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS":
                                                                              os.environ.get("OMP_NUM_THREADS", "2")})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128, help="energy head width (the plugin's default)")
    p.add_argument("--local_batch", type=int, default=3)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--ks", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--cand_batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(measure(**json.loads(a.child))))
        return
    common = dict(seq=a.seq, dim=a.dim, hidden=a.hidden, repeats=a.repeats)
    results = {"global": [], "candidates": [], "settings": vars(a)}
    print(f"global InfoNCE step per rank, b={a.local_batch}, S={a.seq}, D={a.dim}")
    print("| W | N | ours s | seed s | time ratio | ours MB | seed MB | memory ratio | bytes gathered ours | seed | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for w in a.worlds:
        ours = run_isolated(variant="ours", world=w, b=a.local_batch, k=0, **common)
        seed = run_isolated(variant="seed", world=w, b=a.local_batch, k=0, **common)
        results["global"].append({"ours": ours, "seed": seed})
        print(f"| {w} | {w * a.local_batch} | {ours['seconds']:.4f} | {seed['seconds']:.3f} | "
              f"{seed['seconds'] / ours['seconds']:.0f}x | {ours['peak_mb']:.0f} | {seed['peak_mb']:.0f} | "
              f"{seed['peak_mb'] / max(ours['peak_mb'], 1.0):.0f}x | {ours['bytes_gathered']:,} | "
              f"{seed['bytes_gathered']:,} | {seed['bytes_gathered'] / ours['bytes_gathered']:.0f}x |")
    print(f"\ncandidate scoring, B={a.cand_batch}, S={a.seq}, D={a.dim}")
    print("| K | once s | expand s | time ratio | once MB | expand MB | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for k in a.ks:
        once = run_isolated(variant="once", world=1, b=a.cand_batch, k=k, **common)
        expand = run_isolated(variant="expand", world=1, b=a.cand_batch, k=k, **common)
        results["candidates"].append({"once": once, "expand": expand})
        print(f"| {k} | {once['seconds']:.4f} | {expand['seconds']:.3f} | {expand['seconds'] / once['seconds']:.1f}x | "
              f"{once['peak_mb']:.0f} | {expand['peak_mb']:.0f} | {expand['peak_mb'] / max(once['peak_mb'], 1.0):.1f}x |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
