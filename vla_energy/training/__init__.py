"""Training: the plugin, arguments, schedule, checkpoints, the Trainer integration and the training loop."""
