"""Dataset and task names, spelled as OGBench spells them.

Datasets:  cube-single-play, cube-double-noisy, scene-play, puzzle-4x4-play, pointmaze-medium-navigate,
           walker-explore, ...   (a trailing `-v0` is accepted; `-val` names the validation split)
Tasks:     <dataset>-singletask-task{1..5} (or `<dataset>-singletask` for the env's default task),
           e.g. cube-single-play-singletask-task2, pointmaze-medium-navigate-singletask-task1;
           DMC tasks as <domain>-<task>, e.g. walker-walk, jaco-reach_top_left (dataset <domain>-explore);
           Gymnasium's MuJoCo tasks by their Gymnasium ids, e.g. HalfCheetah-v4, Hopper-v5 (no default dataset:
           online from scratch, or a dataset the user has, such as a D4RL hdf5 file).
"""

from __future__ import annotations

import dataclasses
import re

from fluxrl.errors import FluxrlError

MANIPULATION_ENVS = ("cube-single", "cube-double", "scene", "puzzle-3x3", "puzzle-4x4")
MANIPULATION_MODES = ("play", "noisy")
POINTMAZE_ENVS = ("pointmaze-medium", "pointmaze-large")
POINTMAZE_MODES = ("navigate",)
# ExORL's domains and the tasks evaluated on them (URLB task set; several are not in dm_control's suite).
DMC_TASKS = {
    "walker": ("walk", "run", "stand", "flip"),
    "cheetah": ("run", "run_backward", "walk", "walk_backward"),
    "quadruped": ("run", "jump", "stand", "walk"),
    "jaco": ("reach_top_left", "reach_top_right", "reach_bottom_left", "reach_bottom_right"),
}
DMC_DATASET_MODE = "explore"
# Gymnasium's MuJoCo locomotion and control tasks (FPMD's benchmark is v4). Pusher-v4 needs mujoco<3: v5 only.
GYM_MUJOCO_TASKS = tuple(
    f"{env}-{version}"
    for env in ("Ant", "HalfCheetah", "Hopper", "Humanoid", "HumanoidStandup", "InvertedDoublePendulum",
                "InvertedPendulum", "Pusher", "Reacher", "Swimmer", "Walker2d")
    for version in ("v4", "v5")
    if (env, version) != ("Pusher", "v4")
)
GYM_FAMILY = "gym"
OGBENCH_TASK_IDS = (1, 2, 3, 4, 5)
# OGBench's default single task when the name has no task number.
OGBENCH_DEFAULT_TASK = {"pointmaze": 1}
OGBENCH_DEFAULT_TASK_OTHER = 2


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    name: str  # canonical dataset name, without -v0 / -val, e.g. "cube-single-play"
    family: str  # "manipulation" | "pointmaze" | "dmc"
    env: str  # environment part, e.g. "cube-single", "pointmaze-medium", "walker"
    mode: str  # "play" | "noisy" | "navigate" | "explore"
    split: str = "train"  # "train" | "val"

    @property
    def file_stem(self) -> str:
        return self.name + ("-val" if self.split == "val" else "")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str  # canonical task name, e.g. "cube-single-play-singletask-task2", "walker-walk", "Hopper-v4"
    dataset: DatasetSpec | None  # the task's default (reward-free) dataset; None for Gymnasium MuJoCo tasks
    task: str  # OGBench: "task2"; DMC: "walk"; Gymnasium: the env id

    @property
    def family(self) -> str:
        return self.dataset.family if self.dataset is not None else GYM_FAMILY

    @property
    def task_id(self) -> int | None:
        """OGBench task number, None for DMC tasks."""
        return int(self.task[4:]) if self.task.startswith("task") else None

    @property
    def ogbench_env_id(self) -> str:
        """The gymnasium id OGBench registers for this task, e.g. 'cube-single-singletask-task2-v0'."""
        if self.family in ("dmc", GYM_FAMILY):
            raise ValueError(f"{self.name} is not an OGBench task")
        return f"{self.dataset.env}-singletask-{self.task}-v0"


def _strip_version(name: str) -> str:
    return re.sub(r"-v0$", "", name.strip())


def all_dataset_names() -> list[str]:
    names = [f"{e}-{m}" for e in MANIPULATION_ENVS for m in MANIPULATION_MODES]
    names += [f"{e}-{m}" for e in POINTMAZE_ENVS for m in POINTMAZE_MODES]
    names += [f"{d}-{DMC_DATASET_MODE}" for d in DMC_TASKS]
    return names


def all_task_names() -> list[str]:
    names = []
    for d in all_dataset_names():
        spec = parse_dataset(d)
        if spec.family == "dmc":
            names += [f"{spec.env}-{t}" for t in DMC_TASKS[spec.env]]
        else:
            names += [f"{d}-singletask-task{i}" for i in OGBENCH_TASK_IDS]
    return names + list(GYM_MUJOCO_TASKS)


def parse_dataset(name: str) -> DatasetSpec:
    """Parse a dataset name such as 'cube-single-play', 'cube-single-play-val' or 'walker-explore-v0'."""
    raw = name
    name = _strip_version(name)
    split = "train"
    if name.endswith("-val"):
        split, name = "val", _strip_version(name[: -len("-val")])
    for env in MANIPULATION_ENVS:
        for mode in MANIPULATION_MODES:
            if name == f"{env}-{mode}":
                return DatasetSpec(name, "manipulation", env, mode, split)
    for env in POINTMAZE_ENVS:
        for mode in POINTMAZE_MODES:
            if name == f"{env}-{mode}":
                return DatasetSpec(name, "pointmaze", env, mode, split)
    for domain in DMC_TASKS:
        if name == f"{domain}-{DMC_DATASET_MODE}":
            return DatasetSpec(name, "dmc", domain, DMC_DATASET_MODE, split)
    raise FluxrlError(
        f"Unknown dataset name '{raw}'; known datasets: {', '.join(all_dataset_names())} (optionally with -val or -v0)."
    )


def parse_task(name: str) -> TaskSpec:
    """Parse a task name such as 'cube-single-play-singletask-task2', 'pointmaze-medium-navigate-singletask' or
    'jaco-reach_top_left' (a trailing -v0 is accepted)."""
    raw = name
    name = _strip_version(name)
    m = re.fullmatch(r"(.+)-singletask(?:-task(\d+))?", name)
    if m:
        try:
            dataset = parse_dataset(m.group(1))
        except FluxrlError:
            dataset = None
        if dataset is not None and dataset.family != "dmc" and dataset.split == "train":
            default = OGBENCH_DEFAULT_TASK.get(dataset.family, OGBENCH_DEFAULT_TASK_OTHER)
            task_id = int(m.group(2)) if m.group(2) else default
            if task_id in OGBENCH_TASK_IDS:
                return TaskSpec(f"{dataset.name}-singletask-task{task_id}", dataset, f"task{task_id}")
    domain, _, task = name.partition("-")
    if domain in DMC_TASKS and task in DMC_TASKS[domain]:
        return TaskSpec(name, parse_dataset(f"{domain}-{DMC_DATASET_MODE}"), task)
    if raw.strip() in GYM_MUJOCO_TASKS:
        return TaskSpec(raw.strip(), None, raw.strip())
    raise FluxrlError(
        f"Unknown task name '{raw}'; tasks look like cube-single-play-singletask-task2, "
        f"pointmaze-medium-navigate-singletask-task1, walker-walk or Hopper-v4 (run `fluxrl tasks` for the full list)."
    )


def has_success(task: str) -> bool:
    """Whether the task's environment reports success (OGBench tasks do; DMC and Gymnasium tasks do not)."""
    try:
        return parse_task(task).task_id is not None
    except FluxrlError:  # a name the test fakes invent
        return True
