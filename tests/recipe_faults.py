"""The training recipe with an injected fault, run by `accelerate launch` from test_recipe_faults.py.

    recipe_faults.py nan  REPORT_DIR [recipe args]   a NaN loss on the last rank at its 2nd micro-batch; each rank
                                                      writes REPORT_DIR/rank<r>.json: did anything move over the
                                                      skipped step, and over the next (normal) one
    recipe_faults.py kill [recipe args]               SIGKILL of the main process halfway through its 2nd save
    recipe_faults.py ddp REPORT_DIR [recipe args]     each rank writes REPORT_DIR/rank<r>.json: how many DDP
                                                      wrappers are still alive when end_training destroys the group
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
from pathlib import Path

import torch

import vla_energy.training.checkpoints as checkpoint_mod
from vla_energy.modeling.energy_plugin import EnergyPlugin

ROOT = Path(__file__).resolve().parents[1]
NAN_CALL = 2  # 1-based micro-batch index whose loss becomes NaN


def inject_nan(report_dir: Path) -> None:
    """Patch the optimizer (to see every trained parameter) and the plugin's forward (to poison one rank's loss)."""
    optimizers: list[torch.optim.Optimizer] = []

    class CapturedAdamW(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    torch.optim.AdamW = CapturedAdamW
    original = EnergyPlugin.forward
    snapshots: list[dict] = []

    def snapshot(plugin: EnergyPlugin) -> dict:
        groups = optimizers[0].param_groups
        b = plugin.bank
        return {"params": [p.detach().clone() for g in groups for p in g["params"]],
                "lrs": [g["lr"] for g in groups],
                "bank": [b.actions.clone(), b.sample_ids.clone(), torch.tensor(b.count)] if b is not None else []}

    def moved(a: dict, b: dict) -> dict:
        changed = {k: any(not torch.equal(x, y) for x, y in zip(a[k], b[k])) for k in ("params", "bank")}
        return {**changed, "lrs": a["lrs"] != b["lrs"]}

    def forward(self, outputs, batch, group, *args, **kwargs):
        snapshots.append(snapshot(self))
        parts = original(self, outputs, batch, group, *args, **kwargs)
        rank, calls = group.process_index, len(snapshots)
        if calls == NAN_CALL and rank == group.num_processes - 1:
            parts.loss = parts.loss * float("nan")
        if calls == NAN_CALL + 2:
            report = {"over_skipped_step": moved(snapshots[NAN_CALL - 1], snapshots[NAN_CALL]),
                      "over_normal_step": moved(snapshots[NAN_CALL], snapshots[NAN_CALL + 1])}
            (report_dir / f"rank{rank}.json").write_text(json.dumps(report))
        return parts

    EnergyPlugin.forward = forward


def inject_kill() -> None:
    """The main process kills itself after writing the first of its own state files of the 2nd checkpoint."""
    original = checkpoint_mod.save_states
    calls = []

    def save_states(folder, objects):
        calls.append(folder)
        if len(calls) == 2:
            name, obj = next(iter(objects.items()))
            original(folder, {name: obj})
            os.kill(os.getpid(), signal.SIGKILL)
        original(folder, objects)

    checkpoint_mod.save_states = save_states


def report_ddp_at_end(report_dir: Path) -> None:
    """Count live DDP wrappers when end_training is called (a reducer freed later can deadlock gloo at exit)."""
    from accelerate import Accelerator

    original = Accelerator.end_training

    def end_training(self):
        alive = sum(isinstance(o, torch.nn.parallel.DistributedDataParallel) for o in gc.get_objects())
        (report_dir / f"rank{self.process_index}.json").write_text(json.dumps({"ddp_alive": alive}))
        original(self)

    Accelerator.end_training = end_training


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    if mode == "nan":
        inject_nan(Path(rest[0]))
        rest = rest[1:]
    elif mode == "kill":
        inject_kill()
    elif mode == "ddp":
        report_ddp_at_end(Path(rest[0]))
        rest = rest[1:]
    else:
        raise SystemExit(f"unknown mode {mode!r}: nan | kill | ddp")
    from vla_energy.training.train import main

    main(rest)
