"""Canonical-form conversions keep exact per-state info (physics) across the raw <-> regular round trip."""

import numpy as np

from fluxrl.data import dataset as D


def test_physics_of_final_states_survive_round_trip():
    rng = np.random.default_rng(0)
    terminals = np.array([0, 0, 1, 0, 0, 0, 1], np.float32)  # episodes of 2 and 3 transitions
    raw = {
        "observations": rng.standard_normal((7, 3)).astype(np.float32),
        "actions": rng.standard_normal((7, 2)).astype(np.float32),
        "physics": rng.standard_normal((7, 4)),
        "terminals": terminals,
    }
    raw["actions"][terminals > 0] = 0.0  # the final state's action is meaningless; the writer stores zeros
    regular = D.raw_to_regular(raw)
    np.testing.assert_array_equal(regular["next_physics"], raw["physics"][[1, 2, 4, 5, 6]])
    back = D.regular_to_raw(regular)
    for key in ("observations", "actions", "physics", "terminals"):
        np.testing.assert_array_equal(back[key], raw[key])
    assert "next_physics" not in back
    np.testing.assert_array_equal(D.compact_to_regular(D.raw_to_compact(raw))["next_physics"], regular["next_physics"])
