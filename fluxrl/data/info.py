"""`fluxrl data info`: a readable report of a dataset file (format, fields, episodes, rewards, metadata)."""

from __future__ import annotations

import numpy as np

from fluxrl.data.dataset import episode_bounds
from fluxrl.data.io import read_dataset

_FORMAT_NAMES = {
    "ogbench": "OGBench npz",
    "d4rl": "D4RL-style hdf5",
    "flat": "flat hdf5",
    "minari": "Minari dataset directory",
    "exorl": "ExORL episode directory",
}
_LAYOUT_NAMES = {
    "raw": "raw OGBench layout: each episode's states s_0..s_T in T + 1 rows",
    "regular": "regular form: one row per transition with next_observations",
    "compact": "compact form: one row per state, valids = 0 on each episode's last state",
    "episodes": "one record per episode, converted to the regular form",
}


def dataset_info(path, format: str = "auto") -> str:
    """Report on the dataset at `path`, as the training code sees it (the regular form)."""
    found = read_dataset(path, format=format)
    data = found.data
    n = len(data["observations"])
    lines = [
        f"dataset: {path}",
        f"format: {_FORMAT_NAMES[found.format]} ({_LAYOUT_NAMES[found.layout]})",
    ]
    first, last = episode_bounds(data["terminals"])
    starts = np.unique(first)
    lengths = np.unique(last) - starts + 1
    lines.append(
        f"transitions: {n:,} in {len(starts):,} episodes "
        f"(length min {lengths.min():,} / mean {lengths.mean():,.1f} / max {lengths.max():,})"
    )
    lines.append("fields (regular form):")
    width = max(len(k) for k in data)
    for key in sorted(data, key=_field_order):
        value = data[key]
        lines.append(f"  {key:<{width}}  {str(value.shape):<18} {str(value.dtype):<8}{_range(value)}")
    if "rewards" in data:
        lines += _reward_lines(data, starts)
    if "masks" in data:
        terminations = int(np.sum(data["masks"] < 0.5))
        lines.append(f"masks: {terminations:,} transitions end in a termination (masks = 0), "
                     f"{100.0 * terminations / n:.2f}%")
    if found.meta:
        lines.append("metadata:")
        for key, value in sorted(found.meta.items()):
            lines.append(f"  {key}: {_short(value)}")
    return "\n".join(lines)


def _field_order(key: str):
    canonical = ("observations", "actions", "next_observations", "rewards", "masks", "terminals", "valids")
    return (canonical.index(key), key) if key in canonical else (len(canonical), key)


def _range(value: np.ndarray) -> str:
    if value.size == 0 or value.dtype.kind not in "fiub":
        return ""
    return f"  [{_num(value.min())}, {_num(value.max())}]"


def _num(x) -> str:
    x = float(x)
    return f"{x:.0f}" if x == int(x) and abs(x) < 1e12 else f"{x:.4g}"


def _reward_lines(data, starts) -> list[str]:
    rewards = np.asarray(data["rewards"], np.float64)
    lines = [f"rewards: mean {rewards.mean():.4g}, std {rewards.std():.4g}, "
             f"min {_num(rewards.min())}, max {_num(rewards.max())}"]
    distinct = np.unique(rewards)
    if len(distinct) <= 8:
        counts = [f"{_num(v)}: {int(np.sum(rewards == v)):,}" for v in distinct]
        lines.append("  values: " + ", ".join(counts))
    returns = np.add.reduceat(rewards, starts)
    lines.append(f"  return per episode: mean {returns.mean():.4g}, min {_num(returns.min())}, "
                 f"max {_num(returns.max())}")
    if _looks_like_ogbench_singletask(data, rewards):
        success = rewards == 0
        reached = np.maximum.reduceat(success, starts)
        lines.append(
            f"success (OGBench single-task: reward 0, masks 0): {100.0 * success.mean():.2f}% of transitions; "
            f"{100.0 * reached.mean():.1f}% of episodes reach it"
        )
    return lines


def _looks_like_ogbench_singletask(data, rewards: np.ndarray) -> bool:
    """OGBench single-task rewards are (#satisfied subtasks - #subtasks) <= 0, success exactly at reward 0, and
    masks = 0 exactly there."""
    if "masks" not in data or rewards.max() > 0 or not np.all(rewards == np.round(rewards)):
        return False
    return bool(np.array_equal(rewards == 0, data["masks"] < 0.5))


def _short(value, limit: int = 200) -> str:
    text = np.array2string(value, threshold=8) if isinstance(value, np.ndarray) else str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
