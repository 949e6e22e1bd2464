"""The one training engine: offline, offline-to-online and online RL for every agent, N seeds in one process.

Agents follow the contract in fluxrl/agents (init / update / loss_metrics / act, BATCH_SPEC.keys, or
batch_spec(config) where the fields depend on the config); nothing here depends on which agent runs. Structure of
a run of T = steps + online_steps steps:

offline phase   `lax.scan` fuses up to `updates_per_call` updates into one compiled call; each update draws its
                batch on the device from the dataset Sampler; `vmap` runs all seeds at once. Metrics are summed on
                the device and read only at log time.
online phase    per step: act (on device) -> one env step per seed (host) -> append to the on-device replay
                buffer -> one update from the offline/online mix -> the next action, in one compiled call.
                An action-chunking agent's chunk is executed open loop, one action per step, and replaced when
                it is used up or its episode ends (the official Q-chunking action queue).
boundaries      log (training means over the interval + validation losses on the -val split), evaluate (step 0,
                every eval_interval, end), checkpoint (every save_interval, end). A non-finite loss stops the run
                before any checkpoint could store it.

Determinism: seed value v drives everything of its seed (init, sampling, updates, exploration, env resets,
evaluation) through keys derived from jax.random.key(v) and numpy SeedSequence([v, ...]); nothing depends on how
many seeds share the process or on where a run was interrupted. Offline runs resume bit-identically on CPU (the
carry holds every key). Online runs resume by re-creating each env at its current episode: reset with the
episode's seed and replay the episode's actions from the replay buffer; the replayed observation is compared with
the stored one, so resume is exact for deterministic simulators (MuJoCo) and says so when it is not.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import signal
import sys
import threading
import types
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fluxrl.data.dataset import atomic_write_text
from fluxrl.data.generate import val_path  # the validation split: -val before .npz (OGBench)
from fluxrl.data.sampler import Sampler, normalize_observations, observation_stats, with_previous_actions
from fluxrl.errors import FluxrlError, TrainingInterrupted
from fluxrl.names import has_success
from fluxrl.train import external, intentions
from fluxrl.train.checkpoint import Checkpointer, all_finite, parse_signature
from fluxrl.train.config import (
    DEFAULT_FROM_SCRATCH_WARMUP,
    RUNTIME_FIELDS,
    TrainConfig,
    agent_name,
    defaulted_task_values,
    preset_config,
    resolve_agent,
    to_jsonable,
    validate_train_config,
)
from fluxrl.train.loggers import FileSink, MultiSink, Progress, Stopwatch, TensorBoardSink, WandbSink, import_wandb
from fluxrl.train.replay import ReplayBuffer, check_online_fields, mixed_sample
from fluxrl.train.summary import dataset_metadata, write_summary

CONFIG_FILE = "config.json"
LOCK_FILE = ".lock"
SAMPLE_OPTION_NAMES = ("future_discount", "chunk_size")
ACTION_CLIP = 1.0 - 1e-5  # dataset actions are clipped to ±ACTION_CLIP on loading
# numpy SeedSequence salts: one stream per purpose, so purposes never share random numbers.
ENV_EPISODE_SALT, EVAL_EPISODE_SALT = 1, 2


class TrainingDiverged(FluxrlError):
    """A loss became NaN or inf; the last good checkpoint is kept."""


class RunDirLock:
    """An exclusive lock on RUN_DIR/.lock while a process trains into RUN_DIR: a second process (a re-run in another
    terminal, a relaunched job) is refused instead of interleaving checkpoints and logs. The kernel drops the lock
    when its process ends, however it ends."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_FILE)
        self._file = None

    def __enter__(self):
        import fcntl

        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise FluxrlError(f"{os.path.dirname(self.path)} is being trained by another process (pid {holder}); "
                              f"wait for it to end or stop it first.") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        self._file = f
        return self

    def __exit__(self, *exc_info):
        self._file.close()


class StopRequests:
    """While training: the first SIGINT (Ctrl-C) or SIGTERM (e.g. a cluster's pre-emption) asks the run to stop after
    the compiled call in flight, with a checkpoint; a second signal interrupts at once. Python handles signals only
    in the main thread, so elsewhere the default behaviour stays."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, notice: str | None):
        self.signum: int | None = None
        self._notice = notice
        self._previous: dict = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc_info):
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum
        if self._notice:
            try:  # os.write: a buffered stream may be mid-write in the interrupted frame
                os.write(sys.stderr.fileno(), f"\n{self._notice}\n".encode())
            except (AttributeError, OSError, ValueError):
                pass


class Carry(flax.struct.PyTreeNode):
    """Everything on the device that a resumed run needs; leading axis = seeds (except buffer size/pointer)."""

    agent: Any  # the agent's State
    key: jax.Array  # (seeds,) keys driving sampling, updates and exploration
    acc: dict  # metric sums since the last log, their count, the first step with a non-finite metric per seed
    buffer: ReplayBuffer | None = None
    # (seeds, action_dim): the action of the next online env step; (seeds, H, action_dim) for an H-action chunk
    # agent, whose next action is row host["chunk_position"] of it
    pending_action: jax.Array | None = None


@dataclasses.dataclass
class RunResult:
    run_dir: str
    step: int
    seeds: list[int]
    last_eval: dict | None  # {"step": s, "rows": [{"seed": v, "evaluation/...": x}, ...]}


def seed_keys(seed_values, salt: int) -> jax.Array:
    """One key per seed value, for one purpose (salt); independent of the number of seeds."""
    return jnp.stack([jax.random.fold_in(jax.random.key(v), salt) for v in seed_values])


def episode_seed(seed_value: int, salt: int, *counters: int) -> int:
    return int(np.random.SeedSequence([seed_value, salt, *counters]).generate_state(1)[0])


# --- compiled pieces (pure functions of their arguments) ----------------------------------------------------------


def _accumulate(acc: dict, metrics: dict, step) -> dict:
    finite = jnp.ones(acc["first_bad"].shape, bool)
    for value in metrics.values():
        finite = finite & jnp.isfinite(value)
    first_bad = jnp.where((acc["first_bad"] < 0) & ~finite, step, acc["first_bad"])
    sums = {k: acc["sums"][k] + metrics[k].astype(jnp.float32) for k in acc["sums"]}
    return {"sums": sums, "count": acc["count"] + 1, "first_bad": first_bad}


def empty_accumulator(metric_names, num_seeds: int) -> dict:
    return {
        "sums": {k: jnp.zeros((num_seeds,), jnp.float32) for k in metric_names},
        "count": jnp.zeros((), jnp.int32),
        "first_bad": jnp.full((num_seeds,), -1, jnp.int32),
    }


# The factories are cached: runs of the same agent in one process (sweeps, notebooks, tests) share compilations.
# sample_options is a tuple of (name, value) pairs (hashable) passed on to Sampler.sample.
# The carry is donated: XLA updates its buffers in place instead of copying them at every call (the online
# replay alone is ~256 MB per seed for 1M cube-single transitions), so a carry passed in must not be used again.


@functools.lru_cache(maxsize=None)
def make_offline_chunk(agent: types.ModuleType, batch_size: int, fields: tuple, sample_options: tuple = ()):
    """chunk(carry, sampler, start, length) -> carry after `length` updates (steps start .. start+length-1)."""
    sample_options = dict(sample_options)

    def chunk(carry: Carry, sampler: Sampler, start, length: int) -> Carry:
        def body(carry, step):
            keys = jax.vmap(lambda k: jax.random.split(k, 3))(carry.key)
            batch = jax.vmap(lambda k: sampler.sample(k, batch_size, fields, **sample_options))(keys[:, 1])
            state, metrics = jax.vmap(agent.update)(carry.agent, batch, keys[:, 2])
            return carry.replace(agent=state, key=keys[:, 0], acc=_accumulate(carry.acc, metrics, step)), None

        carry, _ = jax.lax.scan(body, carry, start + jnp.arange(length, dtype=jnp.int32))
        return carry

    return jax.jit(chunk, static_argnames="length", donate_argnames="carry")


def _next_action(agent, state, key, observations, random: bool, action_dim: int, chunk_size: int):
    if random:  # warm-up: uniform actions (or chunks of them) in [-1, 1]
        shape = (action_dim,) if chunk_size == 1 else (chunk_size, action_dim)
        return jax.vmap(lambda k: jax.random.uniform(k, shape, minval=-1.0, maxval=1.0))(key)
    return jax.vmap(lambda s, o, k: agent.act(s, o[None], k, deterministic=False)[0])(state, observations, key)


@functools.lru_cache(maxsize=None)
def make_online_step(agent, batch_size: int, fields: tuple, sample_options: tuple, balanced: bool, action_dim: int,
                     chunk_size: int = 1):
    """step(carry, sampler|None, transition, observations, refresh, step) -> carry: store the transition, update
    (unless warm-up), choose the next action for `observations` (the post-reset observation after an episode end).
    With chunks (chunk_size > 1) only the seeds with refresh[i] take the new chunk; the others keep theirs."""

    def step_fn(carry: Carry, sampler, transition, observations, refresh, step, update: bool,
                random_next: bool) -> Carry:
        buffer = carry.buffer.add(transition)
        keys = jax.vmap(lambda k: jax.random.split(k, 4))(carry.key)
        state, acc = carry.agent, carry.acc
        if update:
            batch = mixed_sample(sampler, buffer, keys[:, 1], batch_size, fields, balanced, sample_options)
            state, metrics = jax.vmap(agent.update)(state, batch, keys[:, 2])
            acc = _accumulate(acc, metrics, step)
        action = _next_action(agent, state, keys[:, 3], observations, random_next, action_dim, chunk_size)
        if chunk_size > 1:
            action = jnp.where(refresh[:, None, None], action, carry.pending_action)
        return carry.replace(agent=state, key=keys[:, 0], acc=acc, buffer=buffer, pending_action=action)

    return jax.jit(step_fn, static_argnames=("update", "random_next"), donate_argnames="carry")


@functools.lru_cache(maxsize=None)
def make_first_action(agent, action_dim: int, chunk_size: int = 1):
    def first(carry: Carry, observations, random: bool) -> Carry:
        keys = jax.vmap(jax.random.split)(carry.key)
        action = _next_action(agent, carry.agent, keys[:, 1], observations, random, action_dim, chunk_size)
        return carry.replace(key=keys[:, 0], pending_action=action)

    return jax.jit(first, static_argnames="random", donate_argnames="carry")


@functools.lru_cache(maxsize=None)
def make_validation(agent, batch_size: int, fields: tuple, sample_options: tuple):
    sample_options = dict(sample_options)

    def validate(state, sampler: Sampler, keys, step):
        keys = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, step)))(keys)
        batch = jax.vmap(lambda k: sampler.sample(k, batch_size, fields, **sample_options))(keys[:, 0])
        return jax.vmap(agent.loss_metrics)(state, batch, keys[:, 1])

    return jax.jit(validate)


@functools.lru_cache(maxsize=None)
def make_init(agent):
    """init_all(keys, example_batch, config) -> the agent states of all seeds (leading axis)."""
    return jax.jit(jax.vmap(agent.init, in_axes=(0, None, None)), static_argnums=2)


@functools.lru_cache(maxsize=None)
def make_sample(batch_size: int, fields: tuple, sample_options: tuple):
    return jax.jit(lambda sampler, key: sampler.sample(key, batch_size, fields, **dict(sample_options)))


def agent_batch_spec(agent, agent_config):
    """The batch spec of `agent` under `agent_config`: its batch_spec(config) where it defines one (QAM: the chunk
    length is a config field), else its BATCH_SPEC."""
    batch_spec = getattr(agent, "batch_spec", None)
    return batch_spec(agent_config) if batch_spec is not None else agent.BATCH_SPEC


@functools.lru_cache(maxsize=None)
def make_act(agent, deterministic: bool):
    """act(state of one seed, observations, key) -> actions."""
    return jax.jit(lambda s, o, k: agent.act(s, o, k, deterministic=deterministic))


@functools.lru_cache(maxsize=None)
def make_row_act(agent, deterministic: bool):
    """row_act(state of one seed, observations[N], key_data[N]) -> row i = act(state, observations[i:i+1], key i)[0]:
    N evaluation episodes in one call, each with the key the one-episode-at-a-time loop would give it."""

    def row_act(state, observations, key_data):
        keys = jax.random.wrap_key_data(key_data)
        return jax.vmap(lambda o, k: agent.act(state, o[None], k, deterministic=deterministic)[0])(observations, keys)

    return jax.jit(row_act)


def make_eval_actors(agent, deterministic: bool, obs_norm: dict | None):
    """(act, row_act) as the engine's evaluation calls them, on raw observations (normalised first with the run's
    obs_norm statistics, if any): act(state, observations, key), row_act(state, observations, key_data)."""
    act, row_act = make_act(agent, deterministic), make_row_act(agent, deterministic)
    if not obs_norm:
        return act, row_act
    mean, std = jnp.asarray(obs_norm["mean"]), jnp.asarray(obs_norm["std"])
    return (lambda state, observations, key: act(state, (observations - mean) / std, key),
            lambda state, observations, keys: row_act(state, (observations - mean) / std, keys))


def task_defaults_text(agent, task: str, defaults: dict) -> str | None:
    """One sentence on the per-task fields that run at the agent's defaults (defaulted_task_values); None if none."""
    if not defaults:
        return None
    one = len(defaults) == 1
    values = ", ".join(f"{k}={v}" for k, v in defaults.items())
    flags = " / ".join(f"--agent.{k}" for k in defaults)
    return (f"{agent_name(agent)} has no per-task value of {', '.join(defaults)} for {task}, so it runs with the "
            f"default{'' if one else 's'} {values}; set {flags} to tune {'it' if one else 'them'} for this task.")


# --- the run ------------------------------------------------------------------------------------------------------


class Trainer:
    """One run: builds data, envs, state and sinks from the configs, then `run()` trains to the end.

    agent: a registered name, an importable module path, or an agent module. agent_config: the agent's Config
    (default: its --preset with the task's per-task values)."""

    def __init__(self, agent, config: TrainConfig, agent_config=None):
        validate_train_config(config)
        if config.dataset is not None:  # stored absolute, so `--resume` works from any directory
            config = dataclasses.replace(config, dataset=os.path.abspath(config.dataset))
        self.agent_spec = agent if isinstance(agent, str) else agent.__name__
        self.agent = resolve_agent(agent) if isinstance(agent, str) else agent
        self.cfg = config
        self.agent_config = agent_config if agent_config is not None else preset_config(
            self.agent, config.preset, config.task, online=config.online_steps > 0)
        switch = getattr(self.agent, "online_config", None)
        online_agent_config = switch(self.agent_config) if switch and config.online_steps > 0 else None
        self.online_agent_config = online_agent_config if online_agent_config != self.agent_config else None
        self.task_defaults_note = task_defaults_text(self.agent, config.task, defaulted_task_values(
            self.agent, self.agent_config, config.preset, config.task, online=config.online_steps > 0))
        self.seeds = [config.seed + i for i in range(config.seeds)]
        self.total_steps = config.steps + config.online_steps
        spec = agent_batch_spec(self.agent, self.agent_config)
        self.fields = tuple(spec.keys)
        self.chunk_size = getattr(spec, "chunk_size", 1)
        self.sample_options = tuple((k, getattr(spec, k)) for k in SAMPLE_OPTION_NAMES
                                    if getattr(spec, k, None) is not None)
        if self.chunk_size == 1:  # the sampler's default: leave it out (the online replay has no chunk fields)
            self.sample_options = tuple(o for o in self.sample_options if o[0] != "chunk_size")
        self.frame_stack = getattr(spec, "frame_stack", None) or 1
        self.previous_action = bool(getattr(spec, "previous_action", False))
        self.batch_size = int(self.agent_config.batch_size)
        self.online = config.online_steps > 0
        self.from_scratch = config.steps == 0 and config.dataset is None
        if self.online:
            check_online_fields(self.fields)
            if self.frame_stack > 1:
                raise FluxrlError("Frame-stacked agents train offline only: the online replay stores single frames.")
            if self.previous_action:
                raise FluxrlError(f"{agent_name(self.agent)} conditions on the previous action and trains offline "
                                  f"only; drop --online_steps.")
        warmup = config.warmup_steps
        self.warmup = warmup if warmup is not None else (DEFAULT_FROM_SCRATCH_WARMUP if self.from_scratch else 0)
        self.run_dir = os.path.abspath(config.run_dir or self._default_run_dir())
        self.resuming = self._check_run_dir()

    # --- set-up ------------------------------------------------------------------------------------------------
    def _default_run_dir(self) -> str:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = agent_name(self.agent).replace("/", "_")
        return os.path.join("runs", f"{name}__{self.cfg.task}__s{self.cfg.seed}__{stamp}")

    def config_record(self) -> dict:
        return {
            "agent": self.agent_spec,
            "train": to_jsonable(self.cfg),
            "agent_config": to_jsonable(self.agent_config),
            **({"agent_config_online": to_jsonable(self.online_agent_config)} if self.online_agent_config else {}),
        }

    def _check_run_dir(self) -> bool:
        """True if run_dir holds this very run (resume); refuse a directory holding anything else."""
        path = os.path.join(self.run_dir, CONFIG_FILE)
        if not os.path.exists(path):
            if os.path.isdir(self.run_dir) and set(os.listdir(self.run_dir)) - {LOCK_FILE}:
                raise FluxrlError(f"{self.run_dir} exists and is not a fluxrl run directory; choose another --run_dir.")
            return False
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise FluxrlError(f"{path} is unreadable ({e}); choose another --run_dir.") from None
        saved_flags, given_flags = _comparable(saved), _comparable(self.config_record())
        self.saved_steps = saved["train"]["steps"]
        if not saved["train"].get("online_steps") and not self.cfg.online_steps:
            del saved_flags["--steps"], given_flags["--steps"]  # an offline run may change its length
        difference = _first_difference(saved_flags, given_flags)
        if difference:
            raise FluxrlError(
                f"{self.run_dir} holds a run with a different configuration ({difference}); choose another "
                f"--run_dir, or continue that run with `fluxrl train --resume {self.run_dir}`."
            )
        return True

    def _load(self, path: str) -> tuple[dict, dict]:
        data, meta = external.load_dataset(path)
        # As the official loaders (FQL and its descendants): agents squash or clip into [-1, 1], and
        # actions exactly at the bounds would make flow/tanh targets degenerate.
        for key in ("actions", "next_actions"):
            if key in data:
                data[key] = np.clip(data[key], -ACTION_CLIP, ACTION_CLIP)
        if self.obs_space is not None:
            external.check_compatible(data, self.obs_space.shape, self.action_dim, path, self.cfg.task)
        if any(f in ("rewards", "masks", "rewards_chunk", "masks_chunk") for f in self.fields) or self.online:
            if "rewards" not in data or "masks" not in data:
                data = external.relabel(data, self.cfg.task)
        if self.previous_action:
            data = with_previous_actions(data)
        return data, meta

    def _setup_data(self) -> None:
        self.sampler = self.val_sampler = self.intention_sample = None
        self.dataset_info = self.obs_norm = self.data_stats = None
        obs_norm = getattr(self.agent_config, "obs_norm", "none")
        if obs_norm not in ("none", "normal"):
            raise FluxrlError(f"--agent.obs_norm must be none or normal, got '{obs_norm}'.")
        if obs_norm == "normal" and self.online:
            raise FluxrlError("Observation normalisation (--agent.obs_norm normal) is supported offline only; "
                              "use --agent.obs_norm none for online training.")
        if self.from_scratch:
            return
        path = self.cfg.dataset
        if path is None:
            from fluxrl.data.cache import default_dataset_path

            path = default_dataset_path(self.cfg.task)
        path = os.path.abspath(path)
        data, meta = self._load(path)
        self.dataset_info = dataset_metadata(path, data, meta)
        if obs_norm == "normal":
            # Statistics of this phase's dataset (the official InFOM code normalises each phase separately).
            stats = observation_stats(data)
            self.obs_norm = {"mean": stats["mean"].tolist(), "std": stats["std"].tolist()}
            data = normalize_observations(data, stats)
        if hasattr(self.agent, "intentions"):
            self.intention_sample = intentions.sample_rows(data, self.cfg.task)
        if hasattr(self.agent, "set_data_stats"):
            self.data_stats = {k: jnp.asarray(v) for k, v in observation_stats(data).items()}
        self.sampler = Sampler.create(data, frame_stack=self.frame_stack)
        del data  # the device copy is the only one kept
        self.sampler.check(self.fields)
        validation = val_path(path)
        if os.path.exists(validation):
            val_data = self._load(validation)[0]
            if self.obs_norm:
                val_data = normalize_observations(val_data, {k: np.asarray(v, np.float32)
                                                             for k, v in self.obs_norm.items()})
            self.val_sampler = Sampler.create(val_data, frame_stack=self.frame_stack)
            self.val_sampler.check(self.fields)
            self.dataset_info["validation_path"] = validation

    def _setup_envs(self) -> None:
        """The online envs (one per seed); evaluation makes its own. Also reads the spaces (one probe env when
        only evaluation needs an env, to check the dataset fits the task)."""
        self.envs = [external.make_env(self.cfg.task, seed=v) for v in self.seeds] if self.online else []
        self.obs_space = None
        probe = self.envs[0] if self.envs else (external.make_env(self.cfg.task) if self.cfg.eval_episodes else None)
        if probe is not None:
            self.action_dim = int(np.prod(probe.action_space.shape))
            self.obs_space = probe.observation_space
            if not self.envs:
                probe.close()

    def _example_batch(self) -> dict:
        if self.sampler is not None:
            return make_sample(self.batch_size, self.fields, self.sample_options)(self.sampler, jax.random.key(0))
        # Online from scratch: a batch of zeros as the online replay forms it (chunk fields included).
        empty = ReplayBuffer.create(1, self.chunk_size, self.obs_space.shape, _obs_dtype(self.obs_space),
                                    self.action_dim)
        one_seed = jax.tree_util.tree_map(lambda x: x[0], empty.data)
        return empty.sample_seed(one_seed, jax.random.key(0), self.batch_size, self.fields, self.chunk_size)

    def _initial_carry(self) -> Carry:
        example = self._example_batch()
        # Per-row shapes and dtypes of a batch: all export/load_policy needs to rebuild the agent's state.
        self.example_spec = {k: [list(v.shape[1:]), str(v.dtype)] for k, v in example.items()}
        init_keys = seed_keys(self.seeds, 0)
        state = self._with_data_stats(make_init(self.agent)(init_keys, example, self.agent_config))
        one_state = jax.tree_util.tree_map(lambda x: x[0], state)
        metric_shapes = jax.eval_shape(
            lambda s, b, k: self.agent.update(s, b, k)[1], one_state, example, jax.random.key(0))
        bad = [k for k, v in metric_shapes.items() if v.shape != ()]
        if bad:
            raise ValueError(f"agent {agent_name(self.agent)}: update metrics must be scalars; {bad} are not")
        buffer = pending = None
        if self.online:
            capacity = self.cfg.buffer_size or self.cfg.online_steps
            if self.sampler is not None:
                obs_shape, obs_dtype = example["observations"].shape[1:], example["observations"].dtype
            else:
                obs_shape, obs_dtype = self.obs_space.shape, _obs_dtype(self.obs_space)
            buffer = ReplayBuffer.create(len(self.seeds), capacity, obs_shape, obs_dtype, self.action_dim)
            chunk_shape = (self.chunk_size,) if self.chunk_size > 1 else ()
            pending = jnp.zeros((len(self.seeds),) + chunk_shape + (self.action_dim,), jnp.float32)
        return Carry(agent=state, key=seed_keys(self.seeds, 1), acc=empty_accumulator(metric_shapes, len(self.seeds)),
                     buffer=buffer, pending_action=pending)

    def _with_data_stats(self, state):
        if self.data_stats is None:
            return state
        return jax.vmap(self.agent.set_data_stats, in_axes=(0, None))(state, self.data_stats)

    def _pretrained_agent(self, template):
        """The agent states (all seeds) of the latest checkpoint of the pre-training run cfg.init_from, matched
        leaf by leaf to `template`, then prepared for fine-tuning (begin_finetune, this phase's data stats)."""
        source = self.cfg.init_from
        directory = os.path.join(source, "checkpoints")
        if not os.path.isdir(directory):
            raise FluxrlError(f"{source} is not a pre-training run directory (no checkpoints/).")
        checkpointer = Checkpointer(directory)
        try:
            meta = checkpointer.read_meta()
            if meta.get("seeds") != self.seeds:
                raise FluxrlError(f"{source} pre-trained seeds {meta.get('seeds')}; fine-tuning must use the same "
                                  f"seeds (got {self.seeds}).")
            stored = {parse_signature(e)[0]: (f"{i:06d}", parse_signature(e)) for i, e in
                      enumerate(meta["leaf_signature"])}
            wanted, order = {}, []
            for path, leaf in jax.tree_util.tree_leaves_with_path(template):
                name = ".agent" + jax.tree_util.keystr(path)
                value = jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf
                if name not in stored or tuple(stored[name][1][1]) != tuple(value.shape):
                    raise FluxrlError(f"{source}'s checkpoint does not fit this agent and configuration (array "
                                      f"{name}); fine-tune with the agent config the pre-training used.")
                wanted[stored[name][0]] = (value.shape, value.dtype)
                order.append((stored[name][0], leaf))
            arrays = checkpointer.restore_arrays(meta["step"], wanted)
        finally:
            checkpointer.close()
        leaves = [jax.random.wrap_key_data(arrays[k], impl=jax.random.key_impl(leaf))
                  if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else arrays[k] for k, leaf in order]
        state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
        state = jax.jit(jax.vmap(self.agent.begin_finetune))(state)
        self.progress.message(f"Starting from {source} (pre-trained for {meta['step']} steps).")
        return self._with_data_stats(state)

    def _setup_sinks(self, offsets) -> None:
        sinks = [FileSink(self.run_dir, offsets)]
        self.file_sink = sinks[0]
        if self.cfg.tensorboard:
            sinks.append(TensorBoardSink(self.run_dir, self.seeds))
        if self.cfg.wandb:
            name = os.path.basename(self.run_dir)
            sinks.append(
                WandbSink(self.run_dir, self.cfg.wandb_project, name, self.config_record(), name, self.cfg.quiet)
            )
        self.sink = MultiSink(sinks)

    # --- run ---------------------------------------------------------------------------------------------------
    def run(self) -> RunResult:
        cfg = self.cfg
        if cfg.wandb:
            import_wandb()  # fail before any work if the optional package is missing
        self._setup_envs()
        self._setup_data()
        os.makedirs(self.run_dir, exist_ok=True)
        with RunDirLock(self.run_dir):
            self.resuming = self._check_run_dir()  # again, under the lock: another process may have written it
            return self._run_locked()

    def _run_locked(self) -> RunResult:
        cfg = self.cfg
        self.checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"), keep=cfg.keep_checkpoints)
        latest = self.checkpointer.latest_step() if self.resuming else None
        new_length = self.resuming and cfg.steps != self.saved_steps
        try:
            self._check_resume(latest, new_length)
        except FluxrlError:
            self.checkpointer.close()
            raise
        if not self.resuming or new_length:  # atomically: a half-written config.json would orphan the run
            atomic_write_text(os.path.join(self.run_dir, CONFIG_FILE), json.dumps(self.config_record(), indent=2),
                              overwrite=True)
        self.carry = self._initial_carry()
        meta = None
        if latest is not None:
            self.carry, meta = self.checkpointer.restore(self.carry, latest)
        self.step = meta["step"] if meta else 0
        self.last_eval = meta.get("last_eval") if meta else None
        self.host = meta["host"] if meta else self._initial_host_state()
        self.stopwatch = Stopwatch(meta["elapsed"] if meta else 0.0)
        self._setup_sinks(meta["log_offsets"] if meta else None)
        self.progress = Progress(self.total_steps, self.step, cfg.quiet)
        if cfg.init_from and latest is None:
            self.carry = self.carry.replace(agent=self._pretrained_agent(self.carry.agent))
        self._window = (self.step, self.stopwatch.elapsed())
        if meta:
            length = f" (length {self.saved_steps} -> {cfg.steps} steps)" if new_length else ""
            self.progress.message(f"Resuming {self.run_dir} at step {self.step}{length}.")
        elif self.task_defaults_note:
            self.progress.message(f"Note: {self.task_defaults_note}")
        self._write_summary("running")
        self._compile()
        self.stop = StopRequests(None if cfg.quiet else "Stopping after the current call, with a checkpoint (a second "
                                                         "signal stops at once, without one).")
        try:
            with self.stop:
                if self.step == 0:
                    self._evaluate(0)
                self._offline_phase()
                if self.online and self.step < self.total_steps:
                    self._online_phase()
        except TrainingDiverged:
            self._write_summary("diverged")
            raise
        except TrainingInterrupted:
            self._write_summary("interrupted")
            raise
        finally:
            self.progress.close()
            self.sink.close()
            self.checkpointer.close()
        self._write_intentions()
        self._write_summary("finished")
        return RunResult(self.run_dir, self.step, self.seeds, self.last_eval)

    def _compile(self) -> None:
        self.offline_chunk = make_offline_chunk(self.agent, self.batch_size, self.fields, self.sample_options)
        self.validate = make_validation(self.agent, self.batch_size, self.fields, self.sample_options)
        self.val_keys = seed_keys(self.seeds, 2)
        # The deterministic flag of the official evaluation (e.g. FQL samples its noise even there).
        deterministic = bool(getattr(self.agent, "EVAL_DETERMINISTIC", True))
        # The agent sees normalised observations; the environment gives raw ones.
        self.act_eval, self.row_act_eval = make_eval_actors(self.agent, deterministic, self.obs_norm)
        if self.online:
            self.online_step = make_online_step(self.agent, self.batch_size, self.fields, self.sample_options,
                                                self.cfg.balanced_sampling, self.action_dim, self.chunk_size)
            self.first_action = make_first_action(self.agent, self.action_dim, self.chunk_size)

    def _next_boundary(self, step: int) -> int:
        cfg = self.cfg
        return min((step // i + 1) * i for i in (cfg.log_interval, cfg.eval_interval, cfg.save_interval))

    def _offline_phase(self) -> None:
        while self.step < self.cfg.steps:
            n = min(self.cfg.updates_per_call, self._next_boundary(self.step) - self.step, self.cfg.steps - self.step)
            self.carry = self.offline_chunk(self.carry, self.sampler, jnp.int32(self.step), n)
            jax.block_until_ready(self.carry.key)  # an honest progress bar and steps/s
            self.step += n
            self.progress.advance(n)
            self._boundaries()
            self._stop_if_requested()

    def _boundaries(self) -> None:
        s, cfg = self.step, self.cfg
        end = s == self.total_steps
        if s % cfg.log_interval == 0 or end:
            self._log()
        if s % cfg.eval_interval == 0 or end:
            self._check_divergence()
            self._evaluate(s)
        if s % cfg.save_interval == 0 or end:
            self._save()

    def _check_resume(self, latest: int | None, new_length: bool) -> None:
        """Refuse to resume to an end before the latest checkpoint, or on a dataset file changed since the run began."""
        if latest is None:
            return
        if new_length and self.cfg.steps < latest:
            raise FluxrlError(f"{self.run_dir} is at step {latest}; --steps {self.cfg.steps} would end before it "
                              f"(give at least {latest}).")
        saved = self.checkpointer.read_meta(latest).get("dataset_sha256")
        now = self.dataset_info["sha256"] if self.dataset_info else None
        if saved and now and saved != now:
            raise FluxrlError(f"{self.dataset_info['path']} changed since {self.run_dir} started (sha256 "
                              f"{saved[:12]}... then, {now[:12]}... now); restore it, or train on it in a new "
                              f"--run_dir.")

    def _stop_if_requested(self) -> None:
        if self.stop.signum is None or self.step == self.total_steps:
            return
        if self.checkpointer.latest_step() != self.step:
            self._save()
        raise TrainingInterrupted(self.run_dir, self.step, self.stop.signum)

    # --- logging, divergence, evaluation, checkpoints ----------------------------------------------------------
    def _log(self) -> None:
        acc = jax.device_get(self.carry.acc)
        count = int(acc["count"])
        elapsed = self.stopwatch.elapsed()
        window_steps, window_time = self.step - self._window[0], elapsed - self._window[1]
        self._window = (self.step, elapsed)
        speed = window_steps / window_time if window_time > 0 else float("nan")
        rows = [{"seed": v} for v in self.seeds]
        if count:
            for k, sums in acc["sums"].items():
                for i, row in enumerate(rows):
                    row[f"training/{k}"] = float(sums[i] / count)
        if self.val_sampler is not None and count:
            val = jax.device_get(self.validate(self.carry.agent, self.val_sampler, self.val_keys, self.step))
            for k, v in val.items():
                for i, row in enumerate(rows):
                    row[f"validation/{k}"] = float(v[i])
        for row in rows:
            row["time/steps_per_second"] = speed
            row["time/total_time"] = elapsed
        if count:
            self.sink.write("train", self.step, rows)
        self._log_exploration()
        shown = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k.startswith("training/")}
        self.progress.line(self.step, speed, dict(list(shown.items())[:4]))
        self._check_divergence()
        self.carry = self.carry.replace(acc=empty_accumulator(acc["sums"], len(self.seeds)))

    def _check_divergence(self) -> None:
        acc = jax.device_get(self.carry.acc)
        first_bad = np.asarray(acc["first_bad"])
        if np.all(first_bad < 0):
            return
        i = int(np.argmax(first_bad >= 0))
        names = sorted(k for k, v in acc["sums"].items() if not np.isfinite(v[i]))
        self._diverged(f"a loss became NaN or inf at step {int(first_bad[i]) + 1} for seed {self.seeds[i]} "
                       f"({', '.join(names) or 'see train.csv'})")

    def _diverged(self, what: str) -> None:
        last = self.checkpointer.latest_step()
        kept = f"the last good checkpoint (step {last}) is kept" if last is not None else "no checkpoint was written"
        raise TrainingDiverged(f"Training diverged: {what}; {kept} in {self.run_dir} (try a lower learning rate "
                               f"or check the dataset).")

    def _evaluate(self, step: int) -> None:
        cfg = self.cfg
        if not cfg.eval_episodes:
            return
        final = step == self.total_steps
        rows = []
        for i, v in enumerate(self.seeds):
            state = jax.tree_util.tree_map(lambda x: x[i], self.carry.agent)
            video = None
            if final and cfg.video_episodes:
                os.makedirs(os.path.join(self.run_dir, "videos"), exist_ok=True)
                video = os.path.join(self.run_dir, "videos", f"seed_{v}_step_{step}.mp4")
            stats = external.evaluate(cfg.task, functools.partial(self.act_eval, state), cfg.eval_episodes,
                                      seed=episode_seed(v, EVAL_EPISODE_SALT, step), video_path=video,
                                      video_episodes=cfg.video_episodes if video else 0,
                                      row_act_fn=functools.partial(self.row_act_eval, state),
                                      previous_action=self.previous_action)
            rows.append({"seed": v, **{f"evaluation/{k}": float(x) for k, x in stats.items()}})
        self.sink.write("eval", step, rows)
        self.last_eval = {"step": step, "rows": rows}
        # DMC and Gymnasium tasks have no success signal (the evaluator reports 0): show their return instead.
        goal_task = self.cfg.task.strip() and has_success(self.cfg.task)
        name = "evaluation/success" if goal_task and "evaluation/success" in rows[0] else "evaluation/return"
        if name in rows[0]:
            self.progress.set_eval(f"eval {name.split('/')[1]} {np.mean([r[name] for r in rows]):.3g} @ {step}")

    def _save(self) -> None:
        self._check_divergence()
        if not all_finite(self.carry.agent):
            self._diverged(f"the agent's parameters became NaN or inf by step {self.step}")
        meta = {
            "step": self.step,
            "log_offsets": self.file_sink.offsets(),
            "host": self.host,
            "last_eval": self.last_eval,
            "elapsed": self.stopwatch.elapsed(),
            "seeds": self.seeds,
            "example_batch": self.example_spec,
            "obs_norm": self.obs_norm,
            "dataset_sha256": self.dataset_info["sha256"] if self.dataset_info else None,
        }
        self.checkpointer.save(self.step, self.carry, meta)
        self._write_summary("running")  # its step and last evaluation stay current

    def _write_intentions(self) -> None:
        """intentions.png/json: what the intention encoder infers on dataset rows with known behaviour goals."""
        sample = self.intention_sample
        if sample is None:
            return
        latents = jax.jit(jax.vmap(self.agent.intentions, in_axes=(0, None, None)))(
            self.carry.agent, jnp.asarray(sample["observations"]), jnp.asarray(sample["actions"]))
        record = intentions.write_intentions(
            self.run_dir, [np.asarray(z) for z in latents], sample, self.seeds,
            f"{self.agent.NAME} on {self.cfg.task}, step {self.step}")
        self.progress.message(
            f"Intentions: goal probe accuracy {min(record['latent_probe_accuracy'].values()):.2f}-"
            f"{max(record['latent_probe_accuracy'].values()):.2f} from z, {record['raw_input_probe_accuracy']:.2f} "
            f"from (s', a'), majority {record['majority_rate']:.2f} ({self.run_dir}/intentions.png).")

    def _write_summary(self, status: str) -> None:
        write_summary(self.run_dir, self.config_record(), status=status, step=self.step,
                      total_steps=self.total_steps, seeds=self.seeds, dataset=self.dataset_info,
                      last_eval=self.last_eval,
                      task_defaults=self.task_defaults_note)

    # --- online phase ------------------------------------------------------------------------------------------
    def _initial_host_state(self) -> dict:
        n = len(self.seeds)
        return {
            "episode": [0] * n,  # index of the current episode of each seed's env
            "episode_step": [0] * n,
            "episode_return": [0.0] * n,
            "chunk_position": [0] * n,  # the row of the pending chunk executed next (chunking agents)
            "window": [_empty_window() for _ in range(n)],  # exploration stats since the last log
        }

    def _reset_env(self, i: int):
        seed = episode_seed(self.seeds[i], ENV_EPISODE_SALT, self.host["episode"][i])
        observation, _ = self.envs[i].reset(seed=seed)
        return observation

    def _restore_envs(self) -> list:
        """Bring each env back to where the checkpoint left it: reset to the current episode, replay its actions."""
        buffer = self.carry.buffer
        observations = []
        for i, env in enumerate(self.envs):
            observation = self._reset_env(i)
            t = self.host["episode_step"][i]
            if t:
                replayed = t <= buffer.capacity
                if replayed:
                    rows = buffer.last_rows(t)
                    for action in np.asarray(buffer.data["actions"][i][rows]):
                        observation = env.step(action)[0]
                    stored = np.asarray(buffer.data["next_observations"][i][rows[-1]])
                    replayed = np.array_equal(np.asarray(observation, stored.dtype), stored)
                if not replayed:
                    self.progress.message(
                        f"warning: seed {self.seeds[i]}'s environment could not be restored exactly (replay "
                        f"mismatch or episode longer than the buffer); it starts a new episode.")
                    self.host["episode"][i] += 1
                    self.host["episode_step"][i], self.host["episode_return"][i] = 0, 0.0
                    self.host["chunk_position"][i] = 0  # the pending chunk was chosen in the abandoned episode
                    observation = self._reset_env(i)
            observations.append(observation)
        return observations

    def _online_phase(self) -> None:
        cfg, host = self.cfg, self.host
        if self.online_agent_config is not None:  # the agent's own online-phase values (e.g. GFP's eta_online)
            self.carry = self.carry.replace(agent=self.carry.agent.replace(config=self.online_agent_config))
        n, chunked = len(self.seeds), self.chunk_size > 1
        host.setdefault("chunk_position", [0] * n)  # checkpoints written before chunked online training
        dtype = self.carry.buffer.data["observations"].dtype
        observations = [np.asarray(o, dtype) for o in self._restore_envs()]
        if self.step == cfg.steps:
            self.carry = self.first_action(self.carry, jnp.asarray(np.stack(observations)),
                                           random=self.warmup > 0)
        while self.step < self.total_steps:
            online_index = self.step - cfg.steps
            pending = np.asarray(self.carry.pending_action)
            actions = [pending[i, host["chunk_position"][i]] if chunked else pending[i] for i in range(n)]
            refresh = np.ones(n, bool)
            transition = {k: [] for k in ("observations", "actions", "rewards", "masks", "terminals",
                                          "next_observations")}
            for i in range(n):
                next_obs, reward, terminated, truncated, info = self.envs[i].step(actions[i])
                next_obs = np.asarray(next_obs, dtype)
                for k, v in (("observations", observations[i]), ("actions", actions[i]), ("rewards", reward),
                             ("masks", 1.0 - float(terminated)), ("terminals", float(terminated or truncated)),
                             ("next_observations", next_obs)):
                    transition[k].append(v)
                host["episode_step"][i] += 1
                host["episode_return"][i] += float(reward)
                host["chunk_position"][i] += 1
                if host["chunk_position"][i] == self.chunk_size or terminated or truncated:
                    host["chunk_position"][i] = 0  # the chunk is used up or its episode is over: ask for a new one
                else:
                    refresh[i] = False
                if terminated or truncated:
                    _record_episode(host["window"][i], host["episode_return"][i], host["episode_step"][i], info)
                    host["episode"][i] += 1
                    host["episode_step"][i], host["episode_return"][i] = 0, 0.0
                    next_obs = np.asarray(self._reset_env(i), dtype)
                observations[i] = next_obs
            batch = {k: jnp.asarray(np.stack(v).astype(np.float32) if k not in ("observations", "next_observations")
                                    else np.stack(v)) for k, v in transition.items()}
            self.carry = self.online_step(
                self.carry, self.sampler, batch, jnp.asarray(np.stack(observations)), jnp.asarray(refresh),
                jnp.int32(self.step),
                update=online_index >= self.warmup, random_next=online_index + 1 < self.warmup)
            self.step += 1
            self.progress.advance(1)
            self._boundaries()
            self._stop_if_requested()

    def _log_exploration(self) -> None:
        if not self.online:
            return
        windows = self.host["window"]
        if not any(w["episodes"] for w in windows):
            return
        rows = []
        for v, w in zip(self.seeds, windows):
            count = w["episodes"]
            row = {"seed": v, "exploration/episodes": count}
            for k in ("return", "length"):
                row[f"exploration/{k}"] = w[k] / count if count else float("nan")
            if w["success_count"]:
                row["exploration/success"] = w["success"] / w["success_count"]
            rows.append(row)
        self.sink.write("exploration", self.step, rows)
        self.host["window"] = [_empty_window() for _ in windows]


def _empty_window() -> dict:
    return {"episodes": 0, "return": 0.0, "length": 0.0, "success": 0.0, "success_count": 0}


def _record_episode(window: dict, episode_return: float, length: int, info: dict) -> None:
    window["episodes"] += 1
    window["return"] += episode_return
    window["length"] += length
    if "success" in info:
        window["success"] += float(info["success"])
        window["success_count"] += 1


def _obs_dtype(space):
    return jnp.uint8 if np.dtype(space.dtype) == np.uint8 else jnp.float32


def _comparable(record: dict) -> dict:
    """A config record as {flag: value}, without the options that may change on resume."""
    flat = {"agent": record.get("agent")}
    flat.update({f"--{k}": v for k, v in record.get("train", {}).items() if k not in RUNTIME_FIELDS})
    flat.update(_flatten(record.get("agent_config") or {}, "--agent."))
    return flat


def _flatten(d: dict, prefix: str) -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _first_difference(saved: dict, given: dict) -> str | None:
    for k in sorted(set(saved) | set(given)):
        if saved.get(k) != given.get(k):
            return f"{k}: saved {saved.get(k)!r}, given {given.get(k)!r}"
    return None


def train(agent, config: TrainConfig, agent_config=None) -> RunResult:
    """Train `agent` (name, module path or module) with `config`; resumes if config.run_dir holds this run."""
    return Trainer(agent, config, agent_config).run()
