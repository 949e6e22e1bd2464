"""Test-wide settings: offscreen MuJoCo rendering on CPU machines, set before dm_control/ogbench pick a backend."""

import os

os.environ.setdefault("MUJOCO_GL", "osmesa")
