"""CMATH: the model, its data layer and its training loop."""

from .config import CMATHConfig, default_config, load_config, paper_defaults, recipe_defaults
from .data import Dataset, load_dataset, write_dataset
from .errors import CMATHError, ConfigError, DataError, NonFiniteLossError
from .model import CMATH
from .train import Trainer, train

__all__ = ["CMATH", "CMATHConfig", "CMATHError", "ConfigError", "DataError", "Dataset", "NonFiniteLossError",
           "Trainer", "default_config", "load_config", "load_dataset", "paper_defaults", "recipe_defaults", "train",
           "write_dataset"]
