"""Test-wide settings: MuJoCo's offscreen backend is chosen (fluxrl.envs) before dm_control/ogbench pick one."""

import fluxrl.envs  # noqa: F401
