"""bench: a hyperparameter-search benchmarking harness for small CNNs."""

__version__ = "0.1.0"
