"""benchmarks/learning_checks.py builds commands the CLI accepts: known agents, TrainConfig flags and agent
Config fields, each fine-tuning run reading its own pre-training run, every dataset with a generator."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import pytest

from fluxrl.names import parse_dataset, parse_task
from fluxrl.train.config import TrainConfig, resolve_agent

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "learning_checks.py")
spec = importlib.util.spec_from_file_location("learning_checks", SCRIPT)
checks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(checks)

TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def flags(argv):
    return {argv[i][2:]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}


@pytest.mark.parametrize("check", checks.CHECKS)
def test_commands_use_known_agents_and_fields(check, tmp_path):
    runs = checks.commands(check, "DATA", str(tmp_path), "cpu", None, None, None)
    assert len(runs) >= (2 if check in checks.ONLINE_CHECKS else 4) and len({d for d, _ in runs}) == len(runs)
    for run_dir, argvs in runs:
        assert argvs[-1][argvs[-1].index("--run_dir") + 1] == run_dir
        for argv in argvs:
            given = flags(argv)
            if check in checks.ONLINE_CHECKS:
                assert int(given["warmup_steps"]) < int(given["online_steps"])
            if check in checks.ONLINE_CHECKS and checks.ONLINE_CHECKS[check].dataset is None:
                # online from scratch: no dataset, no offline steps
                assert "dataset" not in given and given["steps"] == "0"
            else:  # offline, or offline-to-online: offline steps on the dataset first
                assert given["dataset"].startswith("DATA" + os.sep) and int(given["steps"]) > 0
            # A stopped run resumes from its last checkpoint, so there must be some before the end.
            assert int(given["save_interval"]) < int(given["steps"]) + int(given.get("online_steps", 0))
            if "eval_interval" in given:
                assert int(given["save_interval"]) <= int(given["eval_interval"])
            if argv[0] == "finetune":
                pretrain = argvs[0]
                assert argv[1] == pretrain[pretrain.index("--run_dir") + 1]
                assert set(given) <= TRAIN_FIELDS
                continue
            agent = resolve_agent(argv[1])
            config_fields = {f.name for f in dataclasses.fields(agent.Config)}
            for name in given:
                assert name in TRAIN_FIELDS or (name.startswith("agent.") and name[6:] in config_fields), (argv, name)


def test_overrides_and_selection(tmp_path):
    runs = checks.commands("cube2", "DATA", str(tmp_path), "paper", 1000, 5, {"qam", "flowq_lam1"})
    assert [os.path.basename(d) for d, _ in runs] == ["flowq_lam1", "qam"]
    for _, [argv] in runs:
        given = flags(argv)
        assert (given["steps"], given["seeds"], given["preset"]) == ("1000", "5", "paper")
    assert flags(runs[0][1][0])["agent.lam"] == "1.0"


def test_online_checks_override_the_online_steps(tmp_path):
    runs = checks.commands("pendulum", "DATA", str(tmp_path), "paper", 500, 2, {"fpmd"})
    [(run_dir, [argv])] = runs
    given = flags(argv)
    assert (argv[1], os.path.basename(run_dir)) == ("fpmd", "fpmd")
    assert (given["steps"], given["online_steps"], given["seeds"], given["preset"]) == ("0", "500", "2", "paper")
    assert checks.datasets_of("pendulum") == ()
    # Offline-to-online: the offline steps run on the check's dataset, the online steps are overridden.
    [(_, [argv])] = checks.commands("walker_o2o", "DATA", str(tmp_path), "cpu", 500, 2, {"swfp_h3"})
    given = flags(argv)
    assert (argv[1], given["steps"], given["online_steps"], given["agent.step_size"]) == ("swfp", "5000", "500", "3.0")
    assert given["dataset"] == os.path.join("DATA", checks.DATASETS["walker"].file)
    assert checks.datasets_of("walker_o2o") == ("walker",)


def test_every_dataset_has_a_generator():
    for key in checks.DATASETS:
        command = checks.dataset_command(key, "DATA")
        if command[1] == "demos":  # `fluxrl data demos TASK`: an OGBench task's oracle
            assert parse_task(command[2]).family in ("manipulation", "pointmaze")
        else:
            assert command[1] == "generate" and parse_dataset(command[2]).split == "train"


def test_dry_run_runs_nothing(tmp_path):
    out = subprocess.run([sys.executable, SCRIPT, "maze3", "--data", str(tmp_path / "d"), "--runs",
                          str(tmp_path / "r"), "--only", "bc", "--dry-run"], capture_output=True, text=True, check=True)
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("$ fluxrl data generate pointmaze-medium-navigate ")
    assert lines[1].startswith("$ fluxrl train bc --task pointmaze-medium-navigate-singletask-task3 ")
    assert not (tmp_path / "d").exists() and not (tmp_path / "r").exists()


def test_pretraining_checks_fine_tune_on_their_own_data(tmp_path):
    """InFOM's protocol on OGBench: pre-train on the play data, fine-tune (and train the baselines) on a separate,
    smaller set generated with another seed; walker uses one dataset for both phases."""
    for check, pre_key, ft_key in [("infom_cube2", "cube", "cube_ft"), ("infom_maze3", "maze", "maze_ft"),
                                   ("walker", "walker", "walker")]:
        pre_file, ft_file = checks.DATASETS[pre_key].file, checks.DATASETS[ft_key].file
        assert checks.datasets_of(check) == tuple(dict.fromkeys((pre_key, ft_key)))
        for _, argvs in checks.commands(check, "DATA", str(tmp_path), "cpu", None, None, None):
            *pretrain, last = argvs
            assert os.path.basename(flags(last)["dataset"]) == ft_file
            assert all(os.path.basename(flags(argv)["dataset"]) == pre_file for argv in pretrain)
    seeds = {checks.dataset_command(key, "DATA")[-1] for key in ("cube", "cube_ft")}
    assert seeds == {"0", "1"}
