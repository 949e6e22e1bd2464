"""Names follow OGBench: datasets, single tasks (with the default task), DMC tasks, -v0 and -val suffixes."""

import pytest

from fluxrl.errors import FluxrlError
from fluxrl.names import all_task_names, parse_dataset, parse_task


def test_dataset_names():
    d = parse_dataset("cube-single-play-v0")
    assert (d.name, d.family, d.env, d.mode, d.split) == ("cube-single-play", "manipulation", "cube-single", "play", "train")
    v = parse_dataset("pointmaze-large-navigate-val")
    assert (v.family, v.split, v.file_stem) == ("pointmaze", "val", "pointmaze-large-navigate-val")
    assert parse_dataset("walker-explore").family == "dmc"


def test_task_names_and_defaults():
    t = parse_task("cube-single-play-singletask-task2-v0")
    assert (t.name, t.task_id, t.dataset.name, t.ogbench_env_id) == (
        "cube-single-play-singletask-task2", 2, "cube-single-play", "cube-single-singletask-task2-v0")
    assert parse_task("cube-double-noisy-singletask").task_id == 2  # OGBench's default manipulation task
    assert parse_task("pointmaze-medium-navigate-singletask").task_id == 1  # and locomaze's
    assert parse_task("pointmaze-medium-navigate-singletask-task3").ogbench_env_id == "pointmaze-medium-singletask-task3-v0"
    j = parse_task("jaco-reach_top_left")
    assert (j.family, j.task, j.dataset.name, j.task_id) == ("dmc", "reach_top_left", "jaco-explore", None)
    assert len(all_task_names()) == 10 * 5 + 2 * 5 + 16 + 21
    h = parse_task("Hopper-v4")
    assert (h.name, h.family, h.task, h.dataset, h.task_id) == ("Hopper-v4", "gym", "Hopper-v4", None, None)
    assert "Pusher-v5" in all_task_names() and "Pusher-v4" not in all_task_names()  # v4 needs mujoco<3


@pytest.mark.parametrize("bad", ["cube-single-play-singletask-task6", "cube-single-singletask-task1", "walker-fly",
                                 "walker-explore-singletask-task1", "", "cube-single-play-val-singletask-task1",
                                 "hopper-v4", "Hopper-v3", "Pusher-v4"])
def test_unknown_tasks_raise(bad):
    with pytest.raises(FluxrlError, match="Unknown task"):
        parse_task(bad)


def test_unknown_dataset_raises():
    with pytest.raises(FluxrlError, match="Unknown dataset name 'cube-nonuple-play'"):
        parse_dataset("cube-nonuple-play")
