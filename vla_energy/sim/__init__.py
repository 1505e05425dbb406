"""Closed-loop evaluation in Meta-World (the `sim` extra: `pip install vla_energy[sim]`).

`vla_energy.sim.demos` writes scripted-expert demonstrations as a LeRobot v3.0 dataset, `vla_energy.sim.rollout`
runs a trained policy in the simulator; `vla_energy.sim.stats` (success-rate intervals) needs no extra. Meta-World is
imported only when an environment is made.
"""

from vla_energy.sim.stats import paired_bootstrap_interval, wilson_interval

__all__ = ["paired_bootstrap_interval", "wilson_interval"]
