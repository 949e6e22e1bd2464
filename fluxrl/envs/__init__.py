"""Environments: `make_env(task_name)` for OGBench single tasks, DMC tasks and Gymnasium's MuJoCo tasks; evaluation
and videos.

MuJoCo picks its OpenGL backend when it is first imported, so MUJOCO_GL is set here (osmesa, which renders
offscreen on any Linux machine with libosmesa6) unless the user chose one; set MUJOCO_GL=egl for GPU rendering.
Without libosmesa6 a headless Linux machine gets MUJOCO_GL=disable (`import mujoco` under MUJOCO_GL=osmesa fails
outright, and left unset GLFW warns about the missing display): simulation, data generation and training need no
rendering, and a video says what to install.
"""

from __future__ import annotations

import ctypes.util
import os
import platform


def default_mujoco_gl(environ=os.environ, find_library=ctypes.util.find_library, system=platform.system()) -> None:
    if "MUJOCO_GL" in environ:
        return
    if find_library("OSMesa"):
        environ["MUJOCO_GL"] = "osmesa"
    elif system == "Linux" and not (environ.get("DISPLAY") or environ.get("WAYLAND_DISPLAY")):
        environ["MUJOCO_GL"] = "disable"


default_mujoco_gl()

from fluxrl.errors import FluxrlError  # noqa: E402
from fluxrl.names import parse_task  # noqa: E402


def make_env(task_name: str, seed: int | None = None, render_size: int | None = None, **kwargs):
    """A gymnasium.Env for a task name (see fluxrl.names), actions in [-1, 1], info['success'] on every step.

    seed: if given, the first reset uses it (later resets continue the env's RNG).
    render_size: width = height of env.render() frames (default: the suite's own size).
    kwargs: passed on to the family's constructor (OGBench: gymnasium.make keyword arguments)."""
    spec = parse_task(task_name)
    if spec.family == "dmc":
        from fluxrl.envs.dmc import make_dmc_env

        if kwargs:
            raise FluxrlError(f"DMC task '{spec.name}' takes no extra options, got {', '.join(sorted(kwargs))}.")
        return make_dmc_env(spec, seed=seed, render_size=render_size)
    if spec.family == "gym":
        from fluxrl.envs.gym_mujoco import make_gym_mujoco_env

        if kwargs:
            raise FluxrlError(f"Gymnasium task '{spec.name}' takes no extra options, got {', '.join(sorted(kwargs))}.")
        return make_gym_mujoco_env(spec, seed=seed, render_size=render_size)
    from fluxrl.envs.ogbench_envs import make_ogbench_env

    return make_ogbench_env(spec, seed=seed, render_size=render_size, **kwargs)


__all__ = ["make_env"]
