"""scopeforge library: configs, storage, models and the algorithms, in plain torch/numpy (no Ray import)."""

__version__ = "0.1.0"
