"""Evaluation: ranking metrics, reports and plots, the `vla-energy` command line."""
