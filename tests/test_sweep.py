"""`fluxrl sweep`: grids, validation before anything is written, local workers, Ray (a local instance and a two-node
cluster), failures, re-runs and interruption. Points are real `fluxrl train` processes (BC, cpu preset) on a tiny
generated point-maze dataset, so what is tested is what a user runs."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fluxrl.cli import main as fluxrl_main
from fluxrl.train.sweep import parse_grid, point_argv, point_name, run_status

TASK = "pointmaze-medium-navigate-singletask-task1"
LRS = ("0.001", "0.0003")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from fluxrl.data.generate import generate

    path = str(tmp_path_factory.mktemp("data") / "pm.npz")
    generate("pointmaze-medium-navigate", path, episodes=2, val_episodes=1)
    return path


def shared_flags(dataset, steps=20):
    return ["--task", TASK, *(["--dataset", dataset] if dataset else []), "--preset", "cpu", "--steps", str(steps),
            "--eval_interval", "20", "--eval_episodes", "1", "--log_interval", "10"]


def sweep(root, dataset, *extra, steps=20):
    return fluxrl_main(["sweep", "bc", "--root", str(root), *shared_flags(dataset, steps),
                        "--grid", "agent.lr=" + ",".join(LRS), *extra])


def one_error_line(capsys, *fragments):
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def test_grid_values_names_and_arguments():
    axes = parse_grid(["agent.alpha=3,10", "--agent.hidden=256 256,512 512 512", "seed=0"])
    assert axes == [("agent.alpha", [("3",), ("10",)]), ("agent.hidden", [("256", "256"), ("512", "512", "512")]),
                    ("seed", [("0",)])]
    assignments = (("agent.alpha", ("10",)), ("agent.hidden", ("256", "256")), ("dataset", ("/d/x y.npz",)))
    assert point_name(assignments) == "alpha=10__hidden=256-256__dataset=_d_x_y.npz"
    # The point's flags come after the shared ones: tyro keeps the last occurrence.
    assert point_argv("fql", ["--task", "t"], assignments) == [
        "fql", "--task", "t", "--agent.alpha", "10", "--agent.hidden", "256", "256", "--dataset", "/d/x y.npz"]


@pytest.mark.parametrize("specs, fragment", [
    ([], "at least one --grid"),
    (["agent.alpha"], "must read FLAG=V1,V2"),
    (["agent.alpha="], "must read FLAG=V1,V2"),
    (["agent.alpha=1,,2"], "empty value"),
    (["agent.alpha=1,1"], "repeats a value"),
    (["agent.alpha=1", "agent.alpha=2"], "given twice"),
    (["run_dir=a,b"], "set by the sweep itself"),
])
def test_bad_grids_are_refused(specs, fragment):
    from fluxrl.errors import FluxrlError

    with pytest.raises(FluxrlError, match=fragment):
        parse_grid(specs)


@pytest.mark.parametrize("extra, fragments", [
    (["--grid", "agent.lr=0.1,abc"], ["grid point lr=abc", "--agent.lr"]),
    (["--grid", "agent.no_such_field=1,2"], ["grid point no_such_field=1", "--agent.no_such_field"]),
    (["--grid", "dataset=missing.npz"], ["grid point dataset=missing.npz", "missing.npz does not exist"]),
    (["--grid", "task=" + TASK], ["--task is both a shared flag and a --grid axis"]),
    (["--run_dir", "x", "--grid", "seed=0,1"], ["--run_dir is set by the sweep itself"]),
    (["--grid", "seed=0,1", "--workers", "0"], ["--workers must be at least 1"]),
])
def test_invalid_points_are_refused_before_anything_is_written(tmp_path, dataset, capsys, extra, fragments):
    root = tmp_path / "sweep"
    gridded_dataset = any(e.startswith("dataset=") for e in extra)
    argv = ["sweep", "bc", "--root", str(root), *shared_flags(None if gridded_dataset else dataset), *extra]
    assert fluxrl_main(argv) == 2
    one_error_line(capsys, *fragments)
    assert not root.exists()


def test_a_root_holding_someone_elses_report_is_refused(tmp_path, dataset, capsys):
    (tmp_path / "sweep.md").write_text("mine")
    assert sweep(tmp_path, dataset) == 2
    one_error_line(capsys, "sweep.md that no fluxrl sweep wrote")
    assert (tmp_path / "sweep.md").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["sweep.md"]


def test_dry_run_lists_the_points_and_writes_nothing(tmp_path, dataset, capsys):
    assert sweep(tmp_path / "s", dataset, "--dry_run") == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [str(tmp_path / "s" / f"lr={lr}") for lr in LRS]
    assert lines[0].endswith("--log_interval 10 --agent.lr 0.001") and not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def local_sweep(tmp_path_factory, dataset):
    root = tmp_path_factory.mktemp("local")
    assert sweep(root, dataset, "--workers", "2") == 0
    return root


def _csv_rows(path):
    import csv

    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_local_sweep_trains_each_point_and_tabulates_them(local_sweep, dataset):
    from fluxrl.train.tables import csv_table

    runs = [str(local_sweep / f"lr={lr}") for lr in LRS]
    for run, lr in zip(runs, LRS):
        record = json.loads(open(os.path.join(run, "config.json")).read())
        assert record["agent"] == "bc" and record["agent_config"]["lr"] == float(lr)
        assert record["train"]["dataset"] == dataset and record["train"]["steps"] == 20
        assert run_status(run) == ("finished", 20, 20)
        assert [r["step"] for r in _csv_rows(os.path.join(run, "eval.csv"))] == ["0", "20"]
    report = (local_sweep / "sweep.md").read_text()
    assert "- grid (2 points): agent.lr ∈ {0.001, 0.0003}" in report
    for lr in LRS:
        assert f"| lr={lr} | finished | 20 of 20 |" in report and f"| bc [lr={lr}] | cpu | {TASK} | pm.npz | 1 |" in report
    # sweep.csv is `fluxrl table --out FILE.csv` of the points.
    assert (local_sweep / "sweep.csv").read_text() == csv_table(runs)
    manifest = json.loads((local_sweep / "sweep.json").read_text())
    assert manifest["points"] == {f"lr={lr}": run for lr, run in zip(LRS, runs)}


@pytest.mark.slow
def test_rerunning_a_finished_sweep_runs_nothing(local_sweep, dataset, capsys):
    logs = {p: (local_sweep / "logs" / p).read_text() for p in os.listdir(local_sweep / "logs")}
    capsys.readouterr()
    assert sweep(local_sweep, dataset) == 0
    assert "Sweep of 2 points under" in capsys.readouterr().out.splitlines()[0]
    assert {p: (local_sweep / "logs" / p).read_text() for p in logs} == logs  # no run started
    assert "| lr=0.001 | skipped | 20 of 20 |" in (local_sweep / "sweep.md").read_text()


@pytest.mark.slow
def test_a_point_that_fails_is_reported_and_the_others_finish(tmp_path, dataset, capsys):
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not an npz file")
    argv = ["sweep", "bc", "--root", str(tmp_path / "s"), *shared_flags(None), "--grid", f"dataset={dataset},{broken}"]
    assert fluxrl_main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: dataset=_") and "broken.npz failed" in err[0], err
    assert "broken.npz.log" in err[0]
    runs = sorted(os.listdir(tmp_path / "s"))
    good = [r for r in runs if r.endswith("pm.npz")][0]
    assert run_status(str(tmp_path / "s" / good)) == ("finished", 20, 20)
    report = (tmp_path / "s" / "sweep.md").read_text()
    assert "| failed (" in report and f"| {good} | finished | 20 of 20 |" in report


def _wait_for(condition, timeout):
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout, "timed out"
        time.sleep(0.2)


@pytest.mark.slow
def test_a_stopped_sweep_checkpoints_its_runs_and_continues(tmp_path, dataset):
    """SIGTERM (a pre-empted job; Ctrl-C does the same) reaches the sweep, which forwards one SIGINT to each run:
    the runs checkpoint and stop, and the same sweep with a new length continues them from those checkpoints."""
    root = tmp_path / "s"
    argv = [sys.executable, "-m", "fluxrl", "sweep", "bc", "--root", str(root), *shared_flags(dataset, 10**6),
            "--eval_interval", str(10**6), "--updates_per_call", "50", "--grid", "agent.lr=0.001"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = str(root / "lr=0.001")
    try:
        _wait_for(lambda: (run_status(run) or ("",))[0] == "running" and os.path.exists(os.path.join(run, "train.csv")),
                  120)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:  # the run has its own session: on a failure here, stop it by the pid in its run directory's lock file
        proc.kill()
        with open(os.path.join(run, ".lock")) as f:
            pid = f.read().strip()
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if run.encode() in f.read():
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass  # ended
    assert proc.returncode == 130, (out, err)
    assert "re-run the same command to continue" in err
    status, step, _ = run_status(run)
    assert status == "interrupted" and step > 0
    assert "| lr=0.001 | interrupted" in (root / "sweep.md").read_text()
    checkpoints = sorted(int(c) for c in os.listdir(os.path.join(run, "checkpoints")) if c.isdigit())
    assert checkpoints[-1] == step
    longer = step + 30
    assert fluxrl_main(["sweep", "bc", "--root", str(root), *shared_flags(dataset, longer), "--eval_interval",
                        str(10**6), "--updates_per_call", "50", "--grid", "agent.lr=0.001"]) == 0
    assert run_status(run) == ("finished", longer, longer)
    # One log, two invocations; the metrics continue where the checkpoint left them.
    assert (root / "logs" / "lr=0.001.log").read_text().count(" -m fluxrl train --resume ") == 2
    steps = [int(r["step"]) for r in _csv_rows(os.path.join(run, "train.csv"))]
    assert steps == sorted(set(steps)) and steps[0] <= step and steps[-1] == longer


@pytest.mark.slow
def test_ray_sweeps_match_the_local_ones(local_sweep, dataset, tmp_path):
    """On a Ray instance started for the sweep, and on a two-node Ray cluster joined with --address (the multi-machine
    case, both nodes on this machine), every point trains exactly as in the local sweep (CPU runs are
    deterministic)."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    assert sweep(tmp_path / "instance", dataset, "--backend", "ray") == 0
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        nodes = {node.node_id for node in cluster.list_all_nodes()}
        assert sweep(tmp_path / "cluster", dataset, "--backend", "ray", "--address", cluster.address) == 0
    finally:
        cluster.shutdown()
    # One CPU per node and one per run: the two points ran one on each of the cluster's nodes.
    ran_on = json.loads((tmp_path / "cluster" / "sweep.json").read_text())["last_invocation"]
    assert {o["ray_node"] for o in ran_on.values()} == nodes and len(nodes) == 2
    for root in ("instance", "cluster"):
        for lr in LRS:
            for name in ("eval.csv", "train.csv"):
                ours = _csv_rows(tmp_path / root / f"lr={lr}" / name)
                local = _csv_rows(local_sweep / f"lr={lr}" / name)
                drop = ("time/",)  # timings differ
                strip = [{k: v for k, v in r.items() if not k.startswith(drop)} for r in (ours + local)]
                assert strip[:len(ours)] == strip[len(ours):], (root, lr, name)
        assert "| lr=0.001 | finished | 20 of 20 |" in (tmp_path / root / "sweep.md").read_text()


def test_ray_runs_get_an_environment_that_fits_their_share():
    from fluxrl.train.sweep import ray_environment

    assert ray_environment(0) == {"JAX_PLATFORMS": "cpu"}
    assert ray_environment(0.25) == {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.225"}
    assert ray_environment(1) == {}
    assert np.isclose(float(ray_environment(0.5)["XLA_PYTHON_CLIENT_MEM_FRACTION"]), 0.45)
