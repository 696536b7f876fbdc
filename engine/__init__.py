"""The model-agnostic training engine: config, distributed setup, parallelism, precision, flow
matching, trainer, checkpointing, metrics, judge, data and the embedded toy world."""

__version__ = "0.1.0"
