"""The canonical dataset: a flat dict of numpy arrays with OGBench's field names.

Two in-memory forms, both with one row per transition:

regular   observations, actions, next_observations, terminals  (+ rewards, masks, info keys)
compact   observations, actions, terminals, valids               (+ rewards, masks, info keys)
          next_observations[i] is observations[i + 1]; rows with valids == 0 are the last state of an
          episode and carry no valid action (OGBench's compact_dataset=True layout; halves pixel memory).

Field semantics (the glossary; see docs/data.md):
- terminals[i] = 1: the dataset's episode ends after transition i (time-out or real end). Nothing pairs row i
  with row i + 1 across it. In the compact form the invalid last row has terminals = 1 too.
- masks[i] = 0: the environment truly terminated at s'_i (e.g. OGBench task success); do not bootstrap.
  A time-out is not a termination.
- rewards[i]: reward of transition i.

On disk, OGBench npz files use the *raw* layout: each episode stores its T + 1 states s_0..s_T in consecutive
rows, the last row's action is meaningless, and terminals = 1 marks that last row. `raw_to_regular` and
`raw_to_compact` do exactly what ogbench.utils.load_dataset does; `regular_to_raw` inverts it.
"""

from __future__ import annotations

import os
import uuid
from typing import Mapping

import numpy as np

from fluxrl.errors import FluxrlError

Dataset = dict  # dict[str, np.ndarray]

TRANSITION_KEYS = ("observations", "actions", "terminals")
# Per-state info keys whose value at s' is also kept in the regular form as `next_<key>` (DMC rewards are a
# function of the physics state after the step).
NEXT_INFO_KEYS = ("physics",)
FLOAT_KEYS = ("actions", "rewards", "masks", "terminals", "valids")


def num_transitions(data: Mapping[str, np.ndarray]) -> int:
    return int(len(data["observations"]))


def is_compact(data: Mapping[str, np.ndarray]) -> bool:
    return "next_observations" not in data


def episode_bounds(terminals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First and last row index of each row's episode, from terminals (episode ends after a row with 1).

    The final row always closes an episode, whatever its flag says."""
    n = len(terminals)
    ends = np.flatnonzero(np.asarray(terminals) > 0.5)
    if n and (len(ends) == 0 or ends[-1] != n - 1):
        ends = np.append(ends, n - 1)
    starts = np.concatenate([[0], ends[:-1] + 1]) if n else np.zeros(0, np.int64)
    lengths = ends - starts + 1
    first = np.repeat(starts, lengths).astype(np.int32)
    last = np.repeat(ends, lengths).astype(np.int32)
    return first, last


def num_episodes(data: Mapping[str, np.ndarray]) -> int:
    t = np.asarray(data["terminals"])
    if is_compact(data):
        t = t * np.asarray(data["valids"])  # count each episode once: its last valid row
        return int(np.sum(t > 0.5)) + int(len(t) > 0 and data["valids"][-1] > 0.5 and t[-1] < 0.5)
    return int(np.sum(t > 0.5)) + int(len(t) > 0 and t[-1] < 0.5)


def raw_to_regular(raw: Mapping[str, np.ndarray]) -> Dataset:
    """OGBench raw layout -> regular form. Per-row keys other than observations are taken at the state s."""
    terminals = np.asarray(raw["terminals"], np.float32)
    ob_mask = terminals < 0.5
    next_mask = np.concatenate([[False], ob_mask[:-1]])
    out = {k: np.asarray(v)[ob_mask] for k, v in raw.items() if k != "terminals" and _is_per_row(v, len(terminals))}
    out["next_observations"] = np.asarray(raw["observations"])[next_mask]
    for key in NEXT_INFO_KEYS:
        if key in raw:
            out[f"next_{key}"] = np.asarray(raw[key])[next_mask]
    out["terminals"] = np.concatenate([terminals[1:], [1.0]]).astype(np.float32)[ob_mask]
    return out


def raw_to_compact(raw: Mapping[str, np.ndarray]) -> Dataset:
    """OGBench raw layout -> compact form (every row kept; valids = 0 on each episode's last state)."""
    terminals = np.asarray(raw["terminals"], np.float32)
    out = {k: np.asarray(v) for k, v in raw.items() if _is_per_row(v, len(terminals))}
    out["valids"] = (1.0 - terminals).astype(np.float32)
    shifted = np.concatenate([terminals[1:], [1.0]])
    out["terminals"] = np.minimum(terminals + shifted, 1.0).astype(np.float32)
    return out


def compact_to_regular(data: Mapping[str, np.ndarray]) -> Dataset:
    valid = np.asarray(data["valids"]) > 0.5
    next_valid = np.concatenate([[False], valid[:-1]])
    out = {k: np.asarray(v)[valid] for k, v in data.items() if k != "valids"}
    out["next_observations"] = np.asarray(data["observations"])[next_valid]
    for key in NEXT_INFO_KEYS:
        if key in data:
            out[f"next_{key}"] = np.asarray(data[key])[next_valid]
    return out


def regular_to_raw(data: Mapping[str, np.ndarray]) -> Dataset:
    """Regular form -> OGBench raw layout (for writing npz files that ogbench.load_dataset reads).

    Each episode gets its final next-observation appended as an extra row with a zero action; other per-row
    keys take their `next_<key>` value there when the data has one, else repeat their last value. rewards/masks/next_observations are not part of the raw layout."""
    n = num_transitions(data)
    _, last = episode_bounds(data["terminals"])
    ends = np.unique(last)
    # Row positions in the output: each episode is shifted by the number of episodes ending before it.
    insert_at = ends + 1
    idx = np.arange(n) + np.searchsorted(ends, np.arange(n), side="left")
    total = n + len(ends)
    final_rows = insert_at + np.arange(len(ends))  # positions of appended final states
    out = {}
    for k, v in data.items():
        if k.startswith("next_") or k in ("rewards", "masks", "terminals") or not _is_per_row(v, n):
            continue
        v = np.asarray(v)
        arr = np.zeros((total,) + v.shape[1:], v.dtype)
        arr[idx] = v
        if f"next_{k}" in data:  # the final state is known exactly (next_observations, next_physics)
            arr[final_rows] = np.asarray(data[f"next_{k}"])[ends]
        elif k != "actions":
            arr[final_rows] = v[ends]
        out[k] = arr
    terminals = np.zeros(total, np.float32)
    terminals[final_rows] = 1.0
    out["terminals"] = terminals
    return out


def _is_per_row(v, n: int) -> bool:
    return isinstance(v, np.ndarray) and v.ndim >= 1 and len(v) == n


def validate(data: Mapping[str, np.ndarray], source: str) -> None:
    """Check keys, lengths, dtypes and finiteness; raise FluxrlError naming `source` and the field."""
    for key in TRANSITION_KEYS:
        if key not in data:
            raise FluxrlError(f"{source}: required field '{key}' is missing (found: {', '.join(sorted(data))}).")
    if is_compact(data) and "valids" not in data:
        raise FluxrlError(f"{source}: needs either 'next_observations' or 'valids' (compact form).")
    n = num_transitions(data)
    if n == 0:
        raise FluxrlError(f"{source}: the dataset is empty.")
    for key, value in data.items():
        value = np.asarray(value)
        if value.ndim == 0 or len(value) != n:
            raise FluxrlError(
                f"{source}: field '{key}' has {len(value) if value.ndim else 0} rows but 'observations' has {n}."
            )
        if value.dtype == object or value.dtype.kind not in "fiub":
            raise FluxrlError(f"{source}: field '{key}' has unsupported dtype {value.dtype}; expected numbers.")
        if key in FLOAT_KEYS and value.dtype.kind != "f":
            if not (key in ("terminals", "valids", "masks") and value.dtype.kind in "iub"):
                raise FluxrlError(f"{source}: field '{key}' has dtype {value.dtype}; expected a float array.")
        if value.dtype.kind == "f" and not np.all(np.isfinite(value)):
            bad = int(np.argmax(~np.isfinite(value).reshape(n, -1).all(axis=1)))
            raise FluxrlError(f"{source}: field '{key}' contains NaN or inf (first at row {bad}).")
    obs = np.asarray(data["observations"])
    if obs.ndim < 2:
        raise FluxrlError(f"{source}: 'observations' must be at least 2-D (rows, ...), got shape {obs.shape}.")
    if "next_observations" in data and np.asarray(data["next_observations"]).shape != obs.shape:
        raise FluxrlError(f"{source}: 'next_observations' shape {data['next_observations'].shape} != {obs.shape}.")
    if np.asarray(data["actions"]).ndim != 2:
        raise FluxrlError(f"{source}: 'actions' must be 2-D (rows, action_dim), got {data['actions'].shape}.")
    for key in ("terminals", "masks", "valids"):
        if key in data and not np.all(np.isin(np.asarray(data[key]), (0, 1))):
            raise FluxrlError(f"{source}: field '{key}' must contain only 0 and 1.")


def canonicalize(data: Mapping[str, np.ndarray]) -> Dataset:
    """Cast to the canonical dtypes: float32 actions/rewards/masks/terminals/valids; float observations -> float32
    (uint8 pixels stay uint8)."""
    out = {}
    for k, v in data.items():
        v = np.asarray(v)
        if k in FLOAT_KEYS:
            v = v.astype(np.float32, copy=False)
        elif k in ("observations", "next_observations") and v.dtype.kind == "f":
            v = v.astype(np.float32, copy=False)
        out[k] = v
    return out


def atomic_write(path: str | os.PathLike, write_fn, overwrite: bool = False) -> None:
    """Call write_fn(tmp_path) then rename onto `path`, so a killed run never leaves a half file under `path`.

    Refuses to replace an existing file unless overwrite=True."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise FluxrlError(f"{path} already exists; refusing to overwrite it (pass --overwrite to replace it).")
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(path)[1]
    tmp = os.path.join(directory, f".tmp-{os.path.basename(path)}-{uuid.uuid4().hex[:12]}{suffix}")
    # Created as open() would (mode 0666 less the umask), not 0600 as mkstemp does: others may need to read it.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write_fn(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> None:
    """atomic_write of a text file."""

    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    atomic_write(path, write, overwrite=overwrite)


def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], overwrite: bool = False) -> None:
    """Write a compressed npz atomically (no pickled objects)."""

    def write(tmp):
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()})

    atomic_write(path, write, overwrite=overwrite)
