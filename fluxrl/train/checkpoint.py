"""Full-state checkpoints with orbax: one directory per step under RUN_DIR/checkpoints, written atomically.

A checkpoint holds two items:
- `state`: every array of the training carry (agent params, optimizer state, target params, step, the per-seed
  RNG keys that drive sampling and updates, the metric accumulator, the online replay buffer, the pending action),
  flattened to a dict {index: array} so orbax never sees custom pytree nodes; typed PRNG keys are stored as their
  key data and re-wrapped from the template on restore;
- `meta`: JSON with the host-side position (step, logger file offsets, environment episode counters, last
  evaluation) and the leaf signature (path, dtype, shape) used to check the checkpoint matches the template.
orbax writes into a temporary directory and renames it when complete, so a process killed while saving leaves
the previous checkpoint intact (leftover temporary directories are cleaned up on the next start).
"""

from __future__ import annotations

import glob
import os
import shutil

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from fluxrl.errors import FluxrlError


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def leaf_signature(path, value) -> str:
    """'<leaf path> <dtype>[d0,d1,...]' of a stored array (PRNG keys as their key data)."""
    return f"{jax.tree_util.keystr(path)} {value.dtype}[{','.join(map(str, value.shape))}]"


def parse_signature(signature: str) -> tuple[str, tuple[int, ...], str]:
    """(leaf path, shape, dtype) of a leaf_signature string."""
    path, spec = signature.rsplit(" ", 1)
    dtype, shape = spec[:-1].split("[")
    return path, tuple(int(d) for d in shape.split(",") if d), dtype


def flatten_for_storage(tree) -> tuple[dict, list[str]]:
    """Pytree -> ({'000000': array, ...}, ['<leaf path> <dtype><shape>', ...]) with PRNG keys as raw key data."""
    leaves_with_paths = jax.tree_util.tree_leaves_with_path(tree)
    flat, signature = {}, []
    for i, (path, leaf) in enumerate(leaves_with_paths):
        value = jax.random.key_data(leaf) if _is_key(leaf) else jnp.asarray(leaf)
        flat[f"{i:06d}"] = value
        signature.append(leaf_signature(path, value))
    return flat, signature


def unflatten_from_storage(template, flat: dict):
    """Inverse of flatten_for_storage, taking structure, key types and shardings from `template`."""
    leaves, treedef = jax.tree_util.tree_flatten(template)
    restored = []
    for i, leaf in enumerate(leaves):
        value = flat[f"{i:06d}"]
        restored.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(leaf)) if _is_key(leaf) else value)
    return jax.tree_util.tree_unflatten(treedef, restored)


def all_finite(tree) -> bool:
    """True if every floating-point leaf is finite (one host sync)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    return bool(jnp.all(jnp.stack(checks))) if checks else True


class Checkpointer:
    """Save/restore the training carry and host metadata under `directory`, keeping the last `keep` steps."""

    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        # A save killed midway leaves orbax's temporary directory; remove it now, synchronously (orbax's own
        # cleanup_tmp_directories may still be running in the background when the manager is first used). A run
        # directory belongs to one run, so no other process can be writing here.
        for leftover in glob.glob(os.path.join(self.directory, "*.orbax-checkpoint-tmp*")):
            shutil.rmtree(leftover, ignore_errors=True)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=False, cleanup_tmp_directories=True, create=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, tree, meta: dict) -> None:
        flat, signature = flatten_for_storage(tree)
        meta = dict(meta, leaf_signature=signature)
        self._manager.save(
            step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(flat), meta=ocp.args.JsonSave(meta)), force=True
        )
        self._manager.wait_until_finished()

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FluxrlError(f"{self.directory} holds no checkpoint.")
        if step not in self.all_steps():
            raise FluxrlError(f"{self.directory} holds no checkpoint of step {step} (it has {self.all_steps()}).")
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, template, step: int | None = None):
        """(tree shaped like `template`, meta) of checkpoint `step` (default: the latest)."""
        step = self.latest_step() if step is None else step
        flat_template, signature = flatten_for_storage(template)
        meta = self.read_meta(step)
        if meta.get("leaf_signature") != signature:
            raise FluxrlError(
                f"Checkpoint {self.directory}/{step} does not match this agent and configuration "
                f"(its arrays differ); use a new --run_dir."
            )
        restored = self.restore_arrays(step, {k: (v.shape, v.dtype) for k, v in flat_template.items()})
        return unflatten_from_storage(template, restored), meta

    def read_arrays(self, step: int | None = None) -> tuple[dict, dict]:
        """(every stored array by storage key, meta) of checkpoint `step` (default: the latest), no template."""
        meta = self.read_meta(step)
        wanted = {}
        for i, entry in enumerate(meta["leaf_signature"]):
            _, shape, dtype = parse_signature(entry)
            wanted[f"{i:06d}"] = (shape, dtype)
        return self.restore_arrays(meta["step"], wanted), meta

    def restore_arrays(self, step: int, wanted: dict) -> dict:
        """Some stored arrays of checkpoint `step`: wanted = {storage key: (shape, dtype)}."""
        item = {k: jax.ShapeDtypeStruct(tuple(shape), dtype) for k, (shape, dtype) in wanted.items()}
        args = ocp.args.PyTreeRestore(item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                      partial_restore=True)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        except (ValueError, FileNotFoundError) as e:
            raise FluxrlError(f"Checkpoint {self.directory}/{step} cannot be read: {e}") from None
        return {k: jnp.asarray(v) for k, v in restored.items()}

    def close(self) -> None:
        self._manager.close()
