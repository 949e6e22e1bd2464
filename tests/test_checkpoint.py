"""Checkpoints: round trip of the full training carry, and a run killed with SIGKILL that resumes bit-identically."""

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fluxrl.cli_train import main
from fluxrl.errors import FluxrlError
from fluxrl.train import external
from fluxrl.train.checkpoint import Checkpointer
from fluxrl.train.engine import Carry, empty_accumulator, seed_keys
from fluxrl.train.replay import ReplayBuffer

TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TESTS)
import test_engine as tiny  # noqa: E402  (the tiny agent, env and data)


def carry_of(seeds=(0, 1)):
    example = {k: jnp.ones((4,) + v.shape[1:]) for k, v in tiny.synthetic_data(2).items()}
    state = jax.vmap(lambda k: tiny.init(k, example, tiny.Config()))(seed_keys(seeds, 0))
    buffer = ReplayBuffer.create(len(seeds), 5, (tiny.OBS_DIM,), jnp.float32, tiny.ACT_DIM)
    return Carry(agent=state, key=seed_keys(seeds, 1), acc=empty_accumulator(["a"], len(seeds)), buffer=buffer,
                 pending_action=jnp.zeros((len(seeds), tiny.ACT_DIM)))


def test_round_trip_keeps_every_array_and_key_type(tmp_path):
    carry = carry_of()
    carry = carry.replace(agent=carry.agent.replace(step=carry.agent.step + 7),
                          key=jax.vmap(lambda k: jax.random.split(k)[0])(carry.key))
    checkpointer = Checkpointer(str(tmp_path / "ck"), keep=2)
    for step in (1, 2, 3):
        checkpointer.save(step, carry, {"step": step, "host": {"episode": [4, 5]}})
    assert checkpointer.all_steps() == [2, 3]  # keep=2
    restored, meta = Checkpointer(str(tmp_path / "ck")).restore(carry_of())
    assert meta["step"] == 3 and meta["host"] == {"episode": [4, 5]}
    assert jnp.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    assert jax.random.key_impl(restored.key) == jax.random.key_impl(carry.key)
    tiny.assert_trees_equal(restored, carry)
    # The restored keys continue the same random stream.
    np.testing.assert_array_equal(jax.random.normal(restored.key[1], (3,)), jax.random.normal(carry.key[1], (3,)))
    # A template of another shape (3 seeds) is refused with one sentence.
    with pytest.raises(FluxrlError, match="does not match this agent and configuration"):
        checkpointer.restore(carry_of((0, 1, 2)))


def test_unfinished_save_is_ignored_and_cleaned(tmp_path):
    checkpointer = Checkpointer(str(tmp_path / "ck"))
    checkpointer.save(10, carry_of(), {"step": 10})
    checkpointer.close()
    # What a process killed in the middle of orbax's save leaves: a temporary directory, never a final one.
    leftover = tmp_path / "ck" / "20.orbax-checkpoint-tmp-1234567"
    leftover.mkdir()
    (leftover / "partial").write_text("x")
    reopened = Checkpointer(str(tmp_path / "ck"))
    assert reopened.latest_step() == 10
    assert not leftover.exists()


SCRIPT = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import test_engine
    test_engine.install_fakes()
    from fluxrl.train import loggers
    kill_at = int(os.environ.get("KILL_AT_LOG", "-1"))
    real_write = loggers.FileSink.write

    def write(self, kind, step, rows):  # SIGKILL right after the train rows of step `kill_at` hit the disk
        real_write(self, kind, step, rows)
        if kind == "train" and step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    loggers.FileSink.write = write
    from fluxrl.cli_train import main
    sys.exit(main(sys.argv[1:]))
""")


def _rows(path):
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in csv.DictReader(f)]


def _jsonl(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in f]


def test_sigkill_then_resume_is_bit_identical(tmp_path, monkeypatch):
    dataset = tiny.write_dataset(str(tmp_path))
    script = tmp_path / "run_train.py"
    script.write_text(SCRIPT.format(tests=TESTS))

    def argv(run_dir):
        return ["train", "test_engine", "--task", tiny.TASK, "--dataset", dataset, "--steps", "300", "--seeds", "2",
                "--run_dir", str(run_dir), "--updates_per_call", "20", "--log_interval", "20", "--save_interval",
                "100", "--eval_interval", "100", "--eval_episodes", "1", "--quiet"]

    env = dict(os.environ, KILL_AT_LOG="160", JAX_PLATFORMS="cpu")
    killed = subprocess.run([sys.executable, str(script)] + argv(tmp_path / "b"), env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert Checkpointer(str(tmp_path / "b" / "checkpoints")).latest_step() == 100
    assert _rows(tmp_path / "b" / "train.csv")[-1]["step"] == "160"  # rows written after the checkpoint
    summary = (tmp_path / "b" / "summary.md").read_text()  # as of the last checkpoint
    assert "status: running (step 100 of 300)" in summary and "Evaluation at step 100" in summary

    env.pop("KILL_AT_LOG")
    resumed = subprocess.run([sys.executable, str(script)] + argv(tmp_path / "b"), env=env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    monkeypatch.setattr(external, "make_env", tiny.fake_make_env)
    assert main(argv(tmp_path / "a")) == 0  # the uninterrupted run, in this process

    tiny.assert_same_latest_checkpoint(tmp_path / "a", tmp_path / "b", 300)
    for name in ("train.csv", "eval.csv"):
        assert _rows(tmp_path / "a" / name) == _rows(tmp_path / "b" / name), name
    assert _jsonl(tmp_path / "a" / "metrics.jsonl") == _jsonl(tmp_path / "b" / "metrics.jsonl")


@pytest.mark.parametrize("signum, online_steps, stop_after", [(signal.SIGINT, 0, 140), (signal.SIGTERM, 100, 250)])
def test_signal_stops_with_a_checkpoint_and_resume_is_bit_identical(tmp_path, monkeypatch, signum, online_steps,
                                                                    stop_after):
    """Ctrl-C or SIGTERM between save points: the run saves that step, exits 128 + signal, and resumes exactly."""
    from fluxrl.train.loggers import Progress

    monkeypatch.setattr(external, "make_env", tiny.fake_make_env)
    dataset = tiny.write_dataset(str(tmp_path))
    steps = 300 - online_steps

    def argv(run_dir):
        return ["train", "test_engine", "--task", tiny.TASK, "--dataset", dataset, "--steps", str(steps),
                "--online_steps", str(online_steps), "--seeds", "2", "--run_dir", str(run_dir), "--updates_per_call",
                "20", "--log_interval", "20", "--save_interval", "100", "--eval_interval", "100", "--eval_episodes",
                "1", "--quiet"]

    advance = Progress.advance

    def advance_then_signal(self, n):
        advance(self, n)
        self.seen = getattr(self, "seen", 0) + n
        if self.seen == stop_after:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Progress, "advance", advance_then_signal)
    assert main(argv(tmp_path / "b")) == 128 + signum
    assert Checkpointer(str(tmp_path / "b" / "checkpoints")).latest_step() == stop_after
    assert f"status: interrupted (step {stop_after} of 300)" in (tmp_path / "b" / "summary.md").read_text()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    monkeypatch.setattr(Progress, "advance", advance)
    assert main(argv(tmp_path / "b")) == 0
    assert main(argv(tmp_path / "a")) == 0  # uninterrupted

    tiny.assert_same_latest_checkpoint(tmp_path / "a", tmp_path / "b", 300)
    for name in ("train.csv", "eval.csv"):
        assert _rows(tmp_path / "a" / name) == _rows(tmp_path / "b" / name), name
