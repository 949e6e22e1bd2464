"""The `fluxrl` command: data commands end to end, and bad input answered with one sentence and status 2."""

import os
import subprocess
import sys

import numpy as np
import pytest

from fluxrl.cli import main
from fluxrl.data import dataset as D

FLUXRL = [sys.executable, "-m", "fluxrl.cli"]


def run(*args, cwd=None):
    return subprocess.run(FLUXRL + list(args), capture_output=True, text=True, cwd=cwd, timeout=300)


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def tiny_raw(n_episodes=2, length=4, obs_dim=3):
    rows = n_episodes * (length + 1)
    terminals = np.zeros(rows, np.float32)
    terminals[length :: length + 1] = 1.0
    rng = np.random.default_rng(0)
    return {
        "observations": rng.standard_normal((rows, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (rows, 2)).astype(np.float32),
        "terminals": terminals,
    }


def test_generate_info_and_refuse_overwrite(tmp_path):
    out = str(tmp_path / "pm.npz")
    proc = run("data", "generate", "pointmaze-medium-navigate", "--out", out, "--episodes", "2",
               "--val-episodes", "1", "--workers", "1", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert os.path.exists(out) and os.path.exists(str(tmp_path / "pm-val.npz"))
    info = run("data", "info", out)
    assert info.returncode == 0, info.stderr
    assert "observations" in info.stdout and "2000" in info.stdout  # 2 episodes x 1000 transitions
    before = os.path.getmtime(out), open(out, "rb").read()
    again = run("data", "generate", "pointmaze-medium-navigate", "--out", out, "--episodes", "1", "--quiet")
    assert_user_error(again, out, "already exists")
    assert (os.path.getmtime(out), open(out, "rb").read()) == before


@pytest.mark.parametrize(
    "args, fragments",
    [
        (("data", "generate", "cube-sextuple-play", "--out", "x.npz"), ("cube-sextuple-play",)),
        (("eval", "cube-single-play-singletask-task9"), ("cube-single-play-singletask-task9",)),
        (("eval", "walker-moonwalk", "--policy", "random"), ("walker-moonwalk",)),
        (("data", "info", "does-not-exist.npz"), ("does-not-exist.npz",)),
        (("data", "generate", "cube-single-play", "--out", "x.npz", "--episodes", "0"), ("--episodes",)),
        (("data", "frobnicate"), ("frobnicate",)),
    ],
)
def test_bad_input_one_sentence(tmp_path, args, fragments):
    assert_user_error(run(*args, cwd=tmp_path), *fragments)
    assert not os.path.exists(tmp_path / "x.npz")


def test_bad_files_named_in_error(tmp_path):
    truncated = tmp_path / "truncated.npz"
    D.save_npz(truncated, tiny_raw())
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert_user_error(run("data", "info", str(truncated)), "truncated.npz")

    text = tmp_path / "notes.npz"
    text.write_text("not a dataset")
    assert_user_error(run("data", "info", str(text)), "notes.npz")

    for field, value in (("observations", np.nan), ("actions", np.inf)):
        raw = tiny_raw()
        raw[field][1, 0] = value
        path = tmp_path / f"bad_{field}.npz"
        D.save_npz(path, raw)
        assert_user_error(run("data", "info", str(path)), f"bad_{field}.npz", field)

    raw = tiny_raw()
    del raw["actions"]
    D.save_npz(tmp_path / "noact.npz", raw)
    assert_user_error(run("data", "info", str(tmp_path / "noact.npz")), "noact.npz", "actions")

    raw = tiny_raw()
    raw["actions"] = raw["actions"][:-1]
    D.save_npz(tmp_path / "short.npz", raw)
    assert_user_error(run("data", "info", str(tmp_path / "short.npz")), "short.npz", "actions")

    raw = tiny_raw()
    raw["observations"] = np.array(["a"] * len(raw["terminals"]))
    D.save_npz(tmp_path / "strings.npz", raw)
    assert_user_error(run("data", "info", str(tmp_path / "strings.npz")), "strings.npz", "observations")


def test_relabel_rejects_mismatched_dataset(tmp_path):
    path = tmp_path / "tiny.npz"
    D.save_npz(path, tiny_raw())
    out = tmp_path / "out.npz"
    proc = run("data", "relabel", str(path), "--task", "cube-single-play-singletask-task2", "--out", str(out))
    assert_user_error(proc, "tiny.npz")
    assert not out.exists()


def test_tasks_lists_names(capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    for name in ("cube-single-play", "pointmaze-large-navigate-singletask-task5", "jaco-reach_top_left"):
        assert name in out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    listed = capsys.readouterr().out
    for command in ("train", "pretrain", "finetune", "export", "plot", "table", "data", "tasks", "eval", "demo"):
        assert f"    {command} " in listed, command
