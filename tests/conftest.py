"""Test setup: 8 simulated CPU devices, set before JAX starts."""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The shared helpers assert too: give their failures pytest's messages.
pytest.register_assert_rewrite("lora_problems")


@pytest.fixture(autouse=True, scope="session")
def _one_lapack_thread():
  """One LAPACK / BLAS thread per test process: the batched eigh of small
  matrices gains nothing from more, and with xdist workers and XLA's own
  threads they oversubscribe the cores (rite_optax.linalg.limit_lapack_threads;
  scoped to the session, the environment unchanged)."""
  from rite_optax import linalg  # pylint: disable=g-import-not-at-top
  with linalg.limit_lapack_threads(1):
    yield
