"""fluxrl: reinforcement learning with flow-matching models, in JAX."""

import os
from importlib import metadata

__version__ = "0.1.0"

# XLA:CPU in jaxlib 0.10 hands reductions (bias gradients, LayerNorm statistics) to YNNPACK, where beside
# YNNPACK's matmuls they ran ~10x slower than alone: on 2 cores a 1-seed update of FQL, IQL, ReBRAC, FlowQ, GFP,
# QAM or Decision Flow was 17-41% slower than with XLA's own reductions (benchmarks/README.md, "XLA's YNNPACK
# reductions"). Only for the jaxlib measured (a flag that jaxlib does not know aborts the process), never over
# the user's own setting, and in effect only where fluxrl is imported before JAX starts its CPU backend.
YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FLAG_JAXLIB = "0.10."


def with_xla_reductions(flags: str, jaxlib: str | None) -> str:
    """XLA_FLAGS `flags` with YNNPACK's reductions turned off, where jaxlib `jaxlib` is measured and the user has
    not chosen (`--xla_cpu_experimental_ynn_fusion_type=+reduce` restores XLA's default)."""
    if YNN_FLAG in flags or jaxlib is None or not jaxlib.startswith(YNN_FLAG_JAXLIB):
        return flags
    return f"{flags} {YNN_FLAG}=-reduce".strip()


def installed_version(package: str) -> str | None:
    """`package`'s installed version, or None where it has no package metadata (e.g. a source checkout on
    PYTHONPATH)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


if _flags := with_xla_reductions(os.environ.get("XLA_FLAGS", ""), installed_version("jaxlib")):
    os.environ["XLA_FLAGS"] = _flags


def __getattr__(name):
    # Lazy, so `import fluxrl` stays light (no JAX import).
    if name == "load_policy":
        from fluxrl.train.export import load_policy

        return load_policy
    raise AttributeError(f"module 'fluxrl' has no attribute '{name}'")
