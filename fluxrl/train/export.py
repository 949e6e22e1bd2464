"""Export one seed's policy from a run, and load an exported policy as a jitted obs -> action function.

An exported policy is a directory (no pickle anywhere):
  policy.json   format version, agent (registry name or module path), agent config, per-row batch shapes
                (what init needs to rebuild the state's structure), seed, step, task, fluxrl version, and the
                signature (path, dtype, shape) of every stored array
  params.npz    the arrays of the agent state that `act` reads, found by tracing `act` and dropping every input
                it does not use (optimizer moments, critics of actor-critic agents, ...). Whatever the agent
                keeps for acting (observation normalisation statistics included) is therefore exported.
load_policy rebuilds a state with the agent's init from policy.json and puts the stored arrays in place.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from fluxrl import installed_version
from fluxrl.errors import FluxrlError
from fluxrl.train.checkpoint import Checkpointer, leaf_signature, parse_signature
from fluxrl.train.config import TrainConfig, from_jsonable, resolve_agent
from fluxrl.train.engine import CONFIG_FILE, agent_batch_spec

POLICY_FILE = "policy.json"
PARAMS_FILE = "params.npz"
FORMAT_VERSION = 1
AGENT_PREFIX = ".agent"  # leaf paths of the agent's state inside the training carry


def _example_batch(spec: dict) -> dict:
    return {k: jnp.zeros([1] + list(shape), dtype) for k, (shape, dtype) in spec.items()}


def _is_key(x) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _signature(path, leaf) -> str:
    return leaf_signature(path, jax.random.key_data(leaf) if _is_key(leaf) else leaf)


def used_by_act(agent, state, observation_shape, observation_dtype) -> list[bool]:
    """For each leaf of `state`: does agent.act read it (deterministic or not)? Found with XLA-independent
    dead-code elimination of act's jaxpr, which follows nested jit calls."""
    from jax._src.interpreters import partial_eval as pe  # dce_jaxpr: the same pass jit uses to drop unused inputs

    leaves, treedef = jax.tree_util.tree_flatten(state)
    observations = jax.ShapeDtypeStruct((1,) + tuple(observation_shape), observation_dtype)
    used = [False] * len(leaves)
    for deterministic in (True, False):
        def act(leaves, obs, key):
            return agent.act(jax.tree_util.tree_unflatten(treedef, leaves), obs, key, deterministic=deterministic)

        closed = jax.make_jaxpr(act)(leaves, observations, jax.random.key(0))
        _, used_inputs = pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
        used = [u or v for u, v in zip(used, used_inputs[: len(leaves)])]
    return used


def _read_run(run_dir: str):
    """(config.json record, TrainConfig, agent module) of a run directory."""
    config_path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(config_path):
        raise FluxrlError(f"{run_dir} is not a fluxrl run directory (no {CONFIG_FILE}).")
    with open(config_path) as f:
        record = json.load(f)
    return record, from_jsonable(TrainConfig, record["train"], config_path), resolve_agent(record["agent"])


def _phase_config_record(record: dict, train: TrainConfig, step: int) -> dict:
    """The agent config of the phase checkpoint `step` ends in (an agent may switch values online:
    `online_config`)."""
    online = record.get("agent_config_online")
    return online if online and step > train.steps else record["agent_config"]


def _agent_leaf_names(template) -> list[str]:
    return [AGENT_PREFIX + jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(template)]


def restore_seed_states(run_dir: str, step: int | None = None):
    """Every seed's full agent state from checkpoint `step` (default: the latest) of `run_dir`, for analysis.

    Returns (agent module, agent config of the checkpoint's phase, TrainConfig, [state per seed], step)."""
    record, train, agent = _read_run(run_dir)
    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        arrays, meta = checkpointer.read_arrays(step)
    finally:
        checkpointer.close()
    step = meta["step"]
    config = from_jsonable(agent.Config, _phase_config_record(record, train, step), os.path.join(run_dir, CONFIG_FILE))
    template = jax.jit(agent.init, static_argnums=2)(jax.random.key(0), _example_batch(meta["example_batch"]), config)
    stored = {parse_signature(entry)[0]: f"{i:06d}" for i, entry in enumerate(meta["leaf_signature"])}
    names = _agent_leaf_names(template)
    missing = [name for name in names if name not in stored]
    if missing:
        raise FluxrlError(f"Checkpoint step {step} of {run_dir} has no array {missing[0]}; it was written by a "
                          f"different version of agent {record['agent']}.")
    treedef = jax.tree_util.tree_structure(template)
    states = [jax.tree_util.tree_unflatten(treedef, [arrays[stored[name]][i] for name in names])
              for i in range(train.seeds)]
    return agent, config, train, states, step


def export_policy(run_dir: str, seed: int | None = None, out: str | None = None, step: int | None = None) -> str:
    """Write seed `seed`'s policy (default: the run's first seed) from checkpoint `step` (default: the latest) of
    `run_dir` into the new directory `out` (default RUN_DIR/policy_seed<seed>); returns `out`."""
    record, train, agent = _read_run(run_dir)
    seeds = [train.seed + i for i in range(train.seeds)]
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise FluxrlError(f"--seed {seed} is not a seed of {run_dir} (its seeds: {', '.join(map(str, seeds))}).")
    out = os.path.abspath(out or os.path.join(run_dir, f"policy_seed{seed}"))
    if os.path.exists(out):
        raise FluxrlError(f"{out} already exists; refusing to overwrite it (choose another --out).")

    checkpointer = Checkpointer(os.path.join(run_dir, "checkpoints"))
    try:
        meta = checkpointer.read_meta(step)
        step = meta["step"]
        # The checkpoint's phase decides which leaves act reads (SWFP's online blocks are unused offline).
        phase_record = _phase_config_record(record, train, step)
        agent_config = from_jsonable(agent.Config, phase_record, os.path.join(run_dir, CONFIG_FILE))
        example = _example_batch(meta["example_batch"])
        template = jax.jit(agent.init, static_argnums=2)(jax.random.key(0), example, agent_config)
        paths = jax.tree_util.tree_leaves_with_path(template)
        stored = {parse_signature(entry)[0]: (f"{i:06d}", entry) for i, entry in enumerate(meta["leaf_signature"])}
        obs_shape, obs_dtype = meta["example_batch"]["observations"]
        used = used_by_act(agent, template, obs_shape, obs_dtype)
        wanted, leaves = {}, []
        for (path, leaf), name, is_used in zip(paths, _agent_leaf_names(template), used):
            if name not in stored:
                raise FluxrlError(f"Checkpoint step {step} of {run_dir} has no array {name}; it was written by a "
                                  f"different version of agent {record['agent']}.")
            if is_used:
                key, entry = stored[name]
                _, shape, dtype = parse_signature(entry)
                wanted[key] = (shape, dtype)
                impl = str(jax.random.key_impl(leaf)) if _is_key(leaf) else None
                leaves.append((len(leaves), key, _signature(path, leaf), impl))
        arrays = checkpointer.restore_arrays(step, wanted)
    finally:
        checkpointer.close()

    index = seeds.index(seed)
    policy = {
        "format": FORMAT_VERSION,
        "agent": record["agent"],
        "agent_config": phase_record,
        "example_batch": meta["example_batch"],
        "obs_norm": meta.get("obs_norm"),  # applied to raw observations before act (None: none)
        # observations end with the last executed action (zeros at an episode's start): PreviousActionObservation
        "previous_action": bool(getattr(agent_batch_spec(agent, agent_config), "previous_action", False)),
        "task": train.task,
        "seed": seed,
        "step": step,
        "run_dir": os.path.abspath(run_dir),
        "fluxrl_version": installed_version("fluxrl") or "unknown (not installed)",
        "arrays": [{"name": f"{i:06d}", "signature": sig, "key_impl": impl} for i, _, sig, impl in leaves],
    }
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    try:
        with open(os.path.join(tmp, POLICY_FILE), "w") as f:
            json.dump(policy, f, indent=2)
        with open(os.path.join(tmp, PARAMS_FILE), "wb") as f:
            np.savez(f, **{f"{i:06d}": np.asarray(arrays[key][index]) for i, key, _, _ in leaves})
        os.rename(tmp, out)  # atomic; fails rather than replace a directory created meanwhile
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out


class LoadedPolicy:
    """policy(observations, key=None, deterministic=True) -> actions in [-1, 1].

    observations: one observation (obs_shape) or a batch (batch, *obs_shape). Deterministic by default; pass a
    key (jax.random.key) with deterministic=False for stochastic actions. Actions are shaped as the agent's act
    returns them: (action_dim,) per observation, or for an action-chunking agent (QAM with chunk_size H > 1) a
    chunk (H, action_dim) per observation, to be executed in order (open loop) before asking again."""

    def __init__(self, agent, state, spec: dict, meta: dict):
        self.agent, self.state, self.meta = agent, state, meta
        self.observation_shape = tuple(spec["observations"][0])
        # A chunking agent (QAM) samples actions_chunk (H, action_dim) instead of actions (action_dim,).
        self.action_dim = int((spec.get("actions") or spec["actions_chunk"])[0][-1])
        self.config = state.config if hasattr(state, "config") else None
        # The agent conditions on the previous action: observations are concat(obs, last executed action), zeros
        # at an episode's start (wrap the env in fluxrl.envs.wrappers.PreviousActionObservation).
        self.previous_action = bool(meta.get("previous_action", False))
        # How the run's own evaluation acted (e.g. FQL samples its noise there); eval_policy's default.
        self.eval_deterministic = bool(getattr(agent, "EVAL_DETERMINISTIC", True))
        norm = meta.get("obs_norm")
        mean, std = (jnp.asarray(norm["mean"]), jnp.asarray(norm["std"])) if norm else (0.0, 1.0)
        self._act = jax.jit(lambda s, o, k, d: agent.act(s, (o - mean) / std, k, deterministic=d), static_argnums=3)

    def eval_policy(self, deterministic: bool | None = None):
        """This policy in fluxrl.envs.evaluate's protocol, acting as the training run's evaluation did (the same
        compiled act, the same per-episode keys: evaluate with the run's seed gives the run's numbers), with
        `deterministic` defaulting to the agent's EVAL_DETERMINISTIC."""
        from fluxrl.envs.evaluate import jax_policy
        from fluxrl.train.engine import make_eval_actors

        deterministic = self.eval_deterministic if deterministic is None else bool(deterministic)
        act, row_act = make_eval_actors(self.agent, deterministic, self.meta.get("obs_norm"))
        return jax_policy(functools.partial(act, self.state), functools.partial(row_act, self.state))

    def __call__(self, observations, key=None, deterministic: bool = True):
        if key is None:
            if not deterministic:
                raise ValueError("stochastic actions need a key: policy(obs, key=jax.random.key(i), "
                                 "deterministic=False)")
            key = jax.random.key(0)
        observations = jnp.asarray(observations)
        single = observations.shape == self.observation_shape
        if single:
            observations = observations[None]
        actions = self._act(self.state, observations, key, bool(deterministic))
        return actions[0] if single else actions


def load_policy(path: str) -> LoadedPolicy:
    """Load a policy written by `fluxrl export` (or export_policy).

    The policy maps one observation to one action (action_dim,), or a batch to (batch, action_dim); a chunked
    policy (QAM with chunk_size H > 1) returns chunks instead: (H, action_dim), or (batch, H, action_dim), whose
    rows are the next H actions to execute in order."""
    policy_path = os.path.join(path, POLICY_FILE)
    if not os.path.exists(policy_path):
        raise FluxrlError(f"{path} is not an exported policy (no {POLICY_FILE}).")
    with open(policy_path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT_VERSION:
        raise FluxrlError(f"{policy_path}: unsupported format {meta.get('format')!r} (expected {FORMAT_VERSION}).")
    agent = resolve_agent(meta["agent"])
    config = from_jsonable(agent.Config, meta["agent_config"], policy_path)
    state = jax.jit(agent.init, static_argnums=2)(jax.random.key(0), _example_batch(meta["example_batch"]), config)
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    by_signature = {_signature(p, leaf): i for i, (p, leaf) in enumerate(paths_leaves)}
    leaves = [leaf for _, leaf in paths_leaves]
    with np.load(os.path.join(path, PARAMS_FILE), allow_pickle=False) as params:
        for entry in meta["arrays"]:
            i = by_signature.get(entry["signature"])
            if i is None:
                raise FluxrlError(f"{policy_path}: array {entry['signature']} does not fit agent "
                                  f"{meta['agent']}'s state (exported by a different version?).")
            value = jnp.asarray(params[entry["name"]])
            leaves[i] = jax.random.wrap_key_data(value, impl=entry["key_impl"]) if entry["key_impl"] else value
    return LoadedPolicy(agent, jax.tree_util.tree_unflatten(treedef, leaves), meta["example_batch"], meta)
