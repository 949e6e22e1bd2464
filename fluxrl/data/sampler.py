"""On-device batch sampling: indices drawn with jax.random from device-resident arrays.

The sampler is a pytree (arrays are leaves, options are static), so a jitted/scanned training step takes it as
an argument and samples without any host round trip. Sampling is a pure function of the key: the sampler has
no state of its own, and a checkpointed RNG key reproduces the data stream exactly.

Fields a batch can hold (request them by name):
  observations, actions, rewards, masks, terminals, next_observations   one transition i
  next_actions          a'_i = actions[i + 1]; i is then drawn only from rows whose episode continues
                        (terminals[i] == 0 and i is not the final row), so (s, a, s', a') never crosses an
                        episode end
  future_observations   s_f = next_observations[j], j = min(i + k - 1, last row of i's episode),
                        k ~ Geometric(1 - future_discount) >= 1: a sample of the discounted state occupancy
                        of (s_i, a_i) (k = 1 is s'_i)
  actions_chunk, rewards_chunk, masks_chunk, valid_chunk,
  next_observations_chunk  h consecutive steps starting at i (chunk_size = h), indices clamped to the episode's
                        last row; valid_chunk[t] = 0 for steps past the episode end (ACT/QAM-style chunking)
With frame_stack = F > 1, observations/next_observations are (..., F * obs_dim) stacks of the last F frames,
repeating the episode's first frame at its start.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fluxrl.data.dataset import episode_bounds, is_compact
from fluxrl.errors import FluxrlError

TRANSITION_FIELDS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")
CHUNK_FIELDS = ("actions_chunk", "rewards_chunk", "masks_chunk", "valid_chunk", "next_observations_chunk")
KNOWN_FIELDS = TRANSITION_FIELDS + ("next_actions", "future_observations") + CHUNK_FIELDS


class Sampler(flax.struct.PyTreeNode):
    arrays: dict  # device arrays: dataset fields + episode bounds + index sets
    compact: bool = flax.struct.field(pytree_node=False)
    frame_stack: int = flax.struct.field(pytree_node=False, default=1)

    @classmethod
    def create(cls, data: Mapping[str, np.ndarray], frame_stack: int = 1, device=None) -> "Sampler":
        """Move `data` (canonical form) to the device and precompute episode bounds and valid-row index sets."""
        compact = is_compact(data)
        n = len(data["observations"])
        terminals = np.asarray(data["terminals"], np.float32)
        valid = np.asarray(data["valids"]) > 0.5 if compact else np.ones(n, bool)
        first, last = _compact_bounds(valid, terminals) if compact else episode_bounds(terminals)
        arrays = {
            k: np.asarray(v)
            for k, v in data.items()
            if k in ("observations", "actions", "rewards", "masks", "terminals", "next_observations")
        }
        arrays["first"] = first
        arrays["last"] = last
        arrays["valid_rows"] = np.flatnonzero(valid).astype(np.int32)
        # A row pairs with the next one unless it ends its episode; the final row always does, flagged or not.
        arrays["pair_rows"] = np.flatnonzero(valid & (np.arange(n) < last)).astype(np.int32)
        put = (lambda x: jax.device_put(x, device)) if device is not None else jnp.asarray
        return cls(arrays={k: put(v) for k, v in arrays.items()}, compact=compact, frame_stack=frame_stack)

    @property
    def size(self) -> int:
        return int(self.arrays["valid_rows"].shape[0])

    def check(self, fields: Iterable[str]) -> None:
        """Raise a clear error (outside jit) if the dataset cannot provide `fields`."""
        for f in fields:
            if f not in KNOWN_FIELDS:
                raise FluxrlError(f"Unknown batch field '{f}'; known: {', '.join(KNOWN_FIELDS)}.")
            base = {"rewards_chunk": "rewards", "masks_chunk": "masks"}.get(f, f)
            if base in ("rewards", "masks") and base not in self.arrays:
                raise FluxrlError(f"The dataset has no '{base}'; relabel it for a task first (fluxrl data relabel).")
        if "next_actions" in fields and int(self.arrays["pair_rows"].shape[0]) == 0:
            raise FluxrlError("The dataset has no (s, a, s', a') pairs: every episode is a single transition.")

    # --- row-level gathers -------------------------------------------------------------------------------------
    def _obs(self, rows):
        """Observation at rows (with frame stacking)."""
        obs = self.arrays["observations"]
        if self.frame_stack == 1:
            return obs[rows]
        offsets = jnp.arange(-self.frame_stack + 1, 1)
        idx = jnp.maximum(rows[..., None] + offsets, self.arrays["first"][rows][..., None])
        frames = obs[idx]  # (..., F, obs_dim)
        return frames.reshape(frames.shape[:-2] + (-1,))

    def _next_obs(self, rows):
        """s' of transition rows (with frame stacking: the stack ending at s')."""
        if self.compact:
            if self.frame_stack == 1:
                return self.arrays["observations"][rows + 1]
            offsets = jnp.arange(-self.frame_stack + 2, 2)
            idx = jnp.maximum(rows[..., None] + offsets, self.arrays["first"][rows][..., None])
            frames = self.arrays["observations"][idx]
            return frames.reshape(frames.shape[:-2] + (-1,))
        nxt = self.arrays["next_observations"]
        if self.frame_stack == 1:
            return nxt[rows]
        # Stack = frames of rows-F+2..rows from observations, then next_observations[rows].
        prev = self._obs(rows)[..., self.arrays["observations"].shape[-1] :]
        return jnp.concatenate([prev, nxt[rows]], axis=-1)

    def _gather(self, field: str, rows):
        if field == "observations":
            return self._obs(rows)
        if field == "next_observations":
            return self._next_obs(rows)
        return self.arrays[field][rows]

    # --- sampling ----------------------------------------------------------------------------------------------
    def sample(
        self,
        key: jax.Array,
        batch_size: int,
        fields: Iterable[str] = ("observations", "actions", "rewards", "masks", "next_observations"),
        future_discount: float = 0.99,
        chunk_size: int = 1,
    ) -> dict[str, jax.Array]:
        """Draw a batch of `batch_size` (uniform over eligible rows, with replacement). Pure and jittable."""
        fields = tuple(fields)
        key_rows, key_future = jax.random.split(key)
        rows_pool = self.arrays["pair_rows"] if "next_actions" in fields else self.arrays["valid_rows"]
        rows = rows_pool[jax.random.randint(key_rows, (batch_size,), 0, rows_pool.shape[0])]
        batch = {}
        for f in fields:
            if f in TRANSITION_FIELDS:
                batch[f] = self._gather(f, rows)
            elif f == "next_actions":
                batch[f] = self.arrays["actions"][rows + 1]
            elif f == "future_observations":
                # Geometric(p) on {1, 2, ...} by inversion: k = ceil(log U / log(1 - p)), p = 1 - discount.
                u = jax.random.uniform(key_future, (batch_size,), minval=1e-12, maxval=1.0)
                k = jnp.ceil(jnp.log(u) / jnp.log(future_discount)).astype(jnp.int32)
                k = jnp.maximum(k, 1)
                future_rows = jnp.minimum(rows + k - 1, self.arrays["last"][rows])
                batch[f] = self._next_obs(future_rows)
        if any(f in CHUNK_FIELDS for f in fields):
            steps = rows[:, None] + jnp.arange(chunk_size)
            last = self.arrays["last"][rows][:, None]
            clamped = jnp.minimum(steps, last)
            for f in fields:
                if f == "valid_chunk":
                    batch[f] = (steps <= last).astype(jnp.float32)
                elif f == "next_observations_chunk":
                    batch[f] = self._next_obs(clamped)
                elif f in CHUNK_FIELDS:
                    batch[f] = self.arrays[f[: -len("_chunk")]][clamped]
        return batch


def _compact_bounds(valid: np.ndarray, terminals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Episode bounds of the compact form: a run of valid rows ends at its valid row with terminals = 1; each
    invalid last-state row closes a one-row "episode" of its own that is never sampled."""
    return episode_bounds((terminals > 0.5) | ~valid)


def observation_stats(data: Mapping[str, np.ndarray], eps: float = 1e-6) -> dict[str, np.ndarray]:
    """Mean and std of the observations (float64 accumulation), for normalisation: (obs - mean) / std."""
    obs = np.asarray(data["observations"])
    if "valids" in data:
        obs = obs[np.asarray(data["valids"]) > 0.5]
    mean = obs.mean(axis=0, dtype=np.float64)
    std = obs.std(axis=0, dtype=np.float64)
    return {
        "mean": mean.astype(np.float32),
        "std": np.maximum(std, eps).astype(np.float32),
        "min": obs.min(axis=0).astype(np.float32),
        "max": obs.max(axis=0).astype(np.float32),
    }


def normalize_observations(data: Mapping[str, np.ndarray], stats: Mapping[str, np.ndarray]) -> dict:
    """A copy of `data` with observations (and next_observations) z-scored: (x - mean) / std, float32."""
    if np.asarray(data["observations"]).dtype == np.uint8:
        raise FluxrlError("Observation normalisation is for state observations; pixel (uint8) datasets need "
                          "--agent.obs_norm none.")
    out = dict(data)
    for key in ("observations", "next_observations"):
        if key in out:
            out[key] = ((np.asarray(out[key], np.float32) - stats["mean"]) / stats["std"]).astype(np.float32)
    return out


def with_previous_actions(data: Mapping[str, np.ndarray]) -> dict:
    """A copy of `data` whose observations carry the action executed before them: observations[i] becomes
    concat(s_i, a_{i-1}) with a_{i-1} = 0 at an episode's first step, and next_observations[i] becomes
    concat(s'_i, a_i); the layout fluxrl.envs.wrappers.PreviousActionObservation gives the env's observations.
    In the compact form the last-state row of an episode gets the episode's last action."""
    if np.asarray(data["observations"]).ndim != 2:
        raise FluxrlError("Conditioning on the previous action needs flat (state) observations, got observations "
                          f"of shape {np.asarray(data['observations']).shape[1:]}.")
    actions = np.asarray(data["actions"], np.float32)
    terminals = np.asarray(data["terminals"]) > 0.5
    continues = ~terminals[:-1]  # row i - 1 leads into row i
    if is_compact(data):
        valid = np.asarray(data["valids"]) > 0.5
        # A valid row leads into the next one within its episode, and into its episode's last-state row.
        continues = valid[:-1] & (continues | ~valid[1:])
    previous = np.zeros_like(actions)
    previous[1:] = np.where(continues[:, None], actions[:-1], 0.0)
    out = dict(data)
    out["observations"] = np.concatenate([np.asarray(data["observations"], np.float32), previous], axis=-1)
    if "next_observations" in data:
        out["next_observations"] = np.concatenate([np.asarray(data["next_observations"], np.float32), actions],
                                                  axis=-1)
    return out
