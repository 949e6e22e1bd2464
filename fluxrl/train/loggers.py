"""Metric sinks behind one interface, and the progress display.

Every sink receives `write(kind, step, rows)`: `kind` is train | eval | exploration, `rows` holds one dict per
seed with a `seed` entry and namespaced metric names (training/..., validation/..., evaluation/..., time/...).

- FileSink (always): RUN_DIR/{train,eval,exploration}.csv (one row per step and seed) and RUN_DIR/metrics.jsonl
  (every record, every key). Its byte offsets are stored in each checkpoint; on resume the files are cut back to
  them, so rows written after the checkpoint (by a killed run) are not duplicated.
- TensorBoardSink (--tensorboard): RUN_DIR/tb/seed_<s>/ event files, so TensorBoard overlays seeds as runs.
- WandbSink (--wandb): one W&B run per process, offline unless WANDB_MODE says otherwise; keys seed_<s>/<metric>
  plus the mean over seeds under <metric>. Resumed runs re-log steps after the last checkpoint (W&B and
  TensorBoard keep both copies; the CSV/JSONL files do not).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from typing import Protocol

from fluxrl.errors import FluxrlError

KINDS = ("train", "eval", "exploration")
JSONL = "metrics.jsonl"


class MetricSink(Protocol):
    def write(self, kind: str, step: int, rows: list[dict]) -> None: ...

    def close(self) -> None: ...


class FileSink:
    """CSV per kind plus one JSONL file; CSV columns are fixed by the first row written to each file (later new
    keys go to the JSONL file only)."""

    def __init__(self, run_dir: str, offsets: dict[str, int] | None = None):
        self.run_dir = run_dir
        self.paths = {kind: os.path.join(run_dir, f"{kind}.csv") for kind in KINDS}
        self.paths["jsonl"] = os.path.join(run_dir, JSONL)
        # A fresh run (offsets None) starts every file empty; a resumed one cuts them back to the checkpoint.
        offsets = offsets or {}
        for name, path in self.paths.items():
            if os.path.exists(path):
                with open(path, "r+b") as f:
                    f.truncate(offsets.get(name, 0))
        self._files = {name: open(path, "a", newline="") for name, path in self.paths.items()}
        self._columns = {kind: self._read_header(self.paths[kind]) for kind in KINDS}

    @staticmethod
    def _read_header(path: str) -> list[str] | None:
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            return None
        with open(path, newline="") as f:
            return next(csv.reader(f))

    def write(self, kind: str, step: int, rows: list[dict]) -> None:
        f = self._files[kind]
        if self._columns[kind] is None:
            keys = sorted({k for row in rows for k in row} - {"step", "seed"})
            self._columns[kind] = ["step", "seed"] + keys
            csv.writer(f).writerow(self._columns[kind])
        writer = csv.DictWriter(f, fieldnames=self._columns[kind], extrasaction="ignore")
        for row in rows:
            writer.writerow({"step": step, **{k: _csv_value(v) for k, v in row.items()}})
            self._files["jsonl"].write(json.dumps({"kind": kind, "step": step, **row}) + "\n")
        f.flush()
        self._files["jsonl"].flush()

    def offsets(self) -> dict[str, int]:
        for f in self._files.values():
            f.flush()
        return {name: os.path.getsize(path) for name, path in self.paths.items()}

    def close(self) -> None:
        for f in self._files.values():
            f.close()


def _csv_value(v):
    return repr(v) if isinstance(v, float) else v  # repr round-trips floats exactly


class TensorBoardSink:
    def __init__(self, run_dir: str, seeds: list[int]):
        from tensorboardX import SummaryWriter

        self._writers = {s: SummaryWriter(os.path.join(run_dir, "tb", f"seed_{s}")) for s in seeds}

    def write(self, kind: str, step: int, rows: list[dict]) -> None:
        for row in rows:
            writer = self._writers[row["seed"]]
            for k, v in row.items():
                if k != "seed" and isinstance(v, (int, float)):
                    writer.add_scalar(k, v, step)
            writer.flush()

    def close(self) -> None:
        for w in self._writers.values():
            w.close()


def import_wandb():
    """The wandb module, or one clear error if the optional package is not installed."""
    try:
        import wandb
    except ImportError:
        raise FluxrlError("--wandb needs the wandb package: pip install 'fluxrl[wandb]'.") from None
    return wandb


class WandbSink:
    def __init__(self, run_dir: str, project: str, name: str, config: dict, run_id: str, quiet: bool = False):
        wandb = import_wandb()
        os.environ.setdefault("WANDB_MODE", "offline")  # compute nodes often have no network; `wandb sync` later
        self._wandb = wandb
        self._run = wandb.init(
            project=project, name=name, id=run_id, resume="allow", dir=run_dir, config=config,
            mode=os.environ["WANDB_MODE"],
            # --quiet: W&B still says where the run is saved, but prints no run summary or history
            settings=wandb.Settings(quiet=True) if quiet else None,
        )

    def write(self, kind: str, step: int, rows: list[dict]) -> None:
        payload = {}
        for row in rows:
            for k, v in row.items():
                if k != "seed" and isinstance(v, (int, float)):
                    payload[f"seed_{row['seed']}/{k}"] = v
        for k in {k for row in rows for k in row if k != "seed"}:
            values = [row[k] for row in rows if isinstance(row.get(k), (int, float))]
            if values:
                payload[k] = sum(values) / len(values)
        self._run.log(payload, step=step)

    def close(self) -> None:
        self._run.finish()


class MultiSink:
    def __init__(self, sinks: list):
        self.sinks = sinks

    def write(self, kind: str, step: int, rows: list[dict]) -> None:
        for sink in self.sinks:
            sink.write(kind, step, rows)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class Progress:
    """A tqdm bar with steps/s and the latest evaluation score on a TTY; otherwise (logs, CI) one summary line
    per log interval; nothing with quiet=True."""

    def __init__(self, total: int, initial: int, quiet: bool, stream=None):
        self.stream = stream or sys.stdout
        self.quiet = quiet
        self.total = total
        self.eval_text = ""
        self._bar = None
        if not quiet and _isatty(self.stream):
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, smoothing=0.1,
                             file=self.stream)

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def set_eval(self, text: str) -> None:
        self.eval_text = text
        if self._bar is not None:
            self._bar.set_postfix_str(text)

    def line(self, step: int, steps_per_second: float, metrics: dict[str, float]) -> None:
        """The periodic summary (only without a bar)."""
        if self.quiet or self._bar is not None:
            return
        parts = [f"step {step}/{self.total}", f"{steps_per_second:.1f} steps/s"]
        if step < self.total and steps_per_second > 0 and math.isfinite(steps_per_second):
            parts.append(f"ETA {_duration((self.total - step) / steps_per_second)}")
        parts += [f"{k.split('/')[-1]} {_fmt(v)}" for k, v in metrics.items()]
        if self.eval_text:
            parts.append(self.eval_text)
        print(" | ".join(parts), file=self.stream, flush=True)

    def message(self, text: str) -> None:
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return False


def _duration(seconds: float) -> str:
    """1h05m, 4m10s or 12s."""
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _fmt(v: float) -> str:
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return f"{v:.4g}"


class Stopwatch:
    """Wall time of the run, continued across resumes."""

    def __init__(self, elapsed: float = 0.0):
        self._start = time.perf_counter() - elapsed

    def elapsed(self) -> float:
        return time.perf_counter() - self._start
