"""Test-wide settings: MuJoCo's offscreen backend is chosen (fluxrl.envs) before dm_control/ogbench pick one;
tests marked `mujoco_render` skip where that backend cannot render; matmuls run at full float32 on any backend."""

import ctypes.util
import os

import jax
import pytest

import fluxrl.envs  # noqa: F401

# The tests compare computations that are equal in exact arithmetic (vmapped vs per seed, fused vs looped) at
# float32 tolerances. JAX's default matmul precision is TF32 on NVIDIA GPUs (~1e-3 relative), which fails those
# comparisons without any bug; full float32 makes the suite mean the same on a GPU as on a CPU, where it is the
# default already. Training keeps JAX's default (docs/training.md, "Performance (GPU)").
jax.config.update("jax_default_matmul_precision", "highest")

OSMESA_MISSING = (os.environ.get("MUJOCO_GL", "osmesa") in ("osmesa", "disable")
                  and ctypes.util.find_library("OSMesa") is None)


def pytest_collection_modifyitems(config, items):
    if not OSMESA_MISSING:
        return
    skip = pytest.mark.skip(reason="libOSMesa is not installed: MuJoCo cannot render offscreen here")
    for item in items:
        if "mujoco_render" in item.keywords:
            item.add_marker(skip)
