"""`fluxrl train | export | eval | plot | table` end to end with the tiny agent and env, the dataset cache, and bad
input."""

import csv
import importlib.metadata
import json
import os
import sys
import threading

import gymnasium
import jax
import numpy as np
import pytest

from fluxrl.cli_train import main
from fluxrl.data import cache
from fluxrl.data import generate as generate_module
from fluxrl.data.dataset import regular_to_raw, save_npz
from fluxrl.train import external, load_policy
from fluxrl.train.checkpoint import Checkpointer, parse_signature
from fluxrl.train.export import restore_seed_states

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import test_engine as tiny  # noqa: E402


@pytest.fixture(autouse=True)
def fakes(monkeypatch):
    monkeypatch.setattr(external, "make_env", tiny.fake_make_env)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return tiny.write_dataset(str(tmp_path_factory.mktemp("data")))


def train_argv(run_dir, dataset, *extra):
    return ["train", "test_engine", "--task", tiny.TASK, "--dataset", dataset, "--steps", "40", "--seeds", "2",
            "--preset", "cpu", "--run_dir", str(run_dir), "--updates_per_call", "10", "--log_interval", "10",
            "--eval_interval", "20", "--eval_episodes", "2", "--save_interval", "20", "--quiet", *extra]


def one_error_line(capsys, *fragments):
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, dataset):
    """One CLI run shared by the tests below: 2 seeds, preset cpu, one agent flag given."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    mp = pytest.MonkeyPatch()
    mp.setattr(external, "make_env", tiny.fake_make_env)
    try:
        assert main(train_argv(run, dataset, "--agent.lr", "0.1")) == 0
    finally:
        mp.undo()
    return run


def test_preset_then_task_values_then_explicit_flags(trained):
    record = json.loads((trained / "config.json").read_text())
    assert record["agent"] == "test_engine"
    assert record["agent_config"]["batch_size"] == 8  # from --preset cpu
    assert record["agent_config"]["lr"] == 0.1  # explicit flag
    assert record["agent_config"]["noise"] == 0.1  # untouched default
    assert record["train"]["steps"] == 40 and record["train"]["seeds"] == 2


def test_export_and_load_policy(trained, tmp_path, capsys):
    out = tmp_path / "policy"
    assert main(["export", str(trained), "--seed", "1", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    meta = json.loads((out / "policy.json").read_text())
    # Only what act reads is exported: w and b, not the value weights v nor the optimizer moments.
    assert [a["signature"] for a in meta["arrays"]] == [".params['b'] float32[2]", ".params['w'] float32[3,2]"]
    with np.load(out / "params.npz", allow_pickle=False) as params:
        assert sorted(params.files) == ["000000", "000001"]

    policy = load_policy(str(out))
    arrays, ck_meta = Checkpointer(str(trained / "checkpoints")).read_arrays()
    storage_key = {parse_signature(s)[0]: f"{i:06d}" for i, s in enumerate(ck_meta["leaf_signature"])}
    w = np.asarray(arrays[storage_key[".agent.params['w']"]])[1]  # seed 1 is the second of the run's seeds
    b = np.asarray(arrays[storage_key[".agent.params['b']"]])[1]
    obs = np.random.default_rng(0).uniform(-1, 1, (5, tiny.OBS_DIM)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(policy(obs)), np.clip(obs @ w + b, -1, 1), rtol=1e-6, atol=1e-6)
    single = np.asarray(policy(obs[0]))
    assert single.shape == (tiny.ACT_DIM,)
    np.testing.assert_allclose(single, np.asarray(policy(obs))[0], rtol=1e-6)
    noisy = np.asarray(policy(obs, key=jax.random.key(3), deterministic=False))
    assert not np.allclose(noisy, np.asarray(policy(obs)))
    with pytest.raises(ValueError, match="need a key"):
        policy(obs, deterministic=False)

    # An existing export path is never overwritten.
    assert main(["export", str(trained), "--seed", "1", "--out", str(out)]) == 2
    one_error_line(capsys, "already exists")
    assert main(["export", str(trained), "--seed", "7"]) == 2
    one_error_line(capsys, "--seed 7 is not a seed", "0, 1")


def test_export_from_a_checkout_that_is_not_installed(trained, tmp_path, monkeypatch):
    """fluxrl run from a source tree on PYTHONPATH has no package metadata: the export says so, and works."""
    def no_metadata(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", no_metadata)
    out = tmp_path / "policy"
    assert main(["export", str(trained), "--seed", "0", "--out", str(out)]) == 0
    assert json.loads((out / "policy.json").read_text())["fluxrl_version"] == "unknown (not installed)"
    assert load_policy(str(out))(np.zeros(tiny.OBS_DIM, np.float32)).shape == (tiny.ACT_DIM,)


@pytest.mark.parametrize("eval_deterministic", [True, False])
def test_eval_of_an_exported_policy_reproduces_its_runs_evaluation(eval_deterministic, dataset, tmp_path,
                                                                   monkeypatch, capsys):
    """`fluxrl eval --policy EXPORTED` acts as the run's evaluation did: the same episodes and (for an agent that
    samples when evaluated) the same keys, so the run's seed gives the run's numbers."""
    from fluxrl.cli import main as fluxrl_main
    from fluxrl.train.engine import EVAL_EPISODE_SALT, episode_seed

    monkeypatch.setattr(tiny, "EVAL_DETERMINISTIC", eval_deterministic, raising=False)
    run = tmp_path / "run"
    assert main(train_argv(run, dataset, "--eval_episodes", "3")) == 0
    final = [r for r in tiny._csv(run / "eval.csv") if r["step"] == "40" and r["seed"] == "1"][0]
    assert main(["export", str(run), "--seed", "1", "--out", str(tmp_path / "policy")]) == 0
    capsys.readouterr()

    seed = episode_seed(1, EVAL_EPISODE_SALT, 40)
    report = tmp_path / "eval.json"
    # No task named: the policy's own.
    assert fluxrl_main(["eval", "--policy", str(tmp_path / "policy"), "--episodes", "3", "--seed", str(seed),
                        "--json", str(report)]) == 0
    out = capsys.readouterr().out
    acting = "deterministic" if eval_deterministic else "sampled"
    header = f"test_engine policy (seed 1, step 40, trained on {tiny.TASK}) on {tiny.TASK}: actions {acting}, as in"
    assert header in out
    result = json.loads(report.read_text())
    assert result["task"] == tiny.TASK and result["episodes"] == 3 and len(result["returns"]) == 3
    assert result["mean_return"] == pytest.approx(float(final["evaluation/return"]), rel=1e-6)
    assert result["success_rate"] == pytest.approx(float(final["evaluation/success"]))
    assert result["mean_length"] == pytest.approx(float(final["evaluation/length"]))

    # The other acting mode, asked for explicitly, acts differently.
    flag = "--stochastic" if eval_deterministic else "--deterministic"
    other = tmp_path / "other.json"
    assert fluxrl_main(["eval", tiny.TASK, "--policy", str(tmp_path / "policy"), "--episodes", "3", "--seed",
                        str(seed), flag, "--json", str(other)]) == 0
    assert f"actions {'sampled' if eval_deterministic else 'deterministic'}\n" in capsys.readouterr().out
    assert json.loads(other.read_text())["returns"] != result["returns"]


def test_eval_refuses_what_it_cannot_evaluate(trained, tmp_path, monkeypatch, capsys):
    from fluxrl.cli import main as fluxrl_main

    policy = tmp_path / "policy"
    assert main(["export", str(trained), "--out", str(policy)]) == 0
    capsys.readouterr()
    assert fluxrl_main(["eval", "--policy", str(trained)]) == 2
    one_error_line(capsys, "is a run directory", f"fluxrl export {trained}")
    assert fluxrl_main(["eval", tiny.TASK, "--policy", str(tmp_path / "nothing")]) == 2
    one_error_line(capsys, "expected 'oracle', 'random' or the directory of an exported policy")
    assert fluxrl_main(["eval", "--policy", "random"]) == 2
    one_error_line(capsys, "name the task")
    assert fluxrl_main(["eval", tiny.TASK, "--policy", "oracle", "--deterministic"]) == 2
    one_error_line(capsys, "apply to an exported policy")

    # Existing result files are kept, before any episode runs.
    for flag, name in (("--json", "old.json"), ("--video", "old.mp4")):
        (tmp_path / name).write_text("keep me")
        assert fluxrl_main(["eval", "--policy", str(policy), flag, str(tmp_path / name)]) == 2
        one_error_line(capsys, "already exists", flag)
        assert (tmp_path / name).read_text() == "keep me"

    class WiderEnv(tiny.LineEnv):
        def __init__(self, seed=None, render_size=None):
            super().__init__(seed, render_size)
            self.observation_space = gymnasium.spaces.Box(-np.inf, np.inf, (tiny.OBS_DIM + 1,), np.float32)

    monkeypatch.setattr(external, "make_env", lambda task, seed=None, render_size=None: WiderEnv(seed, render_size))
    assert fluxrl_main(["eval", "walker-stand", "--policy", str(policy)]) == 2
    one_error_line(capsys, f"acts on observations ({tiny.OBS_DIM},) with {tiny.ACT_DIM}-dimensional actions",
                   f"'walker-stand' has ({tiny.OBS_DIM + 1},) and {tiny.ACT_DIM}")


def test_restore_seed_states_gives_every_seeds_checkpointed_state(trained):
    agent, config, train, states, step = restore_seed_states(str(trained))
    assert agent.NAME == tiny.NAME and config.lr == 0.1 and train.seeds == 2 and step == 40
    arrays, meta = Checkpointer(str(trained / "checkpoints")).read_arrays()
    storage_key = {parse_signature(s)[0]: f"{i:06d}" for i, s in enumerate(meta["leaf_signature"])}
    for seed, state in enumerate(states):
        for name in ("w", "b"):
            np.testing.assert_array_equal(np.asarray(state.params[name]),
                                          np.asarray(arrays[storage_key[f".agent.params['{name}']"]])[seed])
    assert not np.array_equal(np.asarray(states[0].params["w"]), np.asarray(states[1].params["w"]))
    _, _, _, earlier, step = restore_seed_states(str(trained), step=20)
    assert step == 20 and not np.array_equal(np.asarray(earlier[0].params["w"]), np.asarray(states[0].params["w"]))


def test_summary_and_files(trained):
    summary = (trained / "summary.md").read_text()
    for fragment in ("# test_engine on cube-single-play-singletask-task2", "status: finished (step 40 of 40)",
                     "preset cpu", "seeds: 0, 1", "40 offline + 0 online", "sha256", "validation split:",
                     "Evaluation at step 40", "| mean ± std |", "jax:", "ogbench:", "fluxrl:", '"batch_size": 8'):
        assert fragment in summary, fragment
    # lr was given on the command line, so only noise runs at the agent's default
    assert ("- per-task values: tiny has no per-task value of noise for cube-single-play-singletask-task2, so it runs "
            "with the default noise=0.1; set --agent.noise to tune it for this task.") in summary
    for name in ("config.json", "train.csv", "eval.csv", "metrics.jsonl"):
        assert (trained / name).stat().st_size > 0


def test_rerun_same_config_resumes_without_rewriting(trained, dataset, capsys):
    before = (trained / "train.csv").read_bytes()
    assert main(train_argv(trained, dataset, "--agent.lr", "0.1")) == 0  # already finished: nothing to do
    assert (trained / "train.csv").read_bytes() == before
    out = capsys.readouterr().out
    assert "at step 40" in out and "evaluation/return" in out and "(mean over 2 seed(s))" in out, out
    assert main(["train", "--resume", str(trained), "--quiet"]) == 0
    assert (trained / "train.csv").read_bytes() == before


def test_a_new_run_names_the_per_task_fields_left_at_the_defaults_once(tmp_path, dataset, capsys):
    argv = [a for a in train_argv(tmp_path / "run", dataset) if a != "--quiet"]
    assert main(argv) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Note:")]
    assert notes == ["Note: tiny has no per-task value of lr, noise for cube-single-play-singletask-task2, so it runs "
                     "with the defaults lr=0.05, noise=0.1; set --agent.lr / --agent.noise to tune them for this task."]
    assert main(argv) == 0  # the finished run again: no second note
    assert "Note:" not in capsys.readouterr().out


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path, dataset, capsys):
    import fcntl

    run = tmp_path / "run"
    run.mkdir()
    with open(run / ".lock", "w") as held:  # what a training process holds (a second open file: flock conflicts)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("12345")
        held.flush()
        assert main(train_argv(run, dataset)) == 2
        one_error_line(capsys, f"{run} is being trained by another process (pid 12345)")
        assert sorted(os.listdir(run)) == [".lock"]
    assert main(train_argv(run, dataset)) == 0  # once released, the run proceeds in the same directory


def test_resuming_on_a_changed_dataset_is_refused(tmp_path, capsys):
    from fluxrl.data.dataset import save_npz

    data = tiny.write_dataset(str(tmp_path))
    run = tmp_path / "run"
    assert main(train_argv(run, data)) == 0
    save_npz(data, tiny.synthetic_data(20, seed=7), overwrite=True)  # same path and shapes, other transitions
    before = {p: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert main(train_argv(run, data)) == 2
    one_error_line(capsys, f"{data} changed since {run} started (sha256", "new --run_dir")
    assert {p: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_rerun_with_another_config_is_refused(trained, dataset, capsys):
    before = (trained / "train.csv").read_bytes()
    assert main(train_argv(trained, dataset, "--agent.lr", "0.2")) == 2
    one_error_line(capsys, "different configuration", "--agent.lr: saved 0.1, given 0.2", "--resume")
    assert (trained / "train.csv").read_bytes() == before


def test_plot_writes_png(trained, tmp_path, dataset, capsys):
    second = tmp_path / "second"
    assert main(train_argv(second, dataset, "--seed", "5", "--seeds", "1", "--agent.lr", "0.1",
                           "--video_episodes", "1")) == 0
    assert (second / "videos" / "seed_5_step_40.mp4").stat().st_size > 0
    out = tmp_path / "curves.png"
    assert main(["plot", str(trained), str(second), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["plot", str(trained), "--out", str(out)]) == 2
    one_error_line(capsys, "already exists")
    assert main(["plot", str(trained), "--out", str(out), "--overwrite", "--metric", "training/actor_loss"]) == 0
    assert main(["plot", str(trained), "--out", str(tmp_path / "x.png"), "--metric", "nope"]) == 2
    one_error_line(capsys, "No run logged metric 'nope'")


def test_table_gives_each_runs_results_from_its_eval_csv(trained, tmp_path, dataset, capsys):
    second = tmp_path / "second"
    assert main(train_argv(second, dataset, "--seed", "5", "--seeds", "1", "--agent.lr", "0.2")) == 0
    capsys.readouterr()
    expected = {}
    for run in (trained, second):
        rows = tiny._csv(run / "eval.csv")
        expected[str(run)] = {(int(r["step"]), int(r["seed"])): float(r["evaluation/return"]) for r in rows}
    assert sorted({step for step, _ in expected[str(trained)]}) == [0, 20, 40]
    assert len(set(expected[str(trained)].values())) == 6  # distinct values: a mix-up of seeds or steps shows

    assert main(["table", str(trained)]) == 0
    assert capsys.readouterr().out.startswith("evaluation/success at steps 0, 20, 40\n")  # the default metric
    assert main(["table", str(trained), str(second), "--metric", "evaluation/return"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "evaluation/return at steps 0, 20, 40"
    first_final = [expected[str(trained)][(40, seed)] for seed in (0, 1)]
    means = " → ".join(f"{np.mean([expected[str(trained)][(t, s)] for s in (0, 1)]):.2f}" for t in (0, 20, 40))
    assert lines[4] == (f"| test_engine [lr=0.1] | cpu | {tiny.TASK} | data.npz | 2 | {means} | "
                        f"{np.mean(first_final):.2f} ± {np.std(first_final):.2f} "
                        f"({first_final[0]:.2f}, {first_final[1]:.2f}) |")
    assert lines[5].startswith("| test_engine [lr=0.2] | cpu |") and "| 1 |" in lines[5]

    out = tmp_path / "results.csv"
    assert main(["table", str(trained), str(second), "--metric", "evaluation/return", "--out", str(out)]) == 0
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 + 3  # a row per run and evaluation step
    seeds = {str(trained): (0, 1), str(second): (5,)}
    for row in rows:
        values = [expected[row["run_dir"]][(int(row["step"]), seed)] for seed in seeds[row["run_dir"]]]
        assert [float(v) for v in row["per_seed"].split(";")] == values
        assert float(row["mean"]) == pytest.approx(np.mean(values))
        assert float(row["std"]) == pytest.approx(np.std(values))
        assert row["metric"] == "evaluation/return" and int(row["seeds"]) == len(values)
    assert main(["table", str(trained), "--metric", "training/actor_loss", "--out", str(tmp_path / "loss.md")]) == 0
    assert (tmp_path / "loss.md").read_text().startswith("training/actor_loss at steps 10, 20, 30, 40\n")

    before = out.read_bytes()
    capsys.readouterr()
    assert main(["table", str(trained), "--out", str(out)]) == 2
    one_error_line(capsys, "already exists")
    assert out.read_bytes() == before
    assert main(["table", str(trained), "--out", str(tmp_path / "t.txt")]) == 2
    one_error_line(capsys, "must end with .md or .csv")
    assert main(["table", str(trained), "--metric", "nope"]) == 2
    one_error_line(capsys, "No run logged metric 'nope'")
    assert main(["table", str(tmp_path / "nothing")]) == 2
    one_error_line(capsys, "not a fluxrl run directory")


def test_plot_labels_split_runs_only_where_their_agent_configs_differ(tmp_path):
    from fluxrl.train.plotting import run_labels

    def fake_run(name, agent, lr, noise=0.1):
        run = tmp_path / name
        run.mkdir()
        record = {"agent": agent, "train": {"task": "t", "preset": "cpu"},
                  "agent_config": {"lr": lr, "noise": noise, "hidden": [8, 8]}}
        (run / "config.json").write_text(json.dumps(record))
        return str(run)

    a, b, c, d = fake_run("a", "fql", 0.1), fake_run("b", "fql", 0.1), fake_run("c", "fql", 0.3), fake_run("d", "bc", 1.0)
    labels = run_labels([a, b, c, d])
    assert labels[a] == labels[b] == "fql / t (cpu) [lr=0.1]"  # same configuration: one curve
    assert labels[c] == "fql / t (cpu) [lr=0.3]"
    assert labels[d] == "bc / t (cpu)"  # the only bc run: nothing to tell apart
    assert run_labels([a, b]) == {a: "fql / t (cpu)", b: "fql / t (cpu)"}


def test_default_metric_is_the_return_where_the_task_has_no_success_signal(tmp_path):
    """DMC and Gymnasium tasks log evaluation/success = 0 they do not measure: plot and table show their return."""
    from fluxrl.train.plotting import default_metric
    from fluxrl.train.tables import table_rows

    def fake_run(name, task):
        run = tmp_path / name
        run.mkdir()
        record = {"agent": "fpmd", "train": {"task": task, "preset": "cpu", "steps": 0}, "agent_config": {}}
        (run / "config.json").write_text(json.dumps(record))
        (run / "eval.csv").write_text("step,seed,evaluation/return,evaluation/success\n0,0,4.0,0.0\n10,0,80.0,0.0\n")
        return str(run)

    gym, dmc = fake_run("gym", "InvertedPendulum-v4"), fake_run("dmc", "walker-stand")
    cube = fake_run("cube", "cube-single-play-singletask-task2")
    assert default_metric([gym]) == default_metric([gym, dmc]) == "evaluation/return"
    assert default_metric([gym, cube]) == "evaluation/success"
    metric, rows = table_rows([gym])
    assert metric == "evaluation/return" and rows[0]["values"] == {0: [4.0], 10: [80.0]}
    assert rows[0]["dataset"] == "none (online)"  # no --dataset and no offline steps: online from scratch


def test_plot_band_is_a_bootstrap_interval_of_the_mean():
    from fluxrl.train.plotting import aggregate

    values = np.arange(10.0)
    curves = [(np.array([0, 5]), np.array([v, 2 * v])) for v in values]
    steps, mean, low, high = aggregate(curves)
    np.testing.assert_array_equal(steps, [0, 5])
    np.testing.assert_allclose(mean, [4.5, 9.0])
    sem = values.std() / np.sqrt(len(values))
    assert low[0] < 4.5 < high[0] and abs((high[0] - low[0]) - 2 * 1.96 * sem) < 0.5 * sem
    _, _, low1, _ = aggregate([(np.array([0]), np.array([1.0]))])
    assert np.isnan(low1[0])  # no band from a single curve


def test_tensorboard_and_missing_wandb(tmp_path, dataset, capsys, monkeypatch):
    run = tmp_path / "tb"
    assert main(train_argv(run, dataset, "--steps", "10", "--eval_episodes", "0", "--tensorboard")) == 0
    assert sorted(os.listdir(run / "tb")) == ["seed_0", "seed_1"]
    assert any(f.startswith("events.out") for f in os.listdir(run / "tb" / "seed_0"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if it were not installed
    assert main(train_argv(tmp_path / "wb", dataset, "--wandb")) == 2
    one_error_line(capsys, "--wandb needs the wandb package")
    assert not (tmp_path / "wb").exists()  # refused before anything was written


def test_wandb_offline_run_with_the_real_package(tmp_path, dataset, monkeypatch):
    """W&B in offline mode writes its run under the run directory: each seed's metrics and their mean."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "wb"
    assert main(train_argv(run, dataset, "--steps", "20", "--eval_episodes", "0", "--wandb")) == 0
    offline_runs = [d for d in os.listdir(run / "wandb") if d.startswith("offline-run-")]
    assert len(offline_runs) == 1 and offline_runs[0].endswith("-wb")  # the run directory's name is the W&B id
    records = (run / "wandb" / offline_runs[0] / "run-wb.wandb").read_bytes()
    metric = next(k for k in (run / "train.csv").read_text().splitlines()[0].split(",") if k.startswith("training/"))
    for key in (f"seed_0/{metric}", f"seed_1/{metric}", metric):
        assert key.encode() in records, key


def test_divergence_exits_non_zero_with_one_message(tmp_path, dataset, capsys):
    run = tmp_path / "nan"
    assert main(train_argv(run, dataset, "--steps", "60", "--eval_episodes", "0", "--agent.nan_at_step", "25")) == 3
    one_error_line(capsys, "Training diverged", "step 20) is kept")
    assert Checkpointer(str(run / "checkpoints")).all_steps() == [20]


@pytest.mark.parametrize("argv,fragments", [
    (["train", "nosuchagent", "--task", "x"], ["Unknown agent 'nosuchagent'", "fql"]),
    (["train", "test_engine"], ["--task is required"]),
    (["train", "test_engine", "--task", tiny.TASK, "--steps", "abc"], ["--steps", "abc"]),
    (["train", "test_engine", "--task", tiny.TASK, "--agent.nosuch", "1"], ["--agent.nosuch"]),
    (["train", "test_engine", "--task", tiny.TASK, "--preset", "huge"], ["Unknown --preset 'huge'"]),
    (["train", "test_engine", "--task", tiny.TASK, "--seeds", "0"], ["--seeds must be at least 1"]),
    (["train", "test_engine", "--task", tiny.TASK, "--dataset", "/nonexistent.npz", "--eval_episodes", "0"],
     ["/nonexistent.npz"]),
    (["train", "--resume", "/nonexistent_run"], ["not a fluxrl run directory"]),
    (["export", "/nonexistent_run"], ["not a fluxrl run directory"]),
    (["export"], ["run_dir"]),
    (["plot", "/nonexistent_run", "--out", "x.png"], ["not a fluxrl run directory"]),
    (["nosuchcommand"], ["expected one of train, pretrain, finetune, export, plot, table"]),
])
def test_bad_input_is_one_sentence(argv, fragments, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    one_error_line(capsys, *fragments)
    assert not (tmp_path / "runs").exists()  # nothing was written


def test_run_dir_holding_something_else_is_refused(tmp_path, dataset, capsys):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(train_argv(tmp_path / "other", dataset)) == 2
    one_error_line(capsys, "is not a fluxrl run directory")
    assert os.listdir(tmp_path / "other") == ["notes.txt"]


def test_help_lists_agent_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "test_engine", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--agent.lr" in out and "--balanced_sampling" in out and "--run_dir" in out


# --- the dataset is optional: the task's default dataset is generated once into the cache -------------------


def fake_generate(calls):
    def generate(name, out, episodes=None, seed=0, workers=1, **_):
        calls.append(name)
        save_npz(out, regular_to_raw(tiny.synthetic_data(20, seed=0)))
        save_npz(generate_module.val_path(out), regular_to_raw(tiny.synthetic_data(5, seed=1)))
        return [out, generate_module.val_path(out)]
    return generate


def test_default_dataset_is_generated_once(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setenv("FLUXRL_DATA_DIR", str(tmp_path / "cache"))
    slow = fake_generate(calls)

    def generate(*args, **kw):
        threading.Event().wait(0.3)  # both callers arrive while the first generates
        return slow(*args, **kw)

    monkeypatch.setattr(generate_module, "generate", generate)
    stale = tmp_path / "cache" / ".tmp-cube-single-play-killed"  # left by a generation that was killed
    stale.mkdir(parents=True)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(cache.default_dataset_path(tiny.TASK))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = str(tmp_path / "cache" / "cube-single-play.npz")
    assert paths == [expected, expected] and calls == ["cube-single-play"]
    assert sorted(os.listdir(tmp_path / "cache")) == [".cube-single-play.lock", "cube-single-play-val.npz",
                                                      "cube-single-play.npz"]
    assert cache.default_dataset_path(tiny.TASK) == expected and calls == ["cube-single-play"]


def test_train_without_dataset_uses_the_cache(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setenv("FLUXRL_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(generate_module, "generate", fake_generate(calls))
    # The raw layout has no rewards: the task's relabelling runs (faked here: reward = -|a|).
    monkeypatch.setattr(external, "relabel", lambda data, task: {
        **data, "rewards": -np.abs(data["actions"]).sum(-1), "masks": np.ones(len(data["actions"]), np.float32)})
    argv = [a for a in train_argv(tmp_path / "run", "-") if a not in ("--dataset", "-")]
    assert main(argv + ["--steps", "10", "--eval_episodes", "0"]) == 0
    assert calls == ["cube-single-play"]
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert str(tmp_path / "cache" / "cube-single-play.npz") in summary and "cube-single-play-val.npz" in summary


def test_an_offline_run_can_be_made_longer_and_ends_as_if_trained_that_long(tmp_path, dataset, capsys):
    def argv(run, steps):
        args = train_argv(run, dataset, "--seeds", "1")
        args[args.index("--steps") + 1] = str(steps)
        return args

    assert main(argv(tmp_path / "b", 45)) == 0  # ends between two chunks of 10: the longer run splits them there
    assert main(["train", "--resume", str(tmp_path / "b"), "--steps", "90"]) == 0
    assert "at step 45 (length 45 -> 90 steps)." in capsys.readouterr().out  # not quiet: --quiet is per invocation
    assert json.loads((tmp_path / "b" / "config.json").read_text())["train"]["steps"] == 90
    assert main(argv(tmp_path / "a", 90)) == 0
    tiny.assert_same_latest_checkpoint(tmp_path / "a", tmp_path / "b", 90)

    before = (tmp_path / "b" / "config.json").read_bytes()
    assert main(argv(tmp_path / "b", 60)) == 2
    one_error_line(capsys, "is at step 90; --steps 60 would end before it (give at least 90)")
    assert (tmp_path / "b" / "config.json").read_bytes() == before
