"""Meshes, logical-axis rules and shardings: where every array of a run lives.

Models name their parameter axes ("embed", "mlp", "heads", ...); one rule table
(`config.mesh.rules`) maps those names to the mesh axes `data`, `fsdp`, `tensor`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcollab.config import ConfigDict, UserError

PyTree = Any
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # The batch is split over both: FSDP is data parallel too.


def parse_rules(rules: Sequence[Sequence[str]]) -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
  """Config rules ("batch", "data,fsdp") -> flax rules ("batch", ("data", "fsdp")); "" replicates."""
  out = []
  for item in rules:
    if len(item) != 2:
      raise UserError(f"mesh.rules entry {tuple(item)!r} must be a pair (logical_name, 'mesh_axis[,mesh_axis]').")
    name, target = item
    axes = tuple(a.strip() for a in str(target).split(",") if a.strip())
    for a in axes:
      if a not in MESH_AXES:
        raise UserError(f"mesh.rules maps {name!r} to unknown mesh axis {a!r}; use one of {', '.join(MESH_AXES)} or ''.")
    out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out)


def mesh_shape(mesh_config: ConfigDict, num_devices: int) -> dict[str, int]:
  """Resolves -1 entries so that data * fsdp * tensor == num_devices, or says why it cannot."""
  sizes = {a: int(mesh_config[a]) for a in MESH_AXES}
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise UserError(f"mesh.{a} must be a positive size or -1 (fill), got {s}.")
  free = [a for a, s in sizes.items() if s == -1]
  if len(free) > 1:
    raise UserError(f"Only one of mesh.data/fsdp/tensor may be -1, got -1 for {', '.join(free)}.")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if num_devices % fixed:
      raise UserError(
          f"The fixed mesh sizes multiply to {fixed}, which does not divide the {num_devices} devices; "
          f"choose mesh sizes whose product divides {num_devices}."
      )
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise UserError(
        f"mesh.data*mesh.fsdp*mesh.tensor = {fixed} but there are {num_devices} devices; "
        "make the product equal the device count or set one axis to -1."
    )
  return sizes


def make_mesh(mesh_config: ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  if devices == list(jax.devices()):
    # create_device_mesh orders devices so that neighbouring mesh positions share fast links.
    grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  else:
    grid = np.array(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split along their leading axis over the data and fsdp axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def check_batch(global_batch: int, mesh: Mesh, key: str = "train.batch_size") -> None:
  """The global batch must split evenly over processes and over data x fsdp devices."""
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % ways:
    raise UserError(
        f"{key}={global_batch} is not divisible by mesh data*fsdp={ways}; "
        f"use a multiple of {ways} or change the mesh."
    )
  if global_batch % jax.process_count():
    raise UserError(f"{key}={global_batch} is not divisible by the {jax.process_count()} processes.")


def check_divisible(dims: dict[str, int], mesh: Mesh) -> None:
  """Model widths that the tensor axis splits (heads, mlp) must divide evenly."""
  t = mesh.shape["tensor"]
  for name, value in dims.items():
    if value % t:
      raise UserError(f"{name}={value} is not divisible by mesh.tensor={t}; choose a tensor size that divides it.")


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into one global array per key."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def logical_specs(abstract_boxed: PyTree) -> PyTree:
  """Logical PartitionSpecs of a tree whose leaves may be `nn.LogicallyPartitioned` boxes."""
  return nn.get_partition_spec(abstract_boxed)


def state_specs(abstract_state: PyTree, param_specs: PyTree, tx: optax.GradientTransformation) -> PyTree:
  """Logical specs for a TrainState: optimizer moments follow their parameters, the rest replicates."""
  opt_specs = optax.tree_map_params(
      tx,
      lambda _, spec: spec,
      abstract_state.opt_state,
      param_specs,
      transform_non_params=lambda _: P(),
      is_leaf=lambda x: isinstance(x, P),
  )
  replicated = lambda tree: jax.tree.map(lambda _: P(), tree)
  return abstract_state.replace(
      step=P(),
      params=param_specs,
      opt_state=opt_specs,
      batch_stats=replicated(abstract_state.batch_stats),
      rng=P(),
  )


def to_shardings(specs: PyTree, mesh: Mesh, rules) -> PyTree:
  """Logical specs -> NamedShardings on `mesh` through the rule table."""
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def create_sharded(init_fn: Callable[[], PyTree], shardings: PyTree) -> PyTree:
  """Runs `init_fn` under jit with `out_shardings`, so each device makes only its own shard."""
  return jax.jit(init_fn, out_shardings=shardings)()


def initialize_distributed(
    coordinator: str | None, num_processes: int | None, process_id: int | None, timeout_s: int = 120
) -> None:
  """Joins a multi-process run; with no arguments JAX detects SLURM/TPU/MPI clusters itself."""
  if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
    raise UserError(f"--process_id={process_id} is out of range for --num_processes={num_processes}; use 0..{num_processes - 1}.")
  if num_processes is not None and num_processes < 1:
    raise UserError(f"--num_processes must be >= 1, got {num_processes}.")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=timeout_s,
    )
  except Exception as e:  # jax raises several types (RuntimeError, XlaRuntimeError, ValueError).
    raise UserError(
        f"Could not join the distributed run at coordinator {coordinator!r} within {timeout_s} s ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); check the address, port and that every process was started."
    ) from e
