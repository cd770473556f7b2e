"""raysweep: Ray-distributed hyperparameter sweeps for machine unlearning of LLMs."""

__version__ = "0.1.0"
