"""Step time and peak memory: the one-module loop (EnergyVLAModel, one prepare) against a separate-modules loop
(backbone, action head, energy head prepared one by one, loss by the plugin's forward), on CPU, side by side.

    OMP_NUM_THREADS=1 python benchmarks/bench_one_model.py [--steps 10 --rounds 3]

Each round runs both layouts in fresh child processes, one after the other (alternating which goes first), so
that peak RSS is per layout; the printout is the ratio one-module / separate of the median step time and of the
peak RSS. One process (world 1): the layouts differ only in how the modules are held and called.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def run(layout: str, steps: int) -> dict[str, float]:
    """Train `steps` steps (after 2 warm-up steps) in this process; median step seconds and peak RSS (MiB)."""
    import torch
    from accelerate import Accelerator

    from vla_energy.backbones.loading import load_backbone
    from vla_energy.backbones.lora import LoraArguments, apply_lora
    from vla_energy.backbones.param_groups import param_groups
    from vla_energy.backbones.readout import backbone_inputs, hidden_size_of
    from vla_energy.data import DataConfig, VLACollator, build_datasets
    from vla_energy.modeling.configuration_energy import EnergyArguments
    from vla_energy.modeling.energy_plugin import EnergyPlugin
    from vla_energy.modeling.energy_vla_model import EnergyVLAModel

    torch.manual_seed(0)
    train_ds, _, _ = build_datasets(DataConfig(dataset="synthetic", num_episodes=12, horizon=8), progress=False)
    loaded = load_backbone("tiny-llava")
    backbone = apply_lora(loaded.model, LoraArguments(lora_r=8))
    plugin = EnergyPlugin(EnergyArguments(strategy="combined", bank_size=64), hidden_size_of(loaded.model),
                          len(train_ds[0]["actions"][0]), 8, loaded.action_token_id)
    collator = VLACollator(loaded.processor, horizon=8, action_token=loaded.action_token)
    batches = [collator([train_ds[i] for i in range(k * 8, k * 8 + 8)]) for k in range(steps + 2)]
    accelerator = Accelerator(cpu=True)
    plugin.setup(accelerator, 8)
    optimizer = torch.optim.AdamW(param_groups(backbone, plugin.policy_modules(), plugin.energy_modules(), 1e-4))
    if layout == "one":
        model, optimizer = accelerator.prepare(EnergyVLAModel(backbone, plugin), optimizer)

        def step(batch):
            return model(**batch).loss
    else:
        backbone = accelerator.prepare(backbone)
        plugin.action_head = accelerator.prepare(plugin.action_head)
        plugin.energy_head = accelerator.prepare(plugin.energy_head)
        optimizer = accelerator.prepare(optimizer)

        def step(batch):
            out = backbone(**backbone_inputs(batch), output_hidden_states=True)
            return plugin(out, batch, accelerator).loss
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        accelerator.backward(step(batch))
        optimizer.step()
        optimizer.zero_grad()
        plugin.after_optimizer_step()
        if i >= 2:
            times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(times), "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["one", "separate"])
    a = parser.parse_args()
    if a.child:
        print(json.dumps(run(a.child, a.steps)))
        return
    results: dict[str, list[dict]] = {"one": [], "separate": []}
    for r in range(a.rounds):
        for layout in (("one", "separate") if r % 2 == 0 else ("separate", "one")):
            out = subprocess.run([sys.executable, __file__, "--child", layout, "--steps", str(a.steps)],
                                 capture_output=True, text=True, check=True)
            results[layout].append(json.loads(out.stdout.strip().splitlines()[-1]))
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("step_s", "peak_mib")} for k, v in results.items()}
    print(json.dumps({"rounds": a.rounds, "steps": a.steps, "median": med,
                      "ratio_step_time_one_over_separate": med["one"]["step_s"] / med["separate"]["step_s"],
                      "ratio_peak_rss_one_over_separate": med["one"]["peak_mib"] / med["separate"]["peak_mib"]},
                     indent=1))


if __name__ == "__main__":
    main()
