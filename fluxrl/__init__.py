"""fluxrl: reinforcement learning with flow-matching models, in JAX."""

__version__ = "0.1.0"
