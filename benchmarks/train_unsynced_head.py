"""The seeds' setup, for the learning benchmark only: the training recipe with the energy head kept out of DDP.

    accelerate launch --multi_gpu --num_processes 8 benchmarks/train_unsynced_head.py --config ... [options]

Every rank then trains its own energy head from its own local batches and the copies drift apart; the benchmark
measures what that costs. Nothing in the package offers this: a head left out of DDP is a bug, not an option.
"""

from __future__ import annotations

from accelerate import Accelerator

from vla_energy.modeling.modeling_energy_head import EnergyHead
from vla_energy.training.train import main

_prepare = Accelerator.prepare


def prepare_without_energy_head(self: Accelerator, *args, **kwargs):
    """Accelerator.prepare, except that an EnergyHead only moves to the device (no DDP wrapper)."""
    if len(args) == 1 and isinstance(args[0], EnergyHead):
        return args[0].to(self.device)
    return _prepare(self, *args, **kwargs)


if __name__ == "__main__":
    Accelerator.prepare = prepare_without_energy_head
    main()
