"""Bad dataset files: each fails with ONE FluxrlError sentence naming the file and the field; nothing is unpickled;
a refused write leaves the existing file untouched."""

import os
import pickle

import h5py
import numpy as np
import pytest

from fluxrl.data import io
from fluxrl.data.info import dataset_info
from fluxrl.errors import FluxrlError


def make_raw(lengths=(3, 2)):
    obs, term = [], []
    for e, T in enumerate(lengths):
        for k in range(T + 1):
            obs.append([10.0 * e + k, 1.0])
            term.append(float(k == T))
    n = len(obs)
    return {"observations": np.array(obs, np.float32), "actions": np.ones((n, 2), np.float32),
            "terminals": np.array(term, np.float32)}


def load_error(path, *words, **kw) -> str:
    """Load `path`, expect a FluxrlError that names the file and every word; return its message."""
    with pytest.raises(FluxrlError) as info:
        io.load_dataset(path, **kw)
    message = str(info.value)
    assert str(path) in message, message
    for w in words:
        assert w in message, (w, message)
    assert "\n" not in message
    return message


def npz(tmp_path, name="d.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


# ------------------------------------------------------------------------------------------------ files


def test_missing_file(tmp_path):
    load_error(tmp_path / "nope.npz", "does not exist")
    with pytest.raises(FluxrlError, match="does not exist"):
        dataset_info(tmp_path / "nope.hdf5")
    with pytest.raises(FluxrlError, match="does not exist"):
        io.load_dataset(tmp_path / "nope.npz", format="ogbench")


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_npz(tmp_path, keep):
    good = npz(tmp_path, "good.npz", **make_raw((50, 50)))
    blob = good.read_bytes()
    bad = tmp_path / "bad.npz"
    bad.write_bytes(blob[: int(len(blob) * keep)])
    load_error(bad, "npz", "truncated or corrupted")


def test_corrupted_member_of_npz(tmp_path):
    path = tmp_path / "d.npz"
    np.savez_compressed(path, **make_raw((200,)))
    blob = bytearray(path.read_bytes())
    middle = len(blob) // 3
    blob[middle:middle + 64] = b"\x00" * 64  # damage compressed data, keep the zip directory intact
    path.write_bytes(bytes(blob))
    load_error(path, "cannot be read")


def test_not_an_npz(tmp_path):
    text = tmp_path / "d.npz"
    text.write_text("observations,actions\n1,2\n")
    load_error(text, "not a valid npz file")
    empty = tmp_path / "e.npz"
    empty.write_bytes(b"")
    load_error(empty, "is empty")
    single = tmp_path / "a.npy"
    np.save(single, np.zeros((3, 2)))
    load_error(single, "single .npy array")
    other = tmp_path / "d.csv"
    other.write_text("1,2\n")
    load_error(other, "not a dataset fluxrl can read")


def test_pickle_file_is_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Bomb:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "d.npz"
    path.write_bytes(pickle.dumps(Bomb()))
    load_error(path, "not a valid npz file")
    assert not marker.exists()


def test_object_array_inside_npz_is_not_unpickled(tmp_path):
    raw = make_raw()
    path = tmp_path / "d.npz"
    np.savez(path, **raw, actions_obj=np.array([{"a": 1}, None], dtype=object))
    load_error(path, "'actions_obj'", "pickled")


def test_truncated_and_fake_hdf5(tmp_path):
    good = tmp_path / "good.hdf5"
    with h5py.File(good, "w") as f:
        for k, v in make_raw((300,)).items():
            f.create_dataset(k, data=v)
        f.create_dataset("masks", data=np.ones(301, np.float32))
    bad = tmp_path / "bad.hdf5"
    bad.write_bytes(good.read_bytes()[:2000])
    load_error(bad, "HDF5")
    fake = tmp_path / "fake.hdf5"
    fake.write_text("not hdf5")
    load_error(fake, "not a valid HDF5 file")
    load_error(npz(tmp_path, **make_raw()), "npz file, not HDF5", format="d4rl")
    load_error(good, "HDF5 file, not an npz", format="ogbench")


def test_directories(tmp_path):
    empty = tmp_path / "empty"
    os.makedirs(empty)
    load_error(empty, "neither a Minari dataset", "nor ExORL")
    load_error(empty, "no ExORL episode files", format="exorl")
    load_error(empty, "not a Minari dataset directory", format="minari")
    load_error(empty, "is a directory", format="flat")


def test_unknown_format_name(tmp_path):
    path = npz(tmp_path, **make_raw())
    load_error(path, "Unknown dataset format 'parquet'", format="parquet")


# ------------------------------------------------------------------------------------------------ fields


def test_missing_required_key(tmp_path):
    raw = make_raw()
    del raw["actions"]
    load_error(npz(tmp_path, **raw), "required field 'actions' is missing")


def test_unequal_lengths(tmp_path):
    raw = make_raw()
    raw["qpos"] = np.zeros((len(raw["observations"]) - 1, 3))
    load_error(npz(tmp_path, **raw), "field 'qpos' has 6 rows but 'observations' has 7")
    scalar = make_raw()
    scalar["goal"] = np.float32(3.0)
    load_error(npz(tmp_path, "s.npz", **scalar), "field 'goal' is a single value", "_meta_goal")


@pytest.mark.parametrize("field,row,value", [("observations", 4, np.nan), ("actions", 2, np.inf),
                                              ("actions", 0, -np.inf)])
def test_nan_and_inf(tmp_path, field, row, value):
    raw = make_raw()
    raw[field][row, 1] = value
    load_error(npz(tmp_path, **raw), f"field '{field}' contains NaN or inf (first at row {row})")


def test_string_and_wrong_dtypes(tmp_path):
    raw = make_raw()
    raw["actions"] = np.array([["a", "b"]] * len(raw["observations"]))
    load_error(npz(tmp_path, **raw), "field 'actions' has dtype <U1")
    raw = make_raw()
    raw["terminals"] = raw["terminals"] * 2
    load_error(npz(tmp_path, "t.npz", **raw), "field 'terminals' must contain only 0 and 1")


def test_observations_without_feature_axis(tmp_path):
    raw = make_raw()
    raw["observations"] = raw["observations"][:, 0]
    load_error(npz(tmp_path, **raw), "field 'observations' has shape (7,)")


def test_raw_file_cut_mid_episode(tmp_path):
    raw = {k: v[:-1] for k, v in make_raw().items()}
    load_error(npz(tmp_path, **raw), "field 'terminals' is 0 on the last row", "truncated")


def test_regular_and_compact_at_once(tmp_path):
    raw = make_raw()
    raw["next_observations"] = raw["observations"]
    raw["valids"] = 1 - raw["terminals"]
    load_error(npz(tmp_path, **raw), "both 'next_observations' and 'valids'")


def test_hdf5_field_problems(tmp_path):
    path = tmp_path / "d.hdf5"
    raw = make_raw()
    with h5py.File(path, "w") as f:
        for k, v in raw.items():
            f.create_dataset(k, data=v)
        f.create_dataset("masks", data=np.ones(len(raw["terminals"]), np.float32))
        f.create_dataset("names", data=["x"] * len(raw["terminals"]), dtype=h5py.string_dtype())
    load_error(path, "field 'names' has dtype object")
    ambiguous = tmp_path / "a.hdf5"
    with h5py.File(ambiguous, "w") as f:
        for k, v in raw.items():
            f.create_dataset(k, data=v)
    load_error(ambiguous, "neither 'timeouts' nor 'masks'")
    load_error(ambiguous, "neither 'timeouts' nor 'next_observations'", format="d4rl")


def test_d4rl_bad_flags_and_shapes(tmp_path):
    path = tmp_path / "d.hdf5"
    raw = make_raw()
    with h5py.File(path, "w") as f:
        for k, v in raw.items():
            f.create_dataset(k, data=v)
        f.create_dataset("timeouts", data=np.full(len(raw["terminals"]), 0.5))
    load_error(path, "field 'timeouts' must contain only 0 and 1")
    with h5py.File(path, "a") as f:
        f["timeouts"][...] = 0
        f.create_dataset("next_observations", data=np.zeros((len(raw["terminals"]), 3)))
    load_error(path, "field 'next_observations' has shape (7, 3) but 'observations' has (7, 2)")


def test_minari_problems(tmp_path):
    path = tmp_path / "main_data.hdf5"
    with h5py.File(path, "w") as f:
        g = f.create_group("episode_0")
        g.create_dataset("observations", data=np.zeros((3, 2)))  # 3 observations for 3 actions: one short
        g.create_dataset("actions", data=np.zeros((3, 1)))
        g.create_dataset("terminations", data=np.zeros(3, bool))
        g.create_dataset("truncations", data=np.zeros(3, bool))
    message = load_error(path, "episode_0", "field 'observations' has 3 rows", "needs 4")
    assert message.startswith(str(path))
    with h5py.File(path, "a") as f:
        del f["episode_0/terminations"]
    load_error(path, "episode_0", "required field 'terminations' is missing")
    with h5py.File(path, "w") as f:
        f.create_group("not_an_episode")
    load_error(path, "no episode_<id> groups", format="minari")


def test_exorl_problems(tmp_path):
    folder = tmp_path / "buffer"
    os.makedirs(folder)
    np.savez(folder / "20220101T000000_0_5.npz", observation=np.zeros((4, 2)), action=np.zeros((4, 1)),
             discount=np.ones((4, 1)))
    load_error(folder, "says 5 steps", "4 rows")
    os.remove(folder / "20220101T000000_0_5.npz")
    np.savez(folder / "ep_0_0.npz", observation=np.zeros((1, 2)), action=np.zeros((1, 1)))
    load_error(folder, "at least 2")
    os.remove(folder / "ep_0_0.npz")
    np.savez(folder / "ep_0_2.npz", observation=np.zeros((3, 2)), action=np.zeros((2, 1)))
    load_error(folder, "field 'action' has 2 rows but 'observation' has 3")
    os.remove(folder / "ep_0_2.npz")
    np.savez(folder / "ep_0_2.npz", observation=np.zeros((3, 2)), action=np.zeros((3, 1)),
             discount=np.full((3, 1), 0.5))
    load_error(folder, "field 'discount' must be 0 or 1 per step")


# ------------------------------------------------------------------------------------------------ writes


def test_refused_writes_leave_files_untouched(tmp_path):
    good = io.load_dataset(npz(tmp_path, "src.npz", **make_raw()))
    target = tmp_path / "out.npz"
    target.write_bytes(b"precious")
    with pytest.raises(FluxrlError, match=f"{target} already exists"):
        io.save_dataset(target, good)
    assert target.read_bytes() == b"precious"
    bad = dict(good)
    bad["actions"] = bad["actions"].copy()
    bad["actions"][0, 0] = np.nan
    with pytest.raises(FluxrlError, match="field 'actions' contains NaN"):
        io.save_dataset(target, bad, overwrite=True)
    assert target.read_bytes() == b"precious"
    with pytest.raises(FluxrlError, match="metadata 'config' must be a string"):
        io.save_dataset(tmp_path / "new.npz", good, meta={"config": {"a": 1}})
    assert not (tmp_path / "new.npz").exists()
    assert sorted(os.listdir(tmp_path)) == ["out.npz", "src.npz"]
