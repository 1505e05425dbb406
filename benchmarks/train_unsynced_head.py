"""The seeds' setup, for the learning benchmark only: the training recipe with the energy head kept out of DDP.

    accelerate launch --multi_gpu --num_processes 8 benchmarks/train_unsynced_head.py --config ... [options]

Every rank then trains its own energy head from its own local batches and the copies drift apart; the benchmark
measures what that costs. Nothing in the package offers this: a head left out of DDP is a bug, not an option.
"""

from __future__ import annotations

from accelerate import Accelerator
from torch.nn.parallel import DistributedDataParallel

from vla_energy.modeling.energy_vla_model import EnergyVLAModel
from vla_energy.training.train import main

_prepare = Accelerator.prepare


def prepare_without_energy_head(self: Accelerator, *args, **kwargs):
    """Accelerator.prepare, except that DDP ignores the EnergyVLAModel's energy head (no gradient all-reduce)."""
    for arg in args:
        if isinstance(arg, EnergyVLAModel):
            names = [f"plugin.energy_head.{n}" for n, _ in arg.plugin.energy_head.named_parameters()]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(arg, names)
    return _prepare(self, *args, **kwargs)


if __name__ == "__main__":
    Accelerator.prepare = prepare_without_energy_head
    main()
