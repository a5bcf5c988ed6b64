"""edgetune: hardware-in-the-loop hyperparameter tuning for edge vision models."""

__version__ = "0.1.0"
