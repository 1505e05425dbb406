"""Finetune a VLA backbone with LoRA, an action head and an energy head trained by global InfoNCE.

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/train_energy.py --config demo

The training loop itself lives in the package, so that a pip-installed vla_energy runs it too
(`accelerate launch -m vla_energy.training.train --config my.yaml`, or `vla-energy train --config my.yaml`):
read it in vla_energy/training/train.py. Every option is a field of the dataclasses that
vla_energy/training/arguments.py parses (the energy options: EnergyArguments in
vla_energy/modeling/configuration_energy.py), YAML keys and --flags alike; docs/configuration.md lists them.
"""

import sys

from vla_energy.training.train import run

if __name__ == "__main__":
    sys.exit(run())
