"""Dataset readers and writers: every supported on-disk format <-> the canonical form of fluxrl.data.dataset.

Formats (docs/data.md has the glossary and the exact mapping of each):
  ogbench  .npz in OGBench's raw layout (as OGBench ships and fluxrl generates), or an npz already in the
           regular form (has next_observations) or the compact form (has valids)
  d4rl     D4RL-style hdf5: observations, actions, rewards, terminals (= true termination), timeouts
           (= truncation), optional next_observations, infos/*
  flat     flat hdf5, one dataset per canonical key, OGBench semantics (what InFOM writes for ExORL)
  minari   a Minari dataset directory (data/main_data.hdf5 with episode_<id> groups), read with h5py only
  exorl    a directory of ExORL/URLB episode files (*.npz with observation, action, reward, discount, physics)

Readers validate keys, shapes, dtypes, lengths and finiteness and fail with one FluxrlError sentence naming the
file and the field. Arrays load with allow_pickle=False; nothing is ever unpickled.

Metadata: npz keys beginning with `_meta` (e.g. `_meta_generator`) and hdf5 root attributes are metadata, never
arrays. `load_dataset(..., with_meta=True)` returns them as a dict next to the arrays; `read_dataset` returns a
DatasetFile with the arrays, the metadata, the format and the stored layout. Writers take metadata from `_meta*`
keys of the dict they are given and from their `meta` argument.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
from typing import Mapping

import h5py
import numpy as np

from fluxrl.data.dataset import (
    atomic_write,
    atomic_write_text,
    canonicalize,
    compact_to_regular,
    episode_bounds,
    is_compact,
    raw_to_compact,
    regular_to_raw,
    save_npz,
    validate,
)
from fluxrl.errors import FluxrlError

FORMATS = ("ogbench", "d4rl", "flat", "minari", "exorl")
WRITE_FORMATS = ("ogbench", "d4rl", "flat", "minari")
META_PREFIX = "_meta"
FORMAT_ATTR = "fluxrl_format"  # root attribute of the hdf5 files fluxrl writes: which convention they follow
# Two observations closer than this (L2) are the same state: the rule fql uses to find D4RL episode boundaries.
SAME_STATE_TOL = 1e-6
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_NPY_MAGIC = b"\x93NUMPY"
_HDF5_EXTS = (".hdf5", ".h5", ".he5")
_BINARY_FIELDS = ("terminals", "masks", "valids", "timeouts", "terminations", "truncations")


@dataclasses.dataclass
class DatasetFile:
    """What a reader found in a file: canonical arrays plus where and how they were stored."""

    data: dict  # canonical form (regular or compact), validated
    meta: dict  # metadata: str / int / float / bool / small numeric arrays
    format: str  # one of FORMATS
    layout: str  # how the file stores transitions: "raw", "regular", "compact" or "episodes"


# ------------------------------------------------------------------------------------------------------------------
# Public API
# ------------------------------------------------------------------------------------------------------------------


def load_dataset(path, format: str = "auto", compact: bool = False, with_meta: bool = False):
    """Read a dataset file or directory into the canonical form (regular, or compact with compact=True).

    Returns the dict of arrays, or (arrays, meta) with with_meta=True."""
    found = read_dataset(path, format=format, compact=compact)
    return (found.data, found.meta) if with_meta else found.data


def read_dataset(path, format: str = "auto", compact: bool = False) -> DatasetFile:
    """Like load_dataset, but also says which format and stored layout the file had."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FluxrlError(f"{path} does not exist.")
    fmt = detect_format(path) if format == "auto" else _check_format_name(format, FORMATS, path)
    arrays, meta, layout = _READERS[fmt](path)
    data = _to_form(arrays, layout, compact, path)
    return DatasetFile(data=data, meta=meta, format=fmt, layout=layout)


def detect_format(path) -> str:
    """Which of FORMATS `path` holds, judged from its content (and, for directories, what they contain)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FluxrlError(f"{path} does not exist.")
    if os.path.isdir(path):
        if _minari_file(path) is not None:
            return "minari"
        if _exorl_files(path):
            return "exorl"
        raise FluxrlError(
            f"{path} is a directory but holds neither a Minari dataset (data/main_data.hdf5) nor ExORL episode "
            f"files (*.npz)."
        )
    kind = _sniff(path)
    if kind == "zip":
        return "ogbench"
    if kind == "hdf5":
        with _open_h5(path) as f:
            tagged = _attr_str(f.attrs.get(FORMAT_ATTR))
            if tagged in FORMATS:
                return tagged
            if any(k.startswith("episode_") and isinstance(f[k], h5py.Group) for k in f.keys()):
                return "minari"
            if "timeouts" in f:
                return "d4rl"
            if "masks" in f or "valids" in f:
                return "flat"
            raise FluxrlError(
                f"{path}: cannot tell whether this hdf5 file is D4RL-style ('terminals' = true termination) or "
                f"flat ('terminals' = episode end): it has neither 'timeouts' nor 'masks'; pass format 'd4rl' or "
                f"'flat'."
            )
    raise FluxrlError(_unreadable_message(path, kind))


def check_compatible(data: Mapping[str, np.ndarray], observation_dim, action_dim: int, source: str,
                     task_name: str) -> None:
    """Raise FluxrlError when the dataset's per-row observation shape or action size differs from the task's env.

    observation_dim: an int for flat observations, or the per-row shape tuple (e.g. (64, 64, 3) for pixels)."""
    expected = (int(observation_dim),) if np.ndim(observation_dim) == 0 else tuple(int(d) for d in observation_dim)
    got = tuple(np.shape(data["observations"])[1:])
    if got != expected:
        raise FluxrlError(
            f"{source}: observations have shape {got} per row but task '{task_name}' observes {expected}; "
            f"the dataset was made for another environment."
        )
    got_act = int(np.shape(data["actions"])[1])
    if got_act != int(action_dim):
        raise FluxrlError(
            f"{source}: actions have {got_act} dimensions but task '{task_name}' takes {int(action_dim)}; "
            f"the dataset was made for another environment."
        )


def save_dataset(path, data: Mapping[str, np.ndarray], format: str = "auto", overwrite: bool = False,
                 meta: Mapping | None = None) -> None:
    """Write `data` (regular or compact form) atomically; never replaces an existing file unless overwrite=True.

    format: "ogbench" (raw-layout .npz, the default for .npz; rewards/masks/info keys kept per row), "flat"
    (the default for .hdf5/.h5), "d4rl", or "minari" (a directory, see write_minari)."""
    path = os.fspath(path)
    if format == "auto":
        ext = os.path.splitext(path)[1].lower()
        if ext == ".npz":
            format = "ogbench"
        elif ext in _HDF5_EXTS:
            format = "flat"
        else:
            raise FluxrlError(
                f"Cannot tell the format to write from the name '{path}': use a .npz or .hdf5 name, or pass "
                f"format ({', '.join(WRITE_FORMATS)})."
            )
    format = _check_format_name(format, WRITE_FORMATS, path)
    if format == "minari":
        write_minari(path, data, overwrite=overwrite, meta=meta)
        return
    _refuse_existing(path, overwrite)
    arrays, all_meta = _prepare_for_writing(data, meta, path)
    if format == "ogbench":
        raw = _to_raw(arrays, path)
        raw.update({f"{META_PREFIX}_{k}": np.asarray(v) for k, v in all_meta.items()})
        save_npz(path, raw, overwrite=overwrite)
        return
    if format == "d4rl":
        arrays = _to_d4rl(arrays, path)
    atomic_write(path, lambda tmp: _write_h5(tmp, arrays, all_meta, format), overwrite=overwrite)


def write_minari(directory, data: Mapping[str, np.ndarray], overwrite: bool = False,
                 meta: Mapping | None = None) -> None:
    """Write `data` as a Minari-layout dataset directory: <directory>/data/main_data.hdf5 plus metadata.json.

    One group episode_<k> per episode with observations (T + 1 rows: the episode's states and its final
    next-observation), actions, rewards, terminations (= 1 - masks), truncations (episode end without
    termination), and info keys under infos/ with T + 1 rows (the last repeated). Minari episodes end at a
    termination, so a dataset with masks = 0 inside an episode cannot be written this way. The metadata.json holds
    total_episodes, total_steps, data_format and `meta`, not Minari's serialized spaces: the files follow Minari's
    hdf5 layout but the `minari` package itself cannot open them."""
    directory = os.fspath(directory)
    main = os.path.join(directory, "data", "main_data.hdf5")
    meta_path = os.path.join(directory, "data", "metadata.json")
    _refuse_existing(main, overwrite)
    arrays, all_meta = _prepare_for_writing(data, meta, directory)
    if is_compact(arrays):
        arrays = compact_to_regular(arrays)
    _require_chain(arrays, directory, "Minari")
    terminals = arrays["terminals"] > 0.5
    masks = np.asarray(arrays.get("masks", np.ones(len(terminals))), np.float32)
    inner_termination = np.flatnonzero((masks < 0.5) & ~terminals)
    if len(inner_termination):
        raise FluxrlError(
            f"{directory}: field 'masks' is 0 at row {inner_termination[0]} inside an episode; a Minari episode "
            f"ends at its termination, so write this dataset as flat hdf5 instead."
        )
    first, last = episode_bounds(terminals)
    starts, ends = np.unique(first), np.unique(last)
    infos = [k for k in arrays if k not in ("observations", "next_observations", "actions", "rewards", "masks",
                                              "terminals")]

    def write(tmp):
        with h5py.File(tmp, "w") as f:
            for k, (s, e) in enumerate(zip(starts, ends)):
                g = f.create_group(f"episode_{k}")
                g.attrs["id"] = k
                g.attrs["total_steps"] = int(e - s + 1)
                obs = np.concatenate([arrays["observations"][s:e + 1], arrays["next_observations"][e:e + 1]])
                g.create_dataset("observations", data=obs)
                g.create_dataset("actions", data=arrays["actions"][s:e + 1])
                if "rewards" in arrays:
                    g.create_dataset("rewards", data=arrays["rewards"][s:e + 1])
                terminated = masks[s:e + 1] < 0.5
                g.create_dataset("terminations", data=terminated)
                truncated = np.zeros(e - s + 1, bool)
                truncated[-1] = not terminated[-1]
                g.create_dataset("truncations", data=truncated)
                for key in infos:
                    v = arrays[key][s:e + 1]
                    g.create_dataset(f"infos/{key}", data=np.concatenate([v, v[-1:]]))

    info = {"total_episodes": int(len(starts)), "total_steps": int(len(terminals)), "data_format": "hdf5"}
    info.update({k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in all_meta.items()})
    atomic_write(main, write, overwrite=overwrite)
    atomic_write_text(meta_path, json.dumps(info, indent=1), overwrite=True)


# ------------------------------------------------------------------------------------------------------------------
# Canonical form from what a reader found
# ------------------------------------------------------------------------------------------------------------------


def _to_form(arrays: dict, layout: str, compact: bool, source: str) -> dict:
    """raw / regular / compact / episodes (= regular built by a reader) -> validated regular or compact form."""
    _require(arrays, ("observations", "actions", "terminals"), source)
    _check_fields(arrays, source)
    if arrays["observations"].ndim < 2:
        raise FluxrlError(
            f"{source}: field 'observations' has shape {arrays['observations'].shape}; expected (rows, features...)."
        )
    if layout == "raw":
        if arrays["terminals"][-1] < 0.5:
            raise FluxrlError(
                f"{source}: field 'terminals' is 0 on the last row; in OGBench's raw layout every episode ends "
                f"with a row marked 1, so the file looks truncated."
            )
        data = canonicalize(raw_to_compact(arrays))
        validate(data, source)
        return data if compact else compact_to_regular(data)
    data = canonicalize(arrays)
    validate(data, source)
    if layout == "compact":
        if data["valids"][-1] > 0.5:
            raise FluxrlError(
                f"{source}: field 'valids' is 1 on the last row; in the compact form every episode ends with a "
                f"state row marked 0, so the file looks truncated."
            )
        return data if compact else compact_to_regular(data)
    return _regular_to_compact(data, source) if compact else data


def _regular_to_raw(data: Mapping[str, np.ndarray]) -> dict:
    """regular_to_raw, also keeping rewards and masks per row (the extra final-state row repeats the episode's
    last value; it is never a transition). Assumes next_observations[i] == observations[i + 1] inside episodes."""
    raw = regular_to_raw(data)
    transition_rows = raw["terminals"] < 0.5
    _, last = episode_bounds(data["terminals"])
    ends = np.unique(last)
    for key in ("rewards", "masks"):
        if key in data:
            v = np.asarray(data[key])
            full = np.empty((len(transition_rows),) + v.shape[1:], v.dtype)
            full[transition_rows] = v
            full[~transition_rows] = v[ends]
            raw[key] = full
    return raw


def _regular_to_compact(data: Mapping[str, np.ndarray], source: str) -> dict:
    _require_chain(data, source, "the compact form")
    return raw_to_compact(_regular_to_raw(data))


def _to_raw(arrays: dict, path: str) -> dict:
    if is_compact(arrays):
        if arrays["valids"][-1] > 0.5:
            raise FluxrlError(f"{path}: field 'valids' must be 0 on the last row of a compact dataset.")
        raw = {k: v for k, v in arrays.items() if k not in ("valids", "terminals")}
        raw["terminals"] = (1.0 - arrays["valids"]).astype(np.float32)
        return raw
    _require_chain(arrays, path, "OGBench's raw npz layout")
    return _regular_to_raw(arrays)


def _require_chain(data: Mapping[str, np.ndarray], source: str, target: str) -> None:
    """Layouts that store each state once need next_observations[i] == observations[i + 1] inside episodes."""
    inside = np.asarray(data["terminals"][:-1]) < 0.5
    broken = np.flatnonzero(inside & ~_same_state(data["next_observations"][:-1], data["observations"][1:]))
    if len(broken):
        raise FluxrlError(
            f"{source}: field 'next_observations' differs from the next row's observation at row {broken[0]} "
            f"inside an episode, which {target} cannot store; write it as flat hdf5 instead."
        )


def _same_state(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise: is a[i] the same state as b[i] (L2 distance <= SAME_STATE_TOL)? Chunked (~128 MB of float64
    at a time) so pixel datasets do not need a float copy of themselves."""
    out = np.empty(len(a), bool)
    chunk = max(1, 2**24 // max(1, int(np.prod(a.shape[1:]))))
    for s in range(0, len(a), chunk):
        d = a[s:s + chunk].astype(np.float64) - b[s:s + chunk]
        out[s:s + chunk] = np.sqrt(np.sum(d.reshape(len(d), -1) ** 2, axis=1)) <= SAME_STATE_TOL
    return out


# ------------------------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------------------------


def _require(arrays: Mapping, keys, source: str) -> None:
    for key in keys:
        if key not in arrays:
            found = ", ".join(sorted(arrays)) or "nothing"
            raise FluxrlError(f"{source}: required field '{key}' is missing (found: {found}).")


def _check_fields(arrays: Mapping[str, np.ndarray], source: str, n: int | None = None,
                  ref: str = "observations") -> None:
    """Every field: n rows (default: as many as `ref`), numbers, finite, flags 0/1. Row numbers in messages are
    the file's rows."""
    n = len(arrays[ref]) if n is None else n
    for key, value in arrays.items():
        if value.ndim == 0:
            raise FluxrlError(
                f"{source}: field '{key}' is a single value, not one row per step; name metadata '{META_PREFIX}_"
                f"{key}' instead."
            )
        if value.dtype == object or value.dtype.kind not in "fiub":
            raise FluxrlError(f"{source}: field '{key}' has dtype {value.dtype}; fluxrl reads numeric arrays only.")
        if len(value) != n:
            raise FluxrlError(f"{source}: field '{key}' has {len(value)} rows but '{ref}' has {n}.")
        if value.dtype.kind == "f":
            finite = np.isfinite(value).reshape(len(value), -1).all(axis=1)
            if not finite.all():
                raise FluxrlError(
                    f"{source}: field '{key}' contains NaN or inf (first at row {int(np.argmin(finite))})."
                )
        if key in _BINARY_FIELDS and not np.isin(value, (0, 1)).all():
            bad = int(np.argmin(np.isin(value, (0, 1))))
            raise FluxrlError(f"{source}: field '{key}' must contain only 0 and 1 (row {bad} holds {value[bad]}).")


def _check_format_name(format: str, allowed, path: str) -> str:
    if format not in allowed:
        raise FluxrlError(f"Unknown dataset format '{format}' for {path}; choose one of: {', '.join(allowed)}.")
    return format


def _refuse_existing(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise FluxrlError(f"{path} already exists; refusing to overwrite it (pass --overwrite to replace it).")


# ------------------------------------------------------------------------------------------------------------------
# File access
# ------------------------------------------------------------------------------------------------------------------


def _sniff(path: str) -> str | None:
    """'zip' (npz), 'npy', 'hdf5', 'dir', 'empty' or None, from the file's first bytes."""
    if os.path.isdir(path):
        return "dir"
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if head.startswith(_NPY_MAGIC):
        return "npy"
    if h5py.is_hdf5(path):
        return "hdf5"
    return "empty" if not head else None


def _unreadable_message(path: str, kind: str | None) -> str:
    ext = os.path.splitext(path)[1].lower()
    if kind == "npy":
        return f"{path} holds a single .npy array, not a dataset; save the fields together in an .npz file."
    if kind == "empty":
        return f"{path} is empty."
    if kind == "dir":
        return f"{path} is a directory, not a dataset file; pass format 'minari' or 'exorl' (or 'auto')."
    if kind == "zip":
        return f"{path} is an npz file, not HDF5."
    if kind == "hdf5":
        return f"{path} is an HDF5 file, not an npz; pass format 'd4rl', 'flat' or 'minari' (or 'auto')."
    if ext == ".npz":
        return f"{path} is not a valid npz file (not a zip archive: truncated or corrupted?)."
    if ext in _HDF5_EXTS:
        return f"{path} is not a valid HDF5 file (no HDF5 signature: truncated or corrupted?)."
    return (
        f"{path} is not a dataset fluxrl can read: expected an OGBench .npz, an HDF5 file, a Minari dataset "
        f"directory or a directory of ExORL episode .npz files."
    )


def _read_npz(path: str) -> dict:
    """All arrays of an npz file (allow_pickle=False), each failure turned into one sentence."""
    kind = _sniff(path)
    if kind != "zip":
        raise FluxrlError(_unreadable_message(path, kind))
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as e:  # zipfile.BadZipFile, OSError, EOFError, ...: the archive itself is damaged
        raise FluxrlError(f"{path} is not a readable npz file (truncated or corrupted: {e}).") from e
    out = {}
    with npz:
        for key in npz.files:
            try:
                out[key] = npz[key]
            except ValueError as e:
                if "allow_pickle" in str(e):
                    raise FluxrlError(
                        f"{path}: field '{key}' holds pickled Python objects, which fluxrl never loads; store "
                        f"numeric arrays instead."
                    ) from e
                raise FluxrlError(f"{path}: field '{key}' cannot be read ({e}).") from e
            except Exception as e:  # damaged member: zlib.error, BadZipFile, EOFError, ...
                raise FluxrlError(f"{path}: field '{key}' cannot be read (truncated or corrupted: {e}).") from e
    return out


class _open_h5:
    """h5py.File for reading, with unreadable files turned into one sentence."""

    def __init__(self, path: str):
        self.path = path

    def __enter__(self) -> h5py.File:
        kind = _sniff(self.path)
        if kind not in ("hdf5", None):  # None: let h5py say what is wrong with a damaged file
            raise FluxrlError(_unreadable_message(self.path, kind))
        try:
            self.file = h5py.File(self.path, "r")
        except OSError as e:
            raise FluxrlError(f"{self.path} is not a readable HDF5 file (truncated or corrupted: {e}).") from e
        return self.file

    def __exit__(self, *exc):
        self.file.close()


def _read_h5_dataset(ds: h5py.Dataset, source: str, name: str) -> np.ndarray:
    try:
        return np.asarray(ds[()])
    except Exception as e:  # OSError on damaged chunks, TypeError on unsupported types
        raise FluxrlError(f"{source}: field '{name}' cannot be read ({e}).") from e


def _h5_datasets(group: h5py.Group) -> list[str]:
    names = []
    group.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _attr_str(value) -> str | None:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _attr_str(value.item())
    return value if isinstance(value, str) else None


def _meta_value(value):
    """numpy scalars / 0-d arrays / bytes -> plain Python values; numeric arrays stay arrays; None if unusable."""
    value = value.item() if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0 else value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
        return value
    if isinstance(value, np.ndarray) and value.dtype.kind in "USO":  # a list of strings: kept as JSON text
        try:
            return json.dumps([v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
                               for v in value.ravel().tolist()])
        except TypeError:
            return None
    return None


def _meta_from_attrs(attrs) -> dict:
    meta = {}
    for name, value in attrs.items():
        if name == FORMAT_ATTR:
            continue
        key = (name[len(META_PREFIX):].lstrip("_") or "meta") if name.startswith(META_PREFIX) else name
        value = _meta_value(value)
        if value is not None:
            meta[key] = value
    return meta


def _split_meta(arrays: Mapping) -> tuple[dict, dict]:
    data, meta = {}, {}
    for k, v in arrays.items():
        if k.startswith(META_PREFIX):
            meta[k[len(META_PREFIX):].lstrip("_") or "meta"] = _meta_value(np.asarray(v))
        else:
            data[k] = np.asarray(v)
    return data, meta


# ------------------------------------------------------------------------------------------------------------------
# Readers: path -> (arrays, meta, layout)
# ------------------------------------------------------------------------------------------------------------------


def _read_ogbench(path: str):
    arrays, meta = _split_meta(_read_npz(path))
    return arrays, meta, _layout_of(arrays, path)


def _layout_of(arrays: Mapping, source: str) -> str:
    """regular if next_observations is stored, compact if valids is, else OGBench's raw layout."""
    if "next_observations" in arrays and "valids" in arrays:
        raise FluxrlError(f"{source}: has both 'next_observations' and 'valids'; a dataset is regular or compact.")
    if "next_observations" in arrays:
        return "regular"
    return "compact" if "valids" in arrays else "raw"


def _read_flat(path: str):
    with _open_h5(path) as f:
        meta = _meta_from_attrs(f.attrs)
        arrays = {name.replace("/", "_"): _read_h5_dataset(f[name], path, name) for name in _h5_datasets(f)}
    return arrays, meta, _layout_of(arrays, path)


def _read_d4rl(path: str):
    """D4RL-style hdf5 -> regular form.

    masks = 1 - D4RL terminals (a termination stops bootstrapping). Episode ends (our terminals):
    - with next_observations: at timeouts and wherever the next row does not continue the trajectory
      (|observations[i+1] - next_observations[i]| > 1e-6, fql's rule); a D4RL termination followed by a row that
      continues it (AntMaze's goal flags) keeps the episode going, like masks = 0 inside an OGBench episode;
    - without: next_observations[i] = observations[i + 1], as d4rl.qlearning_dataset does. Rows at timeouts and
      the file's last row have no stored successor and are dropped; a terminal row is kept (its reward and
      masks = 0 matter) and always ends its episode, since the file cannot show whether the next row continues.
    """
    with _open_h5(path) as f:
        meta = _meta_from_attrs(f.attrs)
        arrays = {}
        for name in _h5_datasets(f):
            value = _read_h5_dataset(f[name], path, name)
            if name.startswith("metadata/") or value.ndim == 0:
                usable = _meta_value(value) if value.ndim == 0 or value.dtype.kind in "USO" else None
                if usable is not None:  # scalars and strings; stored policy weights are skipped
                    meta[name] = usable
                continue
            arrays[name] = value
    renamed = {}
    for name, value in arrays.items():
        key = name
        if name.startswith("infos/"):
            key = name[len("infos/"):].replace("/", "_")
            key = key if key not in arrays else "infos_" + key
        renamed[key.replace("/", "_")] = value
    arrays = renamed
    _require(arrays, ("observations", "actions", "terminals"), path)
    _check_fields(arrays, path)
    obs = arrays["observations"]
    terminated = arrays.pop("terminals") > 0.5
    timeouts = arrays.pop("timeouts") > 0.5 if "timeouts" in arrays else None
    if "next_observations" in arrays:
        if arrays["next_observations"].shape != obs.shape:
            raise FluxrlError(
                f"{path}: field 'next_observations' has shape {arrays['next_observations'].shape} but "
                f"'observations' has {obs.shape}."
            )
        ends = np.zeros(len(obs), bool) if timeouts is None else timeouts.copy()
        ends[:-1] |= ~_same_state(arrays["next_observations"][:-1], obs[1:])
        ends[-1] = True
        out = dict(arrays)
    else:
        if timeouts is None:
            raise FluxrlError(
                f"{path}: has neither 'timeouts' nor 'next_observations', so its episode boundaries cannot be "
                f"recovered."
            )
        keep = ~timeouts
        keep[-1] = False
        rows = np.flatnonzero(keep)
        ends = terminated.copy()
        ends[:-1] |= ~keep[1:]
        out = {k: v[rows] for k, v in arrays.items()}
        out["next_observations"] = obs[rows + 1]
        ends, terminated = ends[rows], terminated[rows]
    out["terminals"] = ends.astype(np.float32)
    out["masks"] = (~terminated).astype(np.float32)
    return out, meta, "regular"


def _minari_file(path: str) -> str | None:
    """The main_data.hdf5 of a Minari dataset directory (or the file itself)."""
    for candidate in (os.path.join(path, "data", "main_data.hdf5"), os.path.join(path, "main_data.hdf5")):
        if os.path.isfile(candidate):
            return candidate
    return path if os.path.isfile(path) else None


def _natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _minari_array(node, source: str, field: str) -> tuple[np.ndarray, list[str]]:
    """A Minari field: a dataset, or a group (dict/tuple space) flattened in sorted key order.

    Returns the (rows, features) array and, for groups, the layout 'key[start:stop]' of the flattened parts."""
    if isinstance(node, h5py.Dataset):
        return _read_h5_dataset(node, source, field), []
    parts, layout, start = [], [], 0
    for key in sorted(node.keys(), key=_natural_key):
        value, sub = _minari_array(node[key], source, f"{field}/{key}")
        value = value.reshape(len(value), -1)
        parts.append(value)
        layout += [f"{key}.{s}" for s in sub] if sub else [f"{key}[{start}:{start + value.shape[1]}]"]
        start += value.shape[1]
    if not parts:
        raise FluxrlError(f"{source}: field '{field}' is an empty group.")
    if len({len(p) for p in parts}) != 1:
        raise FluxrlError(f"{source}: the parts of field '{field}' have different numbers of rows.")
    return np.concatenate(parts, axis=1), layout


def _read_minari(path: str):
    """Minari directory -> regular form. Per episode (T steps, T + 1 observations):
    observations = obs[:-1], next_observations = obs[1:], masks = 1 - terminations,
    terminals = terminations | truncations, and 1 on the episode's last step. Dict observations are flattened in
    sorted key order (meta['observation_layout'] records the slices). Info datasets with T + 1 rows are taken at
    the state s (rows 0..T-1); with T rows as stored. Episodes with no step are skipped."""
    main = _minari_file(path)
    if main is None:
        raise FluxrlError(f"{path} is not a Minari dataset directory (no data/main_data.hdf5).")
    meta = {}
    meta_json = os.path.join(os.path.dirname(main), "metadata.json")
    if os.path.isfile(meta_json):
        try:
            with open(meta_json) as fh:
                info = json.load(fh)
        except (OSError, ValueError) as e:
            raise FluxrlError(f"{meta_json} is not readable JSON ({e}).") from e
        if isinstance(info, dict):
            if info.get("data_format", "hdf5") != "hdf5":
                raise FluxrlError(
                    f"{path}: Minari data_format '{info['data_format']}' is not supported; only hdf5 is."
                )
            meta.update({k: v for k, v in info.items() if isinstance(v, (str, int, float, bool))})
    episodes, obs_layout = [], None
    with _open_h5(main) as f:
        meta.update(_meta_from_attrs(f.attrs))
        names = sorted((k for k in f.keys() if re.fullmatch(r"episode_\d+", k)), key=_natural_key)
        if not names:
            raise FluxrlError(f"{main}: holds no episode_<id> groups.")
        for name in names:
            g = f[name]
            source = f"{main}: {name}"
            _require(g, ("observations", "actions", "terminations", "truncations"), source)
            if isinstance(g["actions"], h5py.Group):
                raise FluxrlError(f"{source}: field 'actions' is a dict/tuple space; only flat actions are supported.")
            obs, layout = _minari_array(g["observations"], source, "observations")
            obs_layout = obs_layout or layout
            steps = {k: _read_h5_dataset(g[k], source, k) for k in ("actions", "rewards", "terminations",
                                                                      "truncations") if k in g}
            t = len(steps["actions"])
            if len(obs) != t + 1:
                raise FluxrlError(
                    f"{source}: field 'observations' has {len(obs)} rows but a Minari episode with {t} actions "
                    f"needs {t + 1}."
                )
            infos = {}
            if "infos" in g and isinstance(g["infos"], h5py.Group):  # serialized (string) infos are not read
                for k in _h5_datasets(g["infos"]):
                    v = _read_h5_dataset(g["infos"][k], source, f"infos/{k}")
                    if v.ndim == 0 or len(v) not in (t, t + 1):
                        raise FluxrlError(
                            f"{source}: field 'infos/{k}' has {len(v) if v.ndim else 0} rows; expected {t + 1} "
                            f"(one per observation) or {t}."
                        )
                    infos[k.replace("/", "_")] = v[:t]
            if t == 0:
                continue
            _check_fields({"observations": obs}, source)
            _check_fields({**steps, **infos}, source, t, ref="actions")
            terminated = steps["terminations"].reshape(t) > 0.5
            ends = terminated | (steps["truncations"].reshape(t) > 0.5)
            ends[-1] = True
            episode = {"observations": obs[:-1], "next_observations": obs[1:], "actions": steps["actions"],
                       "terminals": ends.astype(np.float32), "masks": (~terminated).astype(np.float32), **infos}
            if "rewards" in steps:
                episode["rewards"] = steps["rewards"].reshape(t)
            episodes.append((source, episode))
    if obs_layout:
        meta["observation_layout"] = ", ".join(obs_layout)
    return _concat_episodes(episodes, path), meta, "episodes"


def _exorl_files(path: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(path, "*.npz")))
    if not files and os.path.isdir(os.path.join(path, "buffer")):  # ExORL's download layout: <algo>/buffer/*.npz
        files = sorted(glob.glob(os.path.join(path, "buffer", "*.npz")))
    return files


def _read_exorl(path: str):
    """ExORL/URLB episode files -> regular form.

    Each file holds T + 1 rows: row 0 is the reset step (dummy zero action, reward 0, discount 1) and row k >= 1
    the step that took action[k] from observation[k - 1] to observation[k] with reward[k] and discount[k]
    (ExORL's replay buffer samples exactly these tuples). So: observations = observation[:-1],
    next_observations = observation[1:], actions = action[1:], rewards = reward[1:], masks = discount[1:],
    terminals = 1 - discount[1:] and 1 on the last step (as InFOM's aggregator), physics = physics[:-1] (state s)
    and next_physics = physics[1:] (state s', what ExORL's reward relabelling reads). Files are read in sorted
    name order, as ExORL and InFOM read them. Stored rewards are those of the collection task."""
    files = _exorl_files(path)
    if not files:
        raise FluxrlError(f"{path} holds no ExORL episode files (*.npz).")
    episodes = []
    for fn in files:
        arrays, _ = _split_meta(_read_npz(fn))
        _require(arrays, ("observation", "action"), fn)
        arrays = {k: v.reshape(len(v)) if v.ndim == 2 and v.shape[1] == 1 and k in ("reward", "discount") else v
                  for k, v in arrays.items()}
        rows = len(arrays["observation"])
        _check_fields(arrays, fn, rows, ref="observation")
        if rows < 2:
            raise FluxrlError(f"{fn}: field 'observation' has {rows} rows; an ExORL episode needs at least 2.")
        named = re.search(r"_(\d+)_(\d+)\.npz$", os.path.basename(fn))
        if named and int(named.group(2)) != rows - 1:
            raise FluxrlError(
                f"{fn}: the name says {named.group(2)} steps but field 'observation' has {rows} rows "
                f"({rows - 1} steps); the file looks truncated."
            )
        episode = {"observations": arrays["observation"][:-1], "next_observations": arrays["observation"][1:],
                   "actions": arrays["action"][1:]}
        if "reward" in arrays:
            episode["rewards"] = arrays["reward"][1:]
        masks = arrays["discount"][1:] if "discount" in arrays else np.ones(rows - 1, np.float32)
        if not np.isin(masks, (0, 1)).all():
            raise FluxrlError(f"{fn}: field 'discount' must be 0 or 1 per step (DMC's termination flag).")
        ends = masks < 0.5
        ends[-1] = True
        episode["masks"] = masks
        episode["terminals"] = ends.astype(np.float32)
        if "physics" in arrays:
            episode["physics"] = arrays["physics"][:-1]
            episode["next_physics"] = arrays["physics"][1:]
        for k, v in arrays.items():
            if k not in ("observation", "action", "reward", "discount", "physics"):
                episode[k] = v[:-1]
        episodes.append((fn, episode))
    return _concat_episodes(episodes, path), {}, "episodes"


def _concat_episodes(episodes: list, path: str) -> dict:
    if not episodes:
        raise FluxrlError(f"{path}: the dataset is empty (no episode has a step).")
    keys = set(episodes[0][1])
    for source, episode in episodes:
        if set(episode) != keys:
            diff = sorted(keys.symmetric_difference(episode))
            raise FluxrlError(f"{source}: field '{diff[0]}' is present in some episodes but not in others.")
    try:
        return {k: np.concatenate([e[k] for _, e in episodes]) for k in episodes[0][1]}
    except ValueError as e:
        raise FluxrlError(f"{path}: episodes have fields of different shapes ({e}).") from e


_READERS = {"ogbench": _read_ogbench, "flat": _read_flat, "d4rl": _read_d4rl, "minari": _read_minari,
            "exorl": _read_exorl}


# ------------------------------------------------------------------------------------------------------------------
# Writers
# ------------------------------------------------------------------------------------------------------------------


def _prepare_for_writing(data: Mapping, meta: Mapping | None, path: str) -> tuple[dict, dict]:
    arrays, all_meta = _split_meta(data)
    all_meta.update(dict(meta or {}))
    for k, v in all_meta.items():
        all_meta[k] = _meta_value(v)
        if all_meta[k] is None:
            raise FluxrlError(f"{path}: metadata '{k}' must be a string, a number or a numeric array.")
    arrays = canonicalize(arrays)
    validate(arrays, f"the dataset to write to {path}")
    return arrays, all_meta


def _to_d4rl(arrays: dict, path: str) -> dict:
    """Canonical -> D4RL fields: terminals = 1 - masks, timeouts = episode end without termination; next
    observations are written, so episode ends after a termination are found again by discontinuity. Where the next
    episode happens to start at the same state, the end is marked in timeouts too, so nothing is lost."""
    if is_compact(arrays):
        arrays = compact_to_regular(arrays)
    _require_chain(arrays, path, "D4RL's layout")
    n = len(arrays["observations"])
    ends = arrays["terminals"] > 0.5
    terminated = np.asarray(arrays.get("masks", np.ones(n)), np.float32) < 0.5
    invisible = np.zeros(n, bool)
    invisible[:-1] = _same_state(arrays["next_observations"][:-1], arrays["observations"][1:])
    out = {k: arrays[k] for k in ("observations", "actions", "next_observations", "rewards") if k in arrays}
    out["terminals"] = terminated.astype(np.float32)
    out["timeouts"] = (ends & (~terminated | invisible)).astype(np.float32)
    for k, v in arrays.items():
        if k not in out and k not in ("masks",):
            out[f"infos/{k}"] = v
    return out


def _write_h5(tmp: str, arrays: Mapping[str, np.ndarray], meta: Mapping, format: str) -> None:
    with h5py.File(tmp, "w") as f:
        f.attrs[FORMAT_ATTR] = format
        for k, v in meta.items():
            f.attrs[f"{META_PREFIX}_{k}"] = v
        for k, v in arrays.items():
            f.create_dataset(k, data=v)

