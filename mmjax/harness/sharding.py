"""Devices, meshes and shardings: data parallel, optionally FSDP; multi-host init.

One mesh axis, "data". The batch is always split over it. Parameters and optimizer state
are replicated, or with `fsdp=True` each array is split along its largest dimension that
the axis size divides (arrays with none stay replicated); XLA inserts the all-gathers.
Multi-host runs are the same program: `maybe_initialize_distributed()` calls
`jax.distributed.initialize()` when MMJAX_DISTRIBUTED=1 or a TPU/Slurm environment says so.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def maybe_initialize_distributed():
  """Join a multi-process run when asked to; a no-op otherwise. Returns whether it did."""
  want = os.environ.get("MMJAX_DISTRIBUTED", "").lower() in ("1", "true", "yes")
  auto = "TPU_WORKER_HOSTNAMES" in os.environ or (
      "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1)
  if not (want or auto):
    return False
  kwargs = {}
  if os.environ.get("MMJAX_COORDINATOR"):  # explicit (e.g. local tests): host:port
    kwargs = dict(coordinator_address=os.environ["MMJAX_COORDINATOR"],
                  num_processes=int(os.environ["MMJAX_NUM_PROCESSES"]),
                  process_id=int(os.environ["MMJAX_PROCESS_ID"]))
  # CPU processes exchange collectives through gloo (GPU/TPU use their own fabric).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  return True


def make_mesh(num_devices: int = -1) -> Mesh:
  devices = jax.devices()
  n = len(devices) if num_devices in (-1, 0, None) else int(num_devices)
  if not 1 <= n <= len(devices):
    raise ValueError(f"config.mesh.data={num_devices} devices asked, {len(devices)} available "
                     f"({jax.default_backend()}); use -1 for all of them.")
  return Mesh(np.asarray(devices[:n]), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def array_spec(shape, axis_size: int, fsdp: bool) -> P:
  if not fsdp or axis_size == 1:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % axis_size == 0 and shape[d] >= axis_size:
      spec = [None] * len(shape)
      spec[d] = AXIS
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh, fsdp: bool):
  """A NamedSharding per leaf of an abstract (ShapeDtypeStruct) state."""
  size = mesh.shape[AXIS]
  return jax.tree.map(lambda x: NamedSharding(mesh, array_spec(x.shape, size, fsdp)),
                      abstract_state)


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
  """This host's numpy batch -> global jax.Arrays sharded over the data axis."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def to_host(x) -> np.ndarray:
  """A global array on this host, whole: a per-example eval output sharded over hosts is
  gathered (every process gets every row, in the global batch's order)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def sharded_abstract(abstract, mesh: Mesh, fsdp: bool):
  """-> (abstract tree carrying its shardings, the shardings)."""
  shd = state_shardings(abstract, mesh, fsdp)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shd), shd


def process0_decides(flag: bool) -> bool:
  """Process 0's value of `flag`, on every process (so all take the same branch)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def barrier(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
