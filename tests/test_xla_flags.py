"""fluxrl turns off XLA:CPU's YNNPACK reductions (fluxrl/__init__.py; benchmarks/README.md has the measurements)."""

import os
import subprocess
import sys

import pytest

import fluxrl
from fluxrl import YNN_FLAG, with_xla_reductions


def test_the_flag_is_added_only_for_the_measured_jaxlib_and_never_over_a_users_choice():
    assert with_xla_reductions("", "0.10.2") == f"{YNN_FLAG}=-reduce"
    assert with_xla_reductions("--xla_force_host_platform_device_count=2", "0.10.2") == (
        f"--xla_force_host_platform_device_count=2 {YNN_FLAG}=-reduce")
    assert with_xla_reductions(f"{YNN_FLAG}=+reduce", "0.10.2") == f"{YNN_FLAG}=+reduce"
    assert with_xla_reductions(f"{YNN_FLAG}=", "0.10.2") == f"{YNN_FLAG}="
    for unmeasured in ("0.4.30", "0.11.2", "1.10.0", None):  # an XLA flag unknown to jaxlib aborts the process
        assert with_xla_reductions("--xla_dump_to=/tmp/x", unmeasured) == "--xla_dump_to=/tmp/x"


COMPILE_A_REDUCTION = """
import os, jax, jax.numpy as jnp
import fluxrl  # after jax, as tests/conftest.py does: the flag still counts, since no backend has started
hlo = jax.jit(lambda x: jnp.tanh(x).sum(axis=1)).lower(jnp.ones((2, 256, 512))).compile().as_text()
print(os.environ.get("XLA_FLAGS"), "|", hlo.count('"__ynn_fusion"'), "|", jax.device_count())
"""


MEASURED_JAXLIB = (fluxrl.installed_version("jaxlib") or "").startswith(fluxrl.YNN_FLAG_JAXLIB)


@pytest.mark.skipif(not MEASURED_JAXLIB, reason="the flag is set only on the jaxlib measured")
@pytest.mark.parametrize("user_flags, expected_flags, ynn_fusions, devices", [
    (None, f"{YNN_FLAG}=-reduce", 0, 1),
    ("--xla_force_host_platform_device_count=2", f"--xla_force_host_platform_device_count=2 {YNN_FLAG}=-reduce", 0, 2),
    (f"{YNN_FLAG}=+reduce", f"{YNN_FLAG}=+reduce", 1, 1),  # a user's choice is kept: XLA's default
])
def test_a_process_that_imports_fluxrl_compiles_reductions_without_ynnpack(user_flags, expected_flags, ynn_fusions,
                                                                          devices):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}  # also on a GPU
    if user_flags is not None:
        env["XLA_FLAGS"] = user_flags
    out = subprocess.run([sys.executable, "-c", COMPILE_A_REDUCTION], env=env, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    assert out == f"{expected_flags} | {ynn_fusions} | {devices}"
