"""Test-wide settings: MuJoCo's offscreen backend is chosen (fluxrl.envs) before dm_control/ogbench pick one;
tests marked `mujoco_render` skip where that backend cannot render."""

import ctypes.util
import os

import pytest

import fluxrl.envs  # noqa: F401

OSMESA_MISSING = (os.environ.get("MUJOCO_GL", "osmesa") in ("osmesa", "disable")
                  and ctypes.util.find_library("OSMesa") is None)


def pytest_collection_modifyitems(config, items):
    if not OSMESA_MISSING:
        return
    skip = pytest.mark.skip(reason="libOSMesa is not installed: MuJoCo cannot render offscreen here")
    for item in items:
        if "mujoco_render" in item.keywords:
            item.add_marker(skip)
