"""Rendering and writing videos (.mp4 through imageio-ffmpeg, .gif through Pillow), written atomically.

Several episodes are either tiled side by side in a grid (each tile holds its last frame once its episode ends)
or played one after another.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Sequence

import numpy as np

from fluxrl.data.dataset import atomic_write
from fluxrl.errors import FluxrlError

VIDEO_EXTENSIONS = (".mp4", ".gif")
LAYOUTS = ("tile", "sequential")


def check_video_path(path: str) -> None:
    """Fail early (before any episode runs) on a path imageio cannot write."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in VIDEO_EXTENSIONS:
        raise FluxrlError(f"Video path '{path}' must end with .mp4 or .gif.")


def render_frame(env) -> np.ndarray:
    """env.render() as an (H, W, 3) uint8 array, or one clear FluxrlError if offscreen rendering is impossible."""
    try:
        frame = env.render()
    except Exception as e:  # the GL backends fail with many exception types (ImportError, OSError, GLError...)
        backend = os.environ.get("MUJOCO_GL", "<unset>")
        raise FluxrlError(
            f"Offscreen rendering failed with MUJOCO_GL={backend} ({type(e).__name__}: {e}); install libosmesa6 "
            f"(fluxrl then selects it) or set MUJOCO_GL=egl on a GPU machine before Python imports mujoco."
        ) from None
    if frame is None:
        raise FluxrlError("The environment returned no frame from render(); was it made with a render size?")
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[-1] < 3:
        raise FluxrlError(f"Expected an (H, W, 3) RGB frame from render(), got shape {frame.shape}.")
    return np.ascontiguousarray(frame[..., :3]).astype(np.uint8, copy=False)


def compose(episodes: Sequence[Sequence[np.ndarray]], layout: str = "tile") -> list[np.ndarray]:
    """Frames of several episodes -> one frame sequence (grid of tiles, or episodes in sequence)."""
    if layout not in LAYOUTS:
        raise FluxrlError(f"Unknown video layout '{layout}'; choose one of {', '.join(LAYOUTS)}.")
    episodes = [list(ep) for ep in episodes if len(ep)]
    if not episodes:
        raise FluxrlError("No frames to write.")
    if layout == "sequential" or len(episodes) == 1:
        return [f for ep in episodes for f in ep]
    h, w, c = episodes[0][0].shape
    cols = math.ceil(math.sqrt(len(episodes)))
    rows = math.ceil(len(episodes) / cols)
    frames = []
    for t in range(max(len(ep) for ep in episodes)):
        canvas = np.zeros((rows * h, cols * w, c), np.uint8)
        for k, ep in enumerate(episodes):
            r, col = divmod(k, cols)
            canvas[r * h : (r + 1) * h, col * w : (col + 1) * w] = ep[min(t, len(ep) - 1)]
        frames.append(canvas)
    return frames


def write_video(path: str, frames: Sequence[np.ndarray], fps: float = 20.0, overwrite: bool = True) -> None:
    """Write frames (H, W, 3) uint8 to .mp4 (H.264) or .gif, chosen by the extension of `path`."""
    check_video_path(path)
    if not len(frames):
        raise FluxrlError(f"No frames to write to {path}.")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".mp4":
        # H.264 with yuv420p needs even sizes: pad by one black pixel where needed (never resize).
        h, w = frames[0].shape[:2]
        pad = ((0, h % 2), (0, w % 2), (0, 0))
        frames = [np.pad(f, pad) for f in frames] if any(p[1] for p in pad) else list(frames)

    def write(tmp):
        import imageio.v2 as imageio

        if ext == ".mp4":
            with warnings.catch_warnings():
                # JAX warns at every fork; imageio's ffmpeg child execs at once (fork_exec), so nothing can deadlock.
                warnings.filterwarnings("ignore", message=r"os\.fork\(\) was called", category=RuntimeWarning)
                with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", macro_block_size=1) as w:
                    for f in frames:
                        w.append_data(f)
        else:
            from PIL import Image

            images = [Image.fromarray(f) for f in frames]
            images[0].save(
                tmp, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0
            )

    atomic_write(path, write, overwrite=overwrite)
