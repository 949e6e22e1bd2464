"""Dataset generation: one episode per work item, spread over processes, written atomically.

Each family module provides `collect_episode(spec, seed) -> dict` returning ONE episode in OGBench's raw
layout (T + 1 rows of states, terminals = 1 on the last row). Episode k of a dataset is collected with the seed
derived from (seed, split, k), so the result depends only on the seed, never on the worker count or scheduling.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from fluxrl.data.dataset import save_npz
from fluxrl.errors import FluxrlError
from fluxrl.names import DatasetSpec, parse_dataset

FAMILY_MODULES = {
    "manipulation": "fluxrl.data.generate_ogbench",
    "pointmaze": "fluxrl.data.generate_ogbench",
    "dmc": "fluxrl.data.generate_dmc",
}
SPLIT_SALT = {"train": 0, "val": 1}


def default_episodes(spec: DatasetSpec) -> int:
    """Episodes per dataset as the source papers use them (OGBench: 1000 train + 100 val episodes)."""
    module = importlib.import_module(FAMILY_MODULES[spec.family])
    table = module.DEFAULT_EPISODES if spec.split == "train" else module.DEFAULT_VAL_EPISODES
    return table.get(spec.env, table[spec.family])


def episode_seed(seed: int, split: str, index: int) -> int:
    return int(np.random.SeedSequence([seed, SPLIT_SALT[split], index]).generate_state(1)[0])


def _collect(args) -> dict:
    family_module, spec, seed = args
    return importlib.import_module(family_module).collect_episode(spec, seed)


def collect(
    spec: DatasetSpec,
    episodes: int,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    collect_fn: Callable | None = None,
) -> dict[str, np.ndarray]:
    """Collect `episodes` episodes of `spec` with `workers` processes; returns the concatenated raw layout."""
    if episodes < 1:
        raise FluxrlError(f"--episodes must be at least 1, got {episodes}.")
    if workers < 1:
        raise FluxrlError(f"--workers must be at least 1, got {workers}.")
    module = FAMILY_MODULES[spec.family]
    jobs = [(module, spec, episode_seed(seed, spec.split, k)) for k in range(episodes)]
    bar = tqdm(total=episodes, desc=f"generate {spec.file_stem}", unit="ep", disable=not progress, dynamic_ncols=True)
    results = []
    if workers == 1:
        for job in jobs:
            results.append((collect_fn or _collect)(job))
            bar.update()
    else:
        # spawn: MuJoCo/OpenGL state must not be inherited by forked children.
        with mp.get_context("spawn").Pool(workers) as pool:
            for episode in pool.imap(collect_fn or _collect, jobs, chunksize=1):
                results.append(episode)
                bar.update()
    bar.close()
    keys = results[0].keys()
    return {k: np.concatenate([r[k] for r in results]) for k in keys}


def val_path(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}-val{ext or '.npz'}"


def output_paths(out: str, overwrite: bool) -> list[str]:
    """[out, its -val split]: an .npz name whose files do not exist yet, unless overwrite."""
    if not out.endswith(".npz"):
        raise FluxrlError(f"--out must end with .npz, got '{out}'.")
    paths = [out, val_path(out)]
    if not overwrite:
        for p in paths:
            if os.path.exists(p):
                raise FluxrlError(f"{p} already exists; refusing to overwrite it (pass --overwrite to replace it).")
    return paths


def generate(
    name: str,
    out: str,
    episodes: int | None = None,
    seed: int = 0,
    workers: int = 1,
    val_episodes: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> list[str]:
    """Generate dataset `name` into `out` (raw OGBench npz) and its validation split into `<out>-val.npz`.

    Returns the paths written. Nothing existing is replaced unless overwrite=True (checked before any work)."""
    spec = parse_dataset(name)
    if spec.split == "val":
        raise FluxrlError(f"Generate '{spec.name}' instead of '{name}': the -val split is written alongside it.")
    paths = output_paths(out, overwrite)
    val_spec = DatasetSpec(spec.name, spec.family, spec.env, spec.mode, "val")
    n_train = episodes if episodes is not None else default_episodes(spec)
    n_val = val_episodes if val_episodes is not None else (
        default_episodes(val_spec) if episodes is None else max(1, n_train // 10)
    )
    for split_spec, n, path in ((spec, n_train, paths[0]), (val_spec, n_val, paths[1])):
        data = collect(split_spec, n, seed=seed, workers=workers, progress=progress)
        data["_meta_generator"] = np.array(f"fluxrl {spec.name} seed={seed} episodes={n} split={split_spec.split}")
        save_npz(path, data, overwrite=overwrite)
    return paths
