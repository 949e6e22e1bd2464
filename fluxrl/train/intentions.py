"""What an intention encoder has learned: its posterior means on dataset rows, a 2-D t-SNE embedding of them
coloured by the behaviour goal the data collector was pursuing, and a linear probe of that goal.

An agent exposes `intentions(state, observations, actions) -> (rows, latent_dim)` posterior means of
p_e(z | s', a') (InFOM does). The engine calls `write_intentions` at the end of a run of such an agent when the
dataset records its behaviour goals (fluxrl's OGBench generators do):
  - point-maze navigation: `behavior_goal_ids` is the goal cell, so the label is the cell;
  - manipulation: ids only count targets within an episode, so the label is one of 8 k-means clusters of the
    `behavior_goals` vectors (the target's one-hot task, position and states), i.e. "which kind of target";
  - DMC exploration data: the exploration process (white / ou / hold / sine) that chose the row's action.
Outputs in the run directory: intentions.png (seed 0) and intentions.json (probe accuracy per seed, the accuracy
of the same probe on the raw (s', a') inputs, and the majority-class rate). The probe is multinomial logistic
regression on a 70/30 split; comparing it with the raw-input probe tells whether z carries goal information
beyond what (s', a') already shows linearly.
"""

from __future__ import annotations

import json
import os

import numpy as np

SAMPLE_ROWS = 2000
GOAL_CLUSTERS = 8
EXPLORATION_MODES = ("white", "ou", "hold", "sine")  # fluxrl.data.generate_dmc.MODES (importing it needs dm_control)


def goal_labels(data: dict, task: str) -> tuple[np.ndarray, str] | None:
    """(per-row labels, what they are) from the dataset's behaviour goals; None when it records none."""
    if "behavior_goal_ids" not in data:
        return None
    ids = np.asarray(data["behavior_goal_ids"]).astype(np.int64)
    if "maze" in task:
        return ids, "goal cell"
    if "behavior_goals" not in data:  # DMC exploration data: the exploration process of the row
        return ids, "exploration mode (" + ", ".join(f"{i} {m}" for i, m in enumerate(EXPLORATION_MODES)) + ")"
    from sklearn.cluster import KMeans

    goals = np.asarray(data["behavior_goals"], np.float64)
    rows = np.random.default_rng(0).choice(len(goals), min(len(goals), 20000), replace=False)
    kmeans = KMeans(GOAL_CLUSTERS, n_init=4, random_state=0).fit(goals[rows])
    return kmeans.predict(goals).astype(np.int64), f"goal cluster (k-means, k={GOAL_CLUSTERS})"


def sample_rows(data: dict, task: str, rows: int = SAMPLE_ROWS, seed: int = 0) -> dict | None:
    """A fixed random subset of (s', a') rows with their goal labels (valid rows only), or None."""
    labelled = goal_labels(data, task)
    if labelled is None:
        return None
    labels, label_name = labelled
    valid = np.flatnonzero(np.asarray(data["valids"]) > 0.5) if "valids" in data else np.arange(len(labels))
    chosen = np.sort(np.random.default_rng(seed).choice(valid, min(rows, len(valid)), replace=False))
    return {
        "observations": np.asarray(data["observations"][chosen], np.float32),
        "actions": np.asarray(data["actions"][chosen], np.float32),
        "labels": labels[chosen],
        "label_name": label_name,
    }


def probe_accuracy(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
    """Held-out accuracy (30%) of multinomial logistic regression predicting `labels` from `features`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=0.3, random_state=seed)
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=2000).fit(scaler.transform(x_train), y_train)
    return float(probe.score(scaler.transform(x_test), y_test))


def plot_embedding(latents: np.ndarray, labels: np.ndarray, label_name: str, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    embedded = TSNE(2, perplexity=30, init="pca", random_state=0).fit_transform(latents)
    values = np.unique(labels)
    colours = plt.get_cmap("tab20" if len(values) > 10 else "tab10")
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for i, value in enumerate(values):
        mask = labels == value
        ax.scatter(embedded[mask, 0], embedded[mask, 1], s=6, color=colours(i % colours.N), label=str(value))
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    if len(values) <= 20:
        ax.legend(title=label_name.replace(" (", "\n("), fontsize=6, title_fontsize=7, markerscale=2,
                  loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_intentions(run_dir: str, latents_per_seed: list[np.ndarray], sample: dict, seeds: list[int],
                     title: str) -> dict:
    """intentions.json (probe accuracies) and intentions.png (t-SNE of seed 0's latents); returns the record."""
    labels = sample["labels"]
    raw = np.concatenate([sample["observations"], sample["actions"]], axis=1)
    majority = float(np.bincount(labels).max() / len(labels))
    record = {
        "label": sample["label_name"],
        "rows": int(len(labels)),
        "classes": int(len(np.unique(labels))),
        "majority_rate": majority,
        "raw_input_probe_accuracy": probe_accuracy(raw, labels),
        "latent_probe_accuracy": {str(s): probe_accuracy(z, labels) for s, z in zip(seeds, latents_per_seed)},
    }
    tmp = os.path.join(run_dir, "intentions.json.tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2)
    os.replace(tmp, os.path.join(run_dir, "intentions.json"))
    accuracy = record["latent_probe_accuracy"][str(seeds[0])]
    plot_embedding(latents_per_seed[0], labels, sample["label_name"],
                   f"{title}\nt-SNE of E[z | s', a'] (seed {seeds[0]}), {len(labels)} rows\ngoal probe accuracy "
                   f"{accuracy:.2f} (raw inputs {record['raw_input_probe_accuracy']:.2f}, majority {majority:.2f})",
                   os.path.join(run_dir, "intentions.png"))
    return record
