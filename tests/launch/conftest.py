"""Fixtures for tests/launch (defined in launch_helpers.py, a uniquely named module the tests import)."""

from launch_helpers import free_port, slurm, workdir  # noqa: F401
