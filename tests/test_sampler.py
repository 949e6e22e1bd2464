"""Device sampler: every field keeps to its episode; compact and regular forms agree; geometric offsets."""

import jax
import numpy as np
import pytest

from fluxrl.data import dataset as D
from fluxrl.data.sampler import Sampler, observation_stats
from fluxrl.errors import FluxrlError

LENGTHS = (5, 1, 8, 3)  # transitions per episode; a length-1 episode has no (s, a, s', a') pair


def make_raw(lengths=LENGTHS):
    """Raw OGBench layout where each state row is [episode, t] and each action row is [episode, t, 0]."""
    obs, act, term = [], [], []
    for e, n in enumerate(lengths):
        for t in range(n + 1):
            obs.append([e, t])
            act.append([e, t, 0.0])
            term.append(float(t == n))
    return {
        "observations": np.array(obs, np.float32),
        "actions": np.array(act, np.float32),
        "terminals": np.array(term, np.float32),
    }


def with_rewards(data):
    data = dict(data)
    data["rewards"] = data["observations"][:, 1].copy()  # reward = t
    data["masks"] = np.ones(len(data["observations"]), np.float32)
    return data


@pytest.fixture(params=["regular", "compact"])
def sampler(request):
    raw = make_raw()
    data = D.raw_to_regular(raw) if request.param == "regular" else D.raw_to_compact(raw)
    return Sampler.create(with_rewards(data))


def test_transitions_stay_inside_episodes(sampler):
    batch = jax.jit(lambda s, k: s.sample(k, 512), static_argnums=())(sampler, jax.random.key(0))
    obs, nxt, act = (np.asarray(batch[k]) for k in ("observations", "next_observations", "actions"))
    np.testing.assert_array_equal(nxt[:, 0], obs[:, 0])  # same episode
    np.testing.assert_array_equal(nxt[:, 1], obs[:, 1] + 1)  # next step
    np.testing.assert_array_equal(act[:, :2], obs)  # the action taken at s
    lengths = np.array(LENGTHS)[obs[:, 0].astype(int)]
    assert np.all(obs[:, 1] < lengths)  # the last state of an episode is never a transition start
    np.testing.assert_array_equal(np.asarray(batch["rewards"]), obs[:, 1])
    # Every transition gets drawn (uniform over all rows).
    assert len({tuple(o) for o in obs}) == sum(LENGTHS)


def test_next_actions_never_cross_episode_end(sampler):
    batch = sampler.sample(jax.random.key(1), 1024, fields=("observations", "next_actions", "next_observations"))
    obs, a2, s2 = (np.asarray(batch[k]) for k in ("observations", "next_actions", "next_observations"))
    np.testing.assert_array_equal(a2[:, :2], s2)  # a' is the action taken at s'
    np.testing.assert_array_equal(a2[:, 1], obs[:, 1] + 1)
    assert not np.any(obs[:, 0] == 1)  # the single-transition episode has no pair
    lengths = np.array(LENGTHS)[obs[:, 0].astype(int)]
    assert np.all(obs[:, 1] < lengths - 1)


def test_next_actions_skip_an_unflagged_final_row():
    """A regular-form file whose last row is not flagged terminal still ends there: that row has no a'."""
    data = with_rewards(D.raw_to_regular(make_raw()))
    data["terminals"][-1] = 0.0
    sampler = Sampler.create(data)
    batch = sampler.sample(jax.random.key(2), 4096, fields=("observations", "next_actions"))
    obs = np.asarray(batch["observations"])
    lengths = np.array(LENGTHS)[obs[:, 0].astype(int)]
    assert np.all(obs[:, 1] < lengths - 1)
    assert int(sampler.arrays["pair_rows"][-1]) < len(data["observations"]) - 1


def test_future_states_follow_truncated_geometric(sampler):
    gamma = 0.7
    batch = sampler.sample(jax.random.key(2), 20000, fields=("observations", "future_observations"), future_discount=gamma)
    obs, fut = np.asarray(batch["observations"]), np.asarray(batch["future_observations"])
    np.testing.assert_array_equal(fut[:, 0], obs[:, 0])
    k = fut[:, 1] - obs[:, 1]
    assert k.min() >= 1
    lengths = np.array(LENGTHS)[obs[:, 0].astype(int)]
    assert np.all(fut[:, 1] <= lengths)  # at most the episode's final state
    # Rows with far-away ends: P(k = j) = (1 - gamma) gamma^(j - 1) for j < distance to end.
    far = (lengths - obs[:, 1]) >= 6
    for j in (1, 2, 3):
        expected = (1 - gamma) * gamma ** (j - 1)
        assert abs(np.mean(k[far] == j) - expected) < 0.03, (j, np.mean(k[far] == j), expected)


def test_chunks_clamp_and_mask(sampler):
    batch = sampler.sample(
        jax.random.key(3), 512, fields=("observations", "actions_chunk", "valid_chunk", "next_observations_chunk"),
        chunk_size=4,
    )
    obs, chunk, valid, nchunk = (
        np.asarray(batch[k]) for k in ("observations", "actions_chunk", "valid_chunk", "next_observations_chunk")
    )
    lengths = np.array(LENGTHS)[obs[:, 0].astype(int)]
    for b in range(len(obs)):
        t, n = int(obs[b, 1]), int(lengths[b])
        steps = np.arange(4) + t
        np.testing.assert_array_equal(valid[b], (steps < n).astype(np.float32))
        np.testing.assert_array_equal(chunk[b, :, 1], np.minimum(steps, n - 1))
        np.testing.assert_array_equal(chunk[b, :, 0], obs[b, 0])
        np.testing.assert_array_equal(nchunk[b, :, 1], np.minimum(steps, n - 1) + 1)


def test_frame_stack_repeats_first_frame():
    for form in (D.raw_to_regular, D.raw_to_compact):
        s = Sampler.create(form(make_raw()), frame_stack=3)
        batch = s.sample(jax.random.key(4), 256, fields=("observations", "next_observations"))
        obs = np.asarray(batch["observations"]).reshape(-1, 3, 2)
        nxt = np.asarray(batch["next_observations"]).reshape(-1, 3, 2)
        t = obs[:, -1, 1]
        np.testing.assert_array_equal(obs[:, :, 1], np.maximum(t[:, None] + np.array([-2, -1, 0]), 0))
        np.testing.assert_array_equal(nxt[:, :, 1], np.maximum(t[:, None] + np.array([-1, 0, 1]), 0))
        assert np.all(obs[:, :, 0] == obs[:, -1:, 0])


def test_regular_and_compact_draw_the_same_batches():
    raw = with_rewards(make_raw())
    reg = Sampler.create(D.raw_to_regular(raw))
    com = Sampler.create(D.raw_to_compact(raw))
    fields = ("observations", "actions", "rewards", "next_observations")
    for f, key in ((fields, 5), (fields + ("next_actions",), 6)):
        a, b = reg.sample(jax.random.key(key), 64, f), com.sample(jax.random.key(key), 64, f)
        for k in f:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))


def test_same_key_same_batch_and_scan_matches_loop(sampler):
    f = jax.jit(lambda s, k: s.sample(k, 32))
    a, b = f(sampler, jax.random.key(7)), f(sampler, jax.random.key(7))
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    keys = jax.random.split(jax.random.key(8), 3)
    scanned = jax.lax.scan(lambda c, k: (c, sampler.sample(k, 8)["observations"]), 0, keys)[1]
    for i in range(3):
        np.testing.assert_array_equal(np.asarray(scanned[i]), np.asarray(sampler.sample(keys[i], 8)["observations"]))


def test_check_reports_missing_fields():
    s = Sampler.create(D.raw_to_regular(make_raw()))
    with pytest.raises(FluxrlError, match="rewards"):
        s.check(["observations", "rewards"])
    with pytest.raises(FluxrlError, match="Unknown batch field"):
        s.check(["nonsense"])
    single = Sampler.create(D.raw_to_regular(make_raw((1, 1))))
    with pytest.raises(FluxrlError, match="pairs"):
        single.check(["next_actions"])


def test_observation_stats_ignore_invalid_rows():
    raw = make_raw()
    reg, com = D.raw_to_regular(raw), D.raw_to_compact(raw)
    for k in ("mean", "std", "min", "max"):
        np.testing.assert_allclose(observation_stats(reg)[k], observation_stats(com)[k])
    np.testing.assert_allclose(observation_stats(reg)["mean"], reg["observations"].mean(0), rtol=1e-6)
