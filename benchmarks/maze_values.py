"""How far has the value of a maze run's critic propagated? Q by shortest-path distance (in maze cells) to the goal.

    .venv/bin/python benchmarks/maze_values.py RUN_DIR [--samples 20000] [--step S]

For an OGBench single-task maze run of an agent with a `critic_values(params, obs, actions, config)` function
(FQL, GFP, Decision Flow): loads each seed's critic from the run's checkpoint, evaluates Q(s, a) on dataset rows,
and prints the mean Q of every BFS cell distance to the task's goal cell. With reward -1 per step and 0 at the
goal, a critic that has not seen the goal yet sits at -1/(1 - discount) everywhere; value that has propagated
rises towards 0 as the distance shrinks. Read-only: writes nothing.
"""

from __future__ import annotations

import argparse

import numpy as np

from fluxrl.data.io import load_dataset
from fluxrl.envs import make_env
from fluxrl.envs.ogbench_envs import BFSSubgoals
from fluxrl.train.export import restore_seed_states


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    args = parser.parse_args()
    agent, config, train, states, step = restore_seed_states(args.run_dir, args.step)
    if not hasattr(agent, "critic_values"):
        raise SystemExit(f"agent {agent.NAME} has no critic_values function.")
    data = load_dataset(train.dataset)
    rows = np.random.default_rng(0).choice(len(data["observations"]), args.samples, replace=False)
    observations = np.asarray(data["observations"][rows], np.float32)
    actions = np.clip(np.asarray(data["actions"][rows], np.float32), -1, 1)

    maze = make_env(train.task).unwrapped
    task_info = maze.task_infos[maze._reward_task_id - 1]  # the single-task id the task name selects
    distances = BFSSubgoals(maze).distances(tuple(task_info["goal_ij"]))
    cell = np.array([distances[tuple(maze.xy_to_ij(xy))] for xy in observations[:, :2]])
    goal_ij, start = task_info["goal_ij"], distances[tuple(task_info["init_ij"])]

    floor = -1.0 / (1.0 - config.discount)
    print(f"{args.run_dir}: agent {agent.NAME}, step {step}, {len(states)} seeds, {args.samples} dataset rows; "
          f"goal cell {tuple(int(x) for x in goal_ij)}, start at distance {start}; "
          f"-1/(1-discount) = {floor:.1f}")
    q = np.stack([np.asarray(agent.critic_values(s.params["critic"], observations, actions, config)).mean(0)
                  for s in states])  # (seeds, rows)
    print("| cells to goal | rows | mean Q(s, a_data) per seed |")
    print("|---|---|---|")
    for d in range(int(cell.max()) + 1):
        picked = cell == d
        if picked.any():
            per_seed = ", ".join(f"{x:.1f}" for x in q[:, picked].mean(1))
            print(f"| {d} | {int(picked.sum())} | {per_seed} |")


if __name__ == "__main__":
    main()
