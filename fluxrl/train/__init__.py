"""The training engine: offline, offline-to-online and online RL for every agent; multi-seed, checkpoints, logs."""

from fluxrl.train.config import TrainConfig
from fluxrl.train.engine import RunResult, Trainer, TrainingDiverged, TrainingInterrupted, train
from fluxrl.train.export import export_policy, load_policy
from fluxrl.train.plotting import plot_runs

__all__ = ["TrainConfig", "Trainer", "RunResult", "TrainingDiverged", "TrainingInterrupted", "train", "export_policy",
           "load_policy", "plot_runs"]
