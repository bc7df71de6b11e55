"""CMATH: the model, its data layer and its training loop.

`import cmath_model` (and its config and data modules) imports no torch: each name below loads
its module when first used, so a sweep's planning layer can read configs and check data files
without it. The training function is `cmath_model.train.train`: the package's attribute
`train` is that module, as Python's import system sets it.
"""

from importlib import import_module

_HOMES = {"CMATHConfig": "config", "default_config": "config", "load_config": "config", "paper_defaults": "config",
          "recipe_defaults": "config", "Dataset": "data", "load_dataset": "data", "inspect_dataset": "data",
          "write_dataset": "data", "CMATHError": "errors", "ConfigError": "errors", "DataError": "errors",
          "NonFiniteLossError": "errors", "CMATH": "model", "Trainer": "train"}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'cmath_model' has no attribute {name!r}")
