"""Test setup: 8 fake CPU devices (set before JAX is imported) and fast compiles."""
import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

# Tests run tiny models: compile time dominates, so trade run-time speed for compile speed.
jax.config.update("jax_disable_most_optimizations", True)


@pytest.fixture(scope="session")
def cpu_devices():
  devices = jax.devices("cpu")
  assert len(devices) == 8, f"expected 8 fake CPU devices, got {len(devices)}"
  return devices


from data_fixtures import procedural_dir  # noqa: E402,F401  (shared fixture)
