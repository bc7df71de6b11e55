"""Sweep errors: one line each, naming the thing and the fix (printed by the CLI, exit 2)."""

from cmath_model.errors import CMATHError


class SpaceError(CMATHError, ValueError):
    """A search-space YAML file is malformed or names something the model does not have."""


class SweepError(CMATHError, RuntimeError):
    """A sweep cannot start or continue: its name, resources, cluster or tracking store."""
