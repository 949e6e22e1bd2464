"""fluxrl: reinforcement learning with flow-matching models, in JAX."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy, so `import fluxrl` stays light (no JAX import).
    if name == "load_policy":
        from fluxrl.train.export import load_policy

        return load_policy
    raise AttributeError(f"module 'fluxrl' has no attribute '{name}'")
