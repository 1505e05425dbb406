"""Closed-loop evaluation in Meta-World (the `sim` extra: `pip install vla_energy[sim]`) and on the built-in
synthetic task (no extra).

`vla_energy.sim.demos` writes scripted-expert demonstrations as a LeRobot v3.0 dataset (with `--routes`, experts
that take one of several routes), `vla_energy.sim.rollout` runs a trained policy in the simulator, or in
`vla_energy.sim.synthetic_env` for a run trained on the synthetic dataset (success rates with the intervals of
`vla_energy.evaluation.intervals`). Meta-World is imported only when an environment is made.
"""
