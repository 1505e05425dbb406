"""Finetune a VLA backbone with LoRA, an action head and an energy head trained by global InfoNCE.

    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/train_energy.py --config demo

The training loop itself lives in the package, so that a pip-installed vla_energy runs it too
(`accelerate launch -m vla_energy.training.train --config my.yaml`, or `vla-energy train --config my.yaml`):
read it in vla_energy/training/train.py. Every option is a field of the dataclasses in
vla_energy/training/arguments.py (YAML keys and --flags alike).
"""

from vla_energy.training.train import main

if __name__ == "__main__":
    main()
