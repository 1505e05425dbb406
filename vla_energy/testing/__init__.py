"""Tiny offline backbones for the tests and the demo; never imported by a run on a real checkpoint."""
