"""`fluxrl demo`: the main job on an embedded default, end to end on a laptop CPU (no download, no prior step).

InFOM's two phases on DeepMind Control's walker, as in the paper's ExORL experiments (at laptop scale):
1. generate a small reward-free walker exploration dataset (fluxrl's ExORL stand-in: open-loop exploration
   processes; each row records which process acted);
2. evaluate a random policy on the task (reference point);
3. pre-train InFOM (cpu preset) on the dataset without rewards: intention encoder, flow occupancy model, BC actor;
   write the t-SNE plot of the inferred intentions coloured by the exploration process;
4. fine-tune it on the same transitions labelled with walker-stand's reward (relabelled exactly from the stored
   physics states), evaluating as it goes (the step-0 evaluation is the pre-trained behaviour-cloning actor);
5. write learning curves, a results table and each run's summary into the output directory.

Everything here is a `cpu`-preset result on a small locally generated dataset: it shows the pipeline working and
learning, not the paper's numbers.
"""

from __future__ import annotations

import os
import shutil
import time

import numpy as np

from fluxrl.errors import FluxrlError

TASK = "walker-stand"
DATASET = "walker-explore"
EPISODES, VAL_EPISODES = 100, 10  # 100k + 10k transitions (InFOM pre-trains on 1M)
AGENT = "infom"
PRETRAIN_STEPS = 3_000
FINETUNE_STEPS = 3_000
SEEDS = 2
EVAL_INTERVAL, EVAL_EPISODES = 1_000, 5


def run_demo(out: str, quiet: bool = False) -> int:
    from fluxrl.data.generate import generate
    from fluxrl.data.info import dataset_info
    from fluxrl.train.config import TrainConfig
    from fluxrl.train.engine import Trainer
    from fluxrl.train.plotting import plot_runs

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    started = time.time()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))

    data_path = os.path.join(out, "data", f"{DATASET}.npz")
    if not os.path.exists(data_path):
        say(f"[1/5] generating {DATASET}: {EPISODES} episodes of 1000 steps (+{VAL_EPISODES} validation episodes)")
        generate(DATASET, data_path, episodes=EPISODES, val_episodes=VAL_EPISODES, seed=0,
                 workers=os.cpu_count() or 1, progress=not quiet)
    else:
        say(f"[1/5] reusing {data_path}")
    with open(os.path.join(out, "dataset_info.txt"), "w") as f:
        f.write(dataset_info(data_path) + "\n")

    say("[2/5] evaluating a random policy for reference")
    references = _reference_scores(EVAL_EPISODES)

    common = dict(task=TASK, dataset=data_path, seeds=SEEDS, preset="cpu", log_interval=500, quiet=quiet)
    pre_dir, ft_dir = os.path.join(out, "runs", "pretrain"), os.path.join(out, "runs", "finetune")
    say(f"[3/5] pre-training {AGENT} without rewards: cpu preset, {PRETRAIN_STEPS} steps, {SEEDS} seeds -> {pre_dir}")
    pre = Trainer(f"{AGENT}:pretrain", TrainConfig(steps=PRETRAIN_STEPS, run_dir=pre_dir, eval_episodes=0,
                                                  save_interval=PRETRAIN_STEPS, **common))
    pre.run()
    say(f"[4/5] fine-tuning on {TASK}'s rewards: {FINETUNE_STEPS} steps -> {ft_dir}")
    finetune = Trainer(AGENT, TrainConfig(steps=FINETUNE_STEPS, run_dir=ft_dir, init_from=pre_dir,
                                          eval_interval=EVAL_INTERVAL, eval_episodes=EVAL_EPISODES,
                                          save_interval=FINETUNE_STEPS, **common), pre.agent_config)
    result = finetune.run()

    say("[5/5] writing curves, the intention plot and the results table")
    plot_runs([ft_dir], os.path.join(out, "learning_curve.png"), metric="evaluation/return", overwrite=True)
    plot_runs([pre_dir], os.path.join(out, "pretraining_loss.png"), metric="training/flow_occupancy/flow_matching_loss",
              overwrite=True)
    shutil.copyfile(os.path.join(pre_dir, "intentions.png"), os.path.join(out, "intentions.png"))
    table = _results_table(ft_dir, result, references, time.time() - started)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(table)
    say("\n" + table)
    say(f"outputs in {out}: results.md, learning_curve.png, intentions.png, pretraining_loss.png, dataset_info.txt, "
        f"runs/*/summary.md")
    return 0


def _reference_scores(episodes: int) -> dict:
    from fluxrl.envs import make_env
    from fluxrl.envs.evaluate import evaluate

    space = make_env(TASK).action_space
    random = evaluate(TASK, lambda obs, rng: rng.uniform(space.low, space.high).astype(np.float32),
                      episodes=episodes, seed=0)
    return {"uniform random": random}


def _results_table(ft_dir: str, result, references: dict, seconds: float) -> str:
    from fluxrl.train.plotting import run_curves

    if not result.last_eval:
        raise FluxrlError("The fine-tuning run ended without an evaluation.")
    returns = run_curves(ft_dir, "evaluation/return")
    lines = [
        f"# fluxrl demo: InFOM on {TASK}",
        "",
        f"Preset `cpu` (small networks), dataset {DATASET} generated locally ({EPISODES} episodes x 1000 steps, "
        f"seed 0), {PRETRAIN_STEPS} reward-free pre-training steps then {FINETUNE_STEPS} fine-tuning steps on the "
        f"same transitions with the task's reward, {SEEDS} seeds, {EVAL_EPISODES} evaluation episodes per seed and "
        f"evaluation. Not a paper-preset number. Wall time {seconds / 60:.1f} min.",
        "",
        "| policy | return (mean over seeds) | per seed |",
        "|---|---|---|",
    ]
    for label, index in (("pre-trained BC actor (fine-tuning step 0)", 0), ("fine-tuned InFOM", -1)):
        step = max(int(curve[0][index]) for curve in returns.values())
        per_seed = [float(curve[1][index]) for curve in returns.values()]
        lines.append(f"| {label}, step {step} | {np.mean(per_seed):.1f} | {', '.join(f'{r:.1f}' for r in per_seed)} |")
    for name, r in references.items():
        lines.append(f"| {name} | {r.mean_return:.1f} | - |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    sys.exit(run_demo(sys.argv[1] if len(sys.argv) > 1 else "demo_out"))
