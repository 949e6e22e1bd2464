"""Test-wide settings: MuJoCo's offscreen backend is chosen (fluxrl.envs) before dm_control/ogbench pick one;
tests marked `mujoco_render` skip where that backend cannot render; matmuls run at full float32 on any backend;
each test module's compiled code is released when the module ends."""

import ctypes.util
import gc
import os

import jax
import pytest

import fluxrl.envs  # noqa: F401

# The tests compare computations that are equal in exact arithmetic (vmapped vs per seed, fused vs looped) at
# float32 tolerances. JAX's default matmul precision is TF32 on NVIDIA GPUs (~1e-3 relative), which fails those
# comparisons without any bug; full float32 makes the suite mean the same on a GPU as on a CPU, where it is the
# default already. Training keeps JAX's default (docs/training.md, "Performance (GPU)").
jax.config.update("jax_default_matmul_precision", "highest")

# fluxrl.envs chose the backend above: `disable` where libOSMesa is missing on a headless machine. A user's
# MUJOCO_GL=disable renders nothing either, and MUJOCO_GL=osmesa needs the library.
MUJOCO_GL = os.environ.get("MUJOCO_GL")
CANNOT_RENDER = MUJOCO_GL == "disable" or (MUJOCO_GL == "osmesa" and ctypes.util.find_library("OSMesa") is None)


def pytest_collection_modifyitems(config, items):
    if not CANNOT_RENDER:
        return
    skip = pytest.mark.skip(reason=f"MuJoCo cannot render offscreen with MUJOCO_GL={MUJOCO_GL} (osmesa needs "
                                   "Debian's libosmesa6)")
    for item in items:
        if "mujoco_render" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """JAX keeps every compiled executable for the life of the process (one process running the agent contract
    tests grew by 1.8 GB over 170 tests); freeing them per module bounds a long-lived xdist worker's memory."""
    yield
    jax.clear_caches()
    gc.collect()
