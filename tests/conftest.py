"""Test setup: 8 simulated CPU devices, set before JAX starts."""

import os

import pytest

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The shared helpers assert too: give their failures pytest's messages.
pytest.register_assert_rewrite("lora_problems")
