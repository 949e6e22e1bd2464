"""Learning curves from run directories: mean over seeds and runs with a 95% bootstrap confidence band, one curve
per (agent, task) group."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections import defaultdict

import numpy as np

from fluxrl.errors import FluxrlError
from fluxrl.names import has_success
from fluxrl.train.loggers import KINDS

BOOTSTRAP_RESAMPLES = 2000


def _read_csv(path: str) -> list[dict]:
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def run_record(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FluxrlError(f"{run_dir} is not a fluxrl run directory (no config.json).")
    with open(path) as f:
        return json.load(f)


def default_metric(run_dirs: list[str]) -> str:
    """evaluation/success where a run's task reports success (OGBench) and the run logged it, else
    evaluation/return (DMC and Gymnasium tasks log a success of 0 they do not measure)."""
    for d in run_dirs:
        if has_success(run_record(d)["train"]["task"]) and run_curves(d, "evaluation/success"):
            return "evaluation/success"
    if any(run_curves(d, "evaluation/return") for d in run_dirs):
        return "evaluation/return"
    raise FluxrlError("None of the runs has evaluation results yet; choose a logged metric with --metric "
                      "(e.g. training/<loss name>).")


def config_differences(run_dirs: list[str]) -> dict[str, str]:
    """Per run, the agent-config values ("k=v, ...") that differ between the given runs of the same agent, task and
    preset (e.g. a sweep); "" where nothing tells a run apart from the others of its kind."""
    return _differences({d: run_record(d) for d in run_dirs})


def _differences(records: dict[str, dict]) -> dict[str, str]:
    kind = {d: (r["agent"], r["train"]["task"], r["train"]["preset"]) for d, r in records.items()}
    out = {}
    for k in set(kind.values()):
        members = [d for d in records if kind[d] == k]
        configs = [records[d]["agent_config"] for d in members]
        differing = sorted(key for key in set().union(*configs)
                           if len({json.dumps(c.get(key), sort_keys=True) for c in configs}) > 1)
        for d, config in zip(members, configs):
            out[d] = ", ".join(f"{key}={json.dumps(config.get(key))}" for key in differing)
    return out


def run_labels(run_dirs: list[str]) -> dict[str, str]:
    """A curve label per run: agent / task (preset) [differing config values], so only runs of one configuration
    share a curve."""
    records = {d: run_record(d) for d in run_dirs}
    differences = _differences(records)
    labels = {}
    for d, r in records.items():
        label = f"{r['agent']} / {r['train']['task']} ({r['train']['preset']})"
        labels[d] = f"{label} [{differences[d]}]" if differences[d] else label
    return labels


def run_curves(run_dir: str, metric: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{seed: (steps, values)} of `metric` in one run (empty if the run has not logged it)."""
    curves: dict[int, list] = defaultdict(list)
    for kind in KINDS:
        for row in _read_csv(os.path.join(run_dir, f"{kind}.csv")):
            if row.get(metric) not in (None, ""):
                curves[int(row["seed"])].append((int(row["step"]), float(row[metric])))
    return {s: (np.array([p[0] for p in v]), np.array([p[1] for p in v])) for s, v in curves.items()}


def bootstrap_ci(values: np.ndarray, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean."""
    means = rng.choice(values, size=(BOOTSTRAP_RESAMPLES, len(values)), replace=True).mean(axis=1)
    return tuple(np.quantile(means, [(1 - level) / 2, (1 + level) / 2]))


def aggregate(curves: list[tuple[np.ndarray, np.ndarray]], seed: int = 0):
    """(steps, mean, low, high) over curves, step by step (a step counts the curves that logged it; the band is
    NaN where fewer than two did)."""
    by_step: dict[int, list[float]] = defaultdict(list)
    for steps, values in curves:
        for s, v in zip(steps, values):
            by_step[int(s)].append(float(v))
    steps = np.array(sorted(by_step))
    rng = np.random.default_rng(seed)
    mean, low, high = [], [], []
    for s in steps:
        values = np.array(by_step[s])
        mean.append(values.mean())
        lo, hi = bootstrap_ci(values, rng) if len(values) > 1 else (np.nan, np.nan)
        low.append(lo)
        high.append(hi)
    return steps, np.array(mean), np.array(low), np.array(high)


def plot_runs(run_dirs: list[str], out: str, metric: str | None = None, overwrite: bool = False) -> str:
    """Draw `metric` (default: `default_metric`) of `run_dirs` into `out` (PNG, PDF, SVG: by extension); returns
    `out`."""
    if not run_dirs:
        raise FluxrlError("Give at least one run directory to plot.")
    if os.path.exists(out) and not overwrite:
        raise FluxrlError(f"{out} already exists; refusing to overwrite it (pass --overwrite to replace it).")
    labels = run_labels(run_dirs)
    metric = metric or default_metric(run_dirs)
    groups: dict[str, list] = defaultdict(list)
    for d in run_dirs:
        groups[labels[d]].extend(run_curves(d, metric).values())
    if not any(groups.values()):
        raise FluxrlError(f"No run logged metric '{metric}' (see the columns of train.csv / eval.csv).")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, curves in sorted(groups.items()):
        if not curves:
            continue
        steps, mean, low, high = aggregate(curves)
        line, = ax.plot(steps, mean, label=f"{label}, n={len(curves)}")
        ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric}: mean over seeds and runs, 95% bootstrap CI")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    suffix = os.path.splitext(out)[1] or ".png"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-plot-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return out
