"""On-device online replay buffer, one per seed, and the online batch mix with the offline data.

All seeds step their environments in lockstep, so the fill level and write position are shared scalars and each
field is stored as (seeds, capacity, ...). The offline data is never copied into the buffer: it stays in the
dataset Sampler (shared by all seeds), and `mixed_sample` draws from both:

- uniform (FQL's default, `ReplayBuffer.create_from_initial_dataset`): each batch row comes from the offline data
  with probability D / (D + n) and from the n online transitions otherwise, i.e. uniform over their union;
- balanced (FQL's --balanced_sampling): batch_size // 2 rows from the offline data, the rest from the buffer;
- from scratch (no offline data): every row from the buffer.
Batches can hold the stored fields plus next_actions (a' = the next stored action; a' = a at an episode end,
where FQL's ReplayBuffer takes the next row even across episodes), and the sampler's *_chunk fields for
action-chunking agents: H consecutive stored steps from a row whose H steps are all stored (the official
sample_sequence draws among the first size - H + 1 rows too), clamped to the episode's last row with valid = 0
past it, exactly as fluxrl.data.sampler forms them from a dataset.
Deviation from FQL: FQL's buffer holds the offline data too and, once full, overwrites it first-in first-out; here
the offline data is never evicted and only online transitions wrap around (FQL's defaults never wrap).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from fluxrl.data.sampler import CHUNK_FIELDS
from fluxrl.errors import FluxrlError

BUFFER_FIELDS = ("observations", "actions", "rewards", "masks", "terminals", "next_observations")


class ReplayBuffer(flax.struct.PyTreeNode):
    data: dict  # field -> (seeds, capacity, ...)
    size: jax.Array  # int32 scalar: rows filled
    pointer: jax.Array  # int32 scalar: next row written

    @classmethod
    def create(cls, num_seeds: int, capacity: int, obs_shape, obs_dtype, action_dim: int) -> "ReplayBuffer":
        shapes = {
            "observations": (tuple(obs_shape), obs_dtype),
            "next_observations": (tuple(obs_shape), obs_dtype),
            "actions": ((action_dim,), jnp.float32),
            "rewards": ((), jnp.float32),
            "masks": ((), jnp.float32),
            "terminals": ((), jnp.float32),
        }
        data = {k: jnp.zeros((num_seeds, capacity) + s, d) for k, (s, d) in shapes.items()}
        return cls(data=data, size=jnp.zeros((), jnp.int32), pointer=jnp.zeros((), jnp.int32))

    @property
    def capacity(self) -> int:
        return int(self.data["actions"].shape[1])

    def add(self, transition: dict) -> "ReplayBuffer":
        """Append one transition per seed (each field shaped (seeds, ...)); overwrites the oldest when full."""
        data = {k: v.at[:, self.pointer].set(transition[k].astype(v.dtype)) for k, v in self.data.items()}
        capacity = self.data["actions"].shape[1]
        return self.replace(
            data=data, size=jnp.minimum(self.size + 1, capacity), pointer=(self.pointer + 1) % capacity
        )

    def sample_seed(self, data_one_seed: dict, key: jax.Array, batch_size: int, fields, chunk_size: int = 1) -> dict:
        """Uniform batch from one seed's slice (call under vmap over seeds with `data` mapped).

        next_actions (a' of (s, a, s', a')) is the action stored after the row; at an episode end and for the
        newest row, whose a' does not exist (yet), a' = a. Chunk fields: see the module docstring."""
        if any(f in CHUNK_FIELDS for f in fields):
            return self._sample_chunks(data_one_seed, key, batch_size, fields, chunk_size)
        rows = jax.random.randint(key, (batch_size,), 0, jnp.maximum(self.size, 1))
        batch = {f: data_one_seed[f][rows] for f in fields if f != "next_actions"}
        if "next_actions" in fields:
            capacity = data_one_seed["actions"].shape[0]
            no_successor = (data_one_seed["terminals"][rows] > 0.5) | (rows == (self.pointer - 1) % capacity)
            successor = data_one_seed["actions"][(rows + 1) % capacity]
            batch["next_actions"] = jnp.where(no_successor[:, None], data_one_seed["actions"][rows], successor)
        return batch

    def _sample_chunks(self, data_one_seed: dict, key: jax.Array, batch_size: int, fields, chunk_size: int) -> dict:
        capacity = data_one_seed["actions"].shape[0]
        oldest = (self.pointer - self.size) % capacity
        # Rows in insertion order: offset o is stored at (oldest + o) % capacity; a chunk from o reads o .. o+H-1.
        offsets = jax.random.randint(key, (batch_size,), 0, jnp.maximum(self.size - chunk_size + 1, 1))
        steps = (oldest + offsets[:, None] + jnp.arange(chunk_size)) % capacity  # (batch, H)
        ended = data_one_seed["terminals"][steps] > 0.5
        ended_before = jnp.cumsum(ended, axis=1) - ended  # episode ends among the chunk's earlier steps
        stored = offsets[:, None] + jnp.arange(chunk_size) < self.size  # false only while size < H
        valid = (ended_before == 0) & stored
        last_valid = jnp.sum(valid, axis=1, keepdims=True) - 1
        clamped = (steps[:, :1] + jnp.minimum(jnp.arange(chunk_size), last_valid)) % capacity
        batch = {}
        for f in fields:
            if f == "valid_chunk":
                batch[f] = valid.astype(jnp.float32)
            elif f in CHUNK_FIELDS:
                batch[f] = data_one_seed[f[: -len("_chunk")]][clamped]
            elif f == "next_actions":
                raise ValueError("next_actions and chunk fields cannot be sampled together")
            else:
                batch[f] = data_one_seed[f][steps[:, 0]]
        return batch

    def last_rows(self, count: int) -> np.ndarray:
        """Row indices (host) of the `count` most recent transitions, oldest first."""
        pointer, capacity = int(self.pointer), self.capacity
        return (pointer - count + np.arange(count)) % capacity


def check_online_fields(fields) -> None:
    missing = [f for f in fields if f not in BUFFER_FIELDS + ("next_actions",) + CHUNK_FIELDS]
    if missing:
        raise FluxrlError(
            f"This agent's batches need {', '.join(missing)}, which the online replay buffer does not provide "
            f"(it stores {', '.join(BUFFER_FIELDS)}); train it offline only (--online_steps 0)."
        )


def mixed_sample(sampler, buffer: ReplayBuffer, keys: jax.Array, batch_size: int, fields, balanced: bool,
                 sample_options: tuple = ()) -> dict:
    """One batch per seed (keys: (seeds,)) from the offline sampler (or None) and the online buffer.
    sample_options: (name, value) pairs for Sampler.sample."""
    fields, sample_options = tuple(fields), dict(sample_options)
    chunk_size = sample_options.get("chunk_size", 1)

    def one_seed(data, key):
        k_data, k_buffer, k_choice = jax.random.split(key, 3)
        if sampler is None:
            return buffer.sample_seed(data, k_buffer, batch_size, fields, chunk_size)
        if balanced:
            half = batch_size // 2
            offline = sampler.sample(k_data, half, fields, **sample_options)
            online = buffer.sample_seed(data, k_buffer, batch_size - half, fields, chunk_size)
            return {f: jnp.concatenate([offline[f], online[f].astype(offline[f].dtype)]) for f in fields}
        offline = sampler.sample(k_data, batch_size, fields, **sample_options)
        online = buffer.sample_seed(data, k_buffer, batch_size, fields, chunk_size)
        dataset_size = sampler.arrays["valid_rows"].shape[0]
        from_offline = jax.random.uniform(k_choice, (batch_size,)) * (dataset_size + buffer.size) < dataset_size
        out = {}
        for f in fields:
            cond = from_offline.reshape((batch_size,) + (1,) * (offline[f].ndim - 1))
            out[f] = jnp.where(cond, offline[f], online[f].astype(offline[f].dtype))
        return out

    return jax.vmap(one_seed)(buffer.data, keys)
