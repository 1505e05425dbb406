"""Test utilities (small LeRobot datasets, a Prismatic-style model with custom code); never imported by library code."""
