"""Results tables from run directories: per run, a metric's mean over seeds at every evaluation and its final value
(mean ± std over seeds, and per seed). Markdown is what docs/results.md records; CSV has one row per run and
evaluation step, for analysis elsewhere."""

from __future__ import annotations

import csv
import io
import os

import numpy as np

from fluxrl.errors import FluxrlError
from fluxrl.train.plotting import config_differences, default_metric, run_curves, run_record

FORMATS = {".md": "markdown", ".markdown": "markdown", ".csv": "csv"}
CSV_COLUMNS = ("run_dir", "agent", "config", "preset", "task", "dataset", "metric", "step", "seeds", "mean", "std",
               "per_seed")


def table_rows(run_dirs: list[str], metric: str | None = None) -> tuple[str, list[dict]]:
    """(metric, one dict per run). `metric` defaults to evaluation/success where a run's task reports success,
    else evaluation/return. A row's `steps` are the evaluation steps every seed of the run logged (empty if none) and
    `values[step]` the per-seed values there, in seed order."""
    if not run_dirs:
        raise FluxrlError("Give at least one run directory to tabulate.")
    records = {d: run_record(d) for d in run_dirs}
    metric = metric or default_metric(run_dirs)
    differences = config_differences(run_dirs)
    rows = []
    for d in run_dirs:
        record, curves = records[d], run_curves(d, metric)
        seeds = sorted(curves)
        steps = sorted(set.intersection(*(set(curves[s][0].tolist()) for s in seeds))) if seeds else []
        values = {t: [float(curves[s][1][list(curves[s][0]).index(t)]) for s in seeds] for t in steps}
        train = record["train"]
        rows.append({"run_dir": d, "agent": record["agent"], "config": differences[d], "preset": train["preset"],
                     "task": train["task"], "dataset": _dataset_name(train),
                     "steps": steps, "values": values})
    if not any(row["steps"] for row in rows):
        raise FluxrlError(f"No run logged metric '{metric}' (see the columns of train.csv / eval.csv).")
    return metric, rows


def _dataset_name(train: dict) -> str:
    """The dataset file's name; "default" for the task's generated default; "none (online)" without any (the
    engine's online-from-scratch case: no offline steps and no --dataset)."""
    if train.get("dataset"):
        return os.path.basename(train["dataset"])
    return "none (online)" if train.get("steps") == 0 else "default"


def markdown_table(run_dirs: list[str], metric: str | None = None) -> str:
    """A line naming the metric and its evaluation steps, then one table row per run."""
    metric, rows = table_rows(run_dirs, metric)
    step_sets = sorted({tuple(row["steps"]) for row in rows if row["steps"]})
    lines = [f"{metric} at steps {'; '.join(', '.join(str(t) for t in s) for s in step_sets)}", "",
             "| agent | preset | task | dataset | seeds | mean over seeds at each evaluation | final (mean ± std over "
             "seeds; per seed) |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        label = row["agent"] + (f" [{row['config']}]" if row["config"] else "")
        if row["steps"]:
            final = row["values"][row["steps"][-1]]
            means = " → ".join(f"{np.mean(row['values'][t]):.2f}" for t in row["steps"])
            result = f"{np.mean(final):.2f} ± {np.std(final):.2f} ({', '.join(f'{x:.2f}' for x in final)})"
            seeds = len(final)
        else:
            means, result, seeds = "not logged yet", "–", 0
        lines.append(f"| {label} | {row['preset']} | {row['task']} | {row['dataset']} | {seeds} | {means} | "
                     f"{result} |")
    return "\n".join(lines) + "\n"


def csv_table(run_dirs: list[str], metric: str | None = None) -> str:
    """One CSV row per run and evaluation step: mean and (population) std over seeds, per-seed values joined by ';'."""
    metric, rows = table_rows(run_dirs, metric)
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        for t in row["steps"]:
            values = row["values"][t]
            writer.writerow({**{k: row[k] for k in ("run_dir", "agent", "config", "preset", "task", "dataset")},
                             "metric": metric, "step": t, "seeds": len(values), "mean": repr(float(np.mean(values))),
                             "std": repr(float(np.std(values))), "per_seed": ";".join(repr(v) for v in values)})
    return out.getvalue()


def write_table(run_dirs: list[str], out: str, metric: str | None = None, overwrite: bool = False) -> str:
    """Write the table of `run_dirs` to `out`, Markdown (.md) or CSV (.csv) by extension; returns `out`."""
    from fluxrl.data.dataset import atomic_write_text

    kind = FORMATS.get(os.path.splitext(out)[1].lower())
    if kind is None:
        raise FluxrlError(f"Table path '{out}' must end with .md or .csv.")
    if os.path.exists(out) and not overwrite:
        raise FluxrlError(f"{out} already exists; refusing to overwrite it (pass --overwrite to replace it).")
    text = markdown_table(run_dirs, metric) if kind == "markdown" else csv_table(run_dirs, metric)
    atomic_write_text(out, text, overwrite=overwrite)
    return out
