"""RUN_DIR/summary.md: what was trained, on what, with which versions, and the final scores."""

from __future__ import annotations

import hashlib
import json
import os
import platform

import numpy as np

from fluxrl import installed_version
from fluxrl.data.dataset import is_compact, num_episodes, num_transitions

VERSIONED_PACKAGES = ("fluxrl", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "ogbench", "mujoco",
                      "dm_control", "gymnasium", "numpy")
SUMMARY_FILE = "summary.md"


def versions() -> dict[str, str]:
    out = {}
    for package in VERSIONED_PACKAGES:
        out[package] = installed_version(package) or "not installed"
    out["python"] = platform.python_version()
    out["platform"] = platform.platform()
    import jax

    device = jax.devices()[0]
    out["device"] = f"{device.platform}: {getattr(device, 'device_kind', device)}"
    return out


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_metadata(path: str, data: dict, meta: dict) -> dict:
    """Path, checksum, size and form of a loaded dataset, plus the metadata stored with it (e.g. the generator)."""
    return {
        "path": path,
        "sha256": file_sha256(path) if os.path.isfile(path) else None,
        "transitions": num_transitions(data) if not is_compact(data) else int(np.sum(np.asarray(data["valids"]))),
        "episodes": num_episodes(data),
        "form": "compact" if is_compact(data) else "regular",
        "fields": {k: f"{np.asarray(v).dtype}{list(np.shape(v)[1:])}" for k, v in data.items()},
        "meta": {k: str(v) for k, v in meta.items()},
    }


def write_summary(run_dir: str, record: dict, status: str, step: int, total_steps: int, seeds: list[int],
                  dataset: dict | None, last_eval: dict | None, task_defaults: str | None = None) -> None:
    """(Re)write summary.md atomically; called at the start, at every checkpoint, at the end, on divergence and on
    interruption. task_defaults: the sentence naming the per-task fields left at the agent's defaults."""
    train = record["train"]
    lines = [
        f"# {record['agent']} on {train['task']}",
        "",
        f"- status: {status} (step {step} of {total_steps})",
        f"- agent: {record['agent']}, preset {train['preset']} (a `cpu` preset result is not a paper result)",
        f"- seeds: {', '.join(map(str, seeds))}",
        f"- steps: {train['steps']} offline + {train['online_steps']} online"
        + (" (balanced sampling)" if train.get("balanced_sampling") else ""),
    ]
    if task_defaults:
        lines.append(f"- per-task values: {task_defaults}")
    if dataset:
        checksum = f", sha256 {dataset['sha256']}" if dataset["sha256"] else ""
        lines.append(f"- dataset: {dataset['path']} ({dataset['transitions']} transitions, {dataset['episodes']} "
                     f"episodes, {dataset['form']} form{checksum})")
        lines += [f"  - {k}: {v}" for k, v in dataset["meta"].items()]
        lines.append(f"- validation split: {dataset.get('validation_path', 'none')}")
    else:
        lines.append("- dataset: none (online from scratch)")
    lines += ["", "## Final scores", ""]
    if last_eval:
        lines += _eval_table(last_eval)
    else:
        lines.append("No evaluation yet." if train["eval_episodes"] else "Evaluation disabled (--eval_episodes 0).")
    lines += ["", "## Configuration", "", "```json", json.dumps(record, indent=2), "```", "", "## Versions", ""]
    lines += [f"- {k}: {v}" for k, v in versions().items()]
    if dataset:
        lines += ["", "## Dataset fields", ""] + [f"- {k}: {v}" for k, v in dataset["fields"].items()]
    tmp = os.path.join(run_dir, f".{SUMMARY_FILE}.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(run_dir, SUMMARY_FILE))


def _eval_table(last_eval: dict) -> list[str]:
    rows = last_eval["rows"]
    metrics = [k for k in rows[0] if k.startswith("evaluation/")]
    lines = [f"Evaluation at step {last_eval['step']}:", "",
             "| seed | " + " | ".join(m.split("/", 1)[1] for m in metrics) + " |",
             "|---" * (len(metrics) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row['seed']} | " + " | ".join(f"{row[m]:.4g}" for m in metrics) + " |")
    means = [np.mean([r[m] for r in rows]) for m in metrics]
    stds = [np.std([r[m] for r in rows]) for m in metrics]
    lines.append("| mean ± std | " + " | ".join(f"{m:.4g} ± {s:.2g}" for m, s in zip(means, stds)) + " |")
    return lines
