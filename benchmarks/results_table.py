"""Markdown table of evaluation results of fluxrl run directories (what docs/results.md records).

Usage: .venv/bin/python benchmarks/results_table.py RUN_DIR... [--metric evaluation/success]

One row per run: agent (with the agent-config values that differ between runs of that agent), preset, task,
dataset file, seeds, the metric's mean over seeds at every evaluation step, and the final value as mean ± standard
deviation over seeds with the per-seed values.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from fluxrl.train.plotting import config_differences, run_curves


def row(run_dir: str, metric: str, differences: str) -> tuple[list[int], str]:
    with open(os.path.join(run_dir, "config.json")) as f:
        record = json.load(f)
    train = record["train"]
    curves = run_curves(run_dir, metric)
    if not curves:
        raise SystemExit(f"error: {run_dir} has no {metric} in eval.csv.")
    steps = sorted(set.intersection(*(set(s.tolist()) for s, _ in curves.values())))
    by_step = {int(t): [float(v[list(s).index(t)]) for s, v in curves.values()] for t in steps}
    final = by_step[steps[-1]]
    means = " → ".join(f"{np.mean(by_step[t]):.2f}" for t in steps)
    label = record["agent"] + (f" [{differences}]" if differences else "")
    text = (f"| {label} | {train['preset']} | {train['task']} | {os.path.basename(train['dataset'] or '')} "
            f"| {len(curves)} | {means} | {np.mean(final):.2f} ± {np.std(final):.2f} "
            f"({', '.join(f'{x:.2f}' for x in final)}) |")
    return steps, text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--metric", default="evaluation/success")
    args = parser.parse_args()
    differences = config_differences(args.runs)
    rows = [row(r, args.metric, differences[r]) for r in args.runs]
    steps = sorted({tuple(s) for s, _ in rows})
    print(f"{args.metric} at steps {'; '.join(', '.join(str(t) for t in s) for s in steps)}\n")
    print("| agent | preset | task | dataset | seeds | mean over seeds at each evaluation | final (mean ± std over "
          "seeds; per seed) |")
    print("|---|---|---|---|---|---|---|")
    for _, text in rows:
        print(text)


if __name__ == "__main__":
    main()
