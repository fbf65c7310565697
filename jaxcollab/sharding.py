"""Meshes, logical-axis rules and shardings: where every array of a run lives, on one host or many.

Models name their parameter axes ("embed", "mlp", "heads", ...); one rule table
(`config.mesh.rules`) maps those names to the mesh axes `data`, `fsdp`, `tensor`.
Everything a layout can get wrong (sizes, divisibility, the process split) is checked
here before anything compiles, and raises `UserError` with one sentence.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import jax.experimental.multihost_utils
import jax.extend.core
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcollab import jaxprs, pytree, threefry
from jaxcollab.config import ConfigDict
from jaxcollab.errors import UserError

PyTree = Any
Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # The batch is split over both: FSDP is data parallel too.


def parse_rules(rules: Sequence[Sequence[str]]) -> Rules:
  """Config rules ("batch", "data,fsdp") -> flax rules ("batch", ("data", "fsdp")); "" replicates."""
  out = []
  for item in rules:
    if len(item) != 2:
      raise UserError(f"mesh.rules entry {tuple(item)!r} must be a pair (logical_name, 'mesh_axis[,mesh_axis]').")
    name, target = item
    axes = tuple(a.strip() for a in str(target).split(",") if a.strip())
    for a in axes:
      if a not in MESH_AXES:
        raise UserError(
          f"mesh.rules maps {name!r} to unknown mesh axis {a!r}; use one of {', '.join(MESH_AXES)} or ''."
        )
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
    # Neighbouring positions on the last axes share the fastest links: tensor within a host or a
    # TPU ring, data across hosts.
    grid = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
  else:
    grid = np.array(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Batches are split along their leading axis over the data and fsdp axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
  """Several batches stacked on a new leading axis (one call of several steps): each split as one batch."""
  return NamedSharding(mesh, P(None, BATCH_AXES))


def check_batch(global_batch: int, mesh: Mesh, key: str = "train.batch_size") -> None:
  """The global batch must split evenly over data x fsdp devices, and into one block per process."""
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_batch % ways:
    raise UserError(
      f"{key}={global_batch} is not divisible by mesh data*fsdp={ways}; use a multiple of {ways} or change the mesh."
    )
  processes = len({d.process_index for d in mesh.devices.flat})
  if processes == 1:
    return  # A mesh on this process's devices alone (one host, or a local evaluation).
  if global_batch % processes:
    raise UserError(
      f"{key}={global_batch} is not divisible by the {processes} processes; use a multiple of {processes}."
    )
  start, stop = process_rows(mesh, global_batch)
  if stop - start != global_batch // processes:
    # Each process reads only its own 1/processes of the data (grain sharding by process).
    raise UserError(
      f"Process {jax.process_index()} holds {stop - start} of the {global_batch} rows of {key}, but each of the "
      f"{processes} processes reads {global_batch // processes}; keep mesh.tensor within one host (at most "
      "its local device count) so that data*fsdp spans the processes."
    )


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """[start, stop) of the global batch rows that this process's devices hold."""
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,)).values()
  rows = sorted({idx[0].indices(global_batch)[:2] for idx in indices if idx is not None})
  start, stop = rows[0][0], rows[-1][1]
  if sum(b - a for a, b in rows) != stop - start:
    raise UserError(
      f"This mesh gives process {jax.process_index()} non-contiguous batch rows {rows}; "
      "order the devices so that each process holds one block of the data*fsdp axes."
    )
  return start, stop


def check_params(
  param_specs: PyTree, abstract_params: PyTree, mesh: Mesh, rules: Rules, hints: dict[str, str] | None = None
) -> None:
  """Every sharded parameter axis must divide evenly over the mesh axes its logical name maps to."""
  hints = hints or {}
  specs = jax.tree_util.tree_flatten_with_path(param_specs, is_leaf=lambda x: isinstance(x, P))[0]
  shapes = jax.tree.leaves(abstract_params)
  for (path, logical), leaf in zip(specs, shapes):
    physical = nn.logical_to_mesh_axes(tuple(logical), rules)
    for name, axes, size in zip(logical, tuple(physical or ()), leaf.shape):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      ways = math.prod(mesh.shape[a] for a in axes)
      if size % ways:
        where = pytree.path_str(path)
        split = "*".join(f"mesh.{a}={mesh.shape[a]}" for a in axes)
        key = f" ({hints[name]})" if name in hints else ""
        raise UserError(
          f"Parameter {where} has size {size} on its {name!r} axis{key}, which {split} cannot split evenly; "
          f"choose a size divisible by {ways}, other mesh sizes, or map {name!r} to '' in mesh.rules."
        )


def check_same_across_processes(value: str, what: str) -> None:
  """Every process must run with the same `value` (config, workdir); a mismatch would hang later, not fail."""
  if jax.process_count() == 1:
    return
  digest = np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8)
  digests = np.asarray(jax.experimental.multihost_utils.process_allgather(digest))
  differ = [i for i in range(len(digests)) if not np.array_equal(digests[i], digests[0])]
  if differ:
    raise UserError(
      f"{what} differs between process 0 and process(es) {differ}; start every process with the "
      "same command line (same experiment, --config overrides and --workdir)."
    )


def to_global(local_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into one global array per key."""
  if jax.process_count() == 1:  # The local batch is the global one: one transfer for every key.
    return jax.device_put(local_batch, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def with_shardings(abstract: PyTree, shardings: PyTree) -> PyTree:
  """ShapeDtypeStructs that carry their shardings: what jit sees of arrays laid out that way."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def logical_specs(abstract_boxed: PyTree) -> PyTree:
  """Logical PartitionSpecs of a tree whose leaves may be `nn.LogicallyPartitioned` boxes."""
  return nn.get_partition_spec(abstract_boxed)


def state_specs(abstract_state: PyTree, param_specs: PyTree) -> PyTree:
  """Logical specs for a TrainState: optimizer moments follow their parameters, the rest replicates."""
  params: Any = jax.tree.structure(abstract_state.params)
  like_params = lambda node: jax.tree.structure(node) == params
  # Every subtree of the optimizer state shaped like the parameters (Adam's mu and nu, momentum,
  # accumulated gradients) is sharded like them; counters and the like are replicated scalars.
  opt_specs = jax.tree.map(
    lambda node: param_specs if like_params(node) else P(), abstract_state.opt_state, is_leaf=like_params
  )
  replicated = lambda tree: jax.tree.map(lambda _: P(), tree)
  return abstract_state.replace(
    step=P(),
    params=param_specs,
    opt_state=opt_specs,
    batch_stats=replicated(abstract_state.batch_stats),
    rng=P(),
  )


def to_shardings(specs: PyTree, mesh: Mesh, rules: Rules) -> PyTree:
  """Logical specs -> NamedShardings on `mesh` through the rule table."""
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


# Compiler options for the one-off initialisation programs, by platform. On the CPU, LLVM at -O1
# instead of XLA's default -O2 compiled the gpt_pydocs init in 0.8 s instead of 1.5-2.9 s, ran it no
# slower (gpt2-124m too), and made bit-identical parameters: its element-wise random-number code gains
# nothing from -O2's vectorisers, and both levels fuse multiply-adds alike (-O0 does not, and differs).
# tests/sharding_test.py pins the equality with the default compilation for every model.
INIT_COMPILER_OPTIONS: dict[str, dict[str, Any]] = {"cpu": {"xla_backend_optimization_level": 1}}


def create_sharded(init_fn: Callable[[], PyTree], shardings: PyTree) -> PyTree:
  """Runs `init_fn` under jit with `out_shardings`, so each device makes only its own shard."""
  return create_sharded_ahead(init_fn, shardings)()


def create_sharded_ahead(init_fn: Callable[[], PyTree], shardings: PyTree) -> Callable[[], PyTree]:
  """`create_sharded`, its program lowered now and compiled on a thread (`compile_on_thread`); call the
  result for the state (it raises the compilation's error, if any).

  On the CPU, the host does what XLA:CPU was slowest to compile: the leaves that `init_fn` fills with
  one constant (biases, norm scales, the optimizer's moments: 141 of gpt_pydocs' 160; XLA compiles a
  kernel per output) and the threefry draws (`threefry.host_draws`); the program only turns the bits
  into parameters. The init's compilation, which shares the cores of a cold start with the step's,
  went from 56 kernels to a few; the values are the same to the bit (tests/sharding_test.py).
  """
  platforms = {d.platform for s in jax.tree.leaves(shardings) for d in s.device_set}
  platform = platforms.pop() if len(platforms) == 1 else None
  options = INIT_COMPILER_OPTIONS.get(platform) if platform else None
  leaf_shardings = jax.tree.leaves(shardings)
  if platform in HOST_FILLED_PLATFORMS:
    closed, out_shapes = jax.make_jaxpr(init_fn, return_shape=True)()
    shapes, treedef = jax.tree.flatten(out_shapes)
  if platform not in HOST_FILLED_PLATFORMS or len(shapes) != len(leaf_shardings):
    compiled = compile_on_thread(jax.jit(init_fn, out_shardings=shardings).lower(), "init", options)
    return lambda: compiled()()
  fills, program, inputs = host_split(closed, draw=all(isinstance(s, NamedSharding) for s in leaf_shardings))
  from_program = [i for i, fill in enumerate(fills) if fill is None]
  # The drawn bits go in whole to every device: elementwise maps of them make the sharded leaves.
  whole = [NamedSharding(leaf_shardings[0].mesh, P()) for _ in inputs]
  abstract = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, sharding=s) for v, s in zip(program.jaxpr.invars, whole)]
  lowered = jax.jit(
    jax.extend.core.jaxpr_as_fun(program), out_shardings=[leaf_shardings[i] for i in from_program]
  ).lower(*abstract)
  compiled = compile_on_thread(lowered, "init", options)

  def make() -> PyTree:
    values = [_filled(a.shape, a.dtype, x() if callable(x) else x, s) for a, x, s in zip(abstract, inputs, whole)]
    made = iter(compiled()(*values))
    leaves = [
      next(made) if fill is None else _filled(shape.shape, shape.dtype, fill, sharding)
      for shape, fill, sharding in zip(shapes, fills, leaf_shardings)
    ]
    return jax.tree.unflatten(treedef, leaves)

  return make


def host_split(closed: jax.extend.core.ClosedJaxpr, draw: bool = True) -> tuple[list[Any], Any, list[Any]]:
  """(each output's host value or None, the program for the Nones, that program's host inputs).

  Host values: the outputs `closed` fills with a constant, and, where `draw`, those
  `threefry.host_draws` makes; the program's inputs are the bits it draws, as functions that draw them.
  """
  fills = jaxprs.constant_outputs(closed.jaxpr)
  computed = [i for i, fill in enumerate(fills) if fill is None]
  # jax.random's draws sit in nested jit calls: inlined, the host can make them (and drop what is dead in them).
  closed = jaxprs.only_outputs(jaxprs.inline_jits(jaxprs.only_outputs(closed, computed)), list(range(len(computed))))
  drawn = threefry.host_draws(closed) if draw else None
  program, inputs, host_values = drawn or (closed, [], [None] * len(computed))
  for i, value in zip(computed, host_values):
    fills[i] = value
  return fills, program, inputs


# Where `create_sharded` makes constant leaves on the host: where device memory is host memory, and
# where it was measured. On an accelerator they would cross the host link; there they stay in the program.
HOST_FILLED_PLATFORMS = ("cpu",)


def _filled(shape: tuple[int, ...], dtype: Any, fill: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """An array of `shape` made shard by shard on the host, from a scalar `fill` or a whole host array."""
  if np.ndim(fill):
    whole = np.asarray(fill, dtype)
    return jax.make_array_from_callback(shape, sharding, lambda index: whole[index])
  shard_shape = sharding.shard_shape(shape)
  return jax.make_array_from_callback(shape, sharding, lambda _: np.full(shard_shape, fill, dtype))


def compile_on_thread(
  lowered: jax.stages.Lowered, name: str, options: dict[str, Any] | None = None
) -> Callable[[], jax.stages.Compiled]:
  """Starts compiling `lowered` on a thread; the result waits for it and returns it, or raises its error.

  XLA frees the GIL while it compiles, so the caller can trace other programs meanwhile.
  """
  done: dict[str, Any] = {}

  def compile_() -> None:
    try:
      done["program"] = lowered.compile(compiler_options=options)
    except Exception as e:  # Raised by the caller, in its own thread.
      done["error"] = e

  # Not a daemon: a process that fails before it waits lets XLA finish, rather than tearing the
  # interpreter down under a thread inside the compiler.
  thread = threading.Thread(target=compile_, name=f"compile {name}")
  thread.start()

  def wait() -> jax.stages.Compiled:
    thread.join()
    if "error" in done:
      raise done["error"]
    return done["program"]

  return wait


@contextlib.contextmanager
def activation_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Scope in which the models' `nn.with_logical_constraint` calls resolve; enter it while tracing."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


# ---------------------------------------------------------------------------------------------
# Several processes.


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise UserError(f"--coordinator_address {address!r} must be HOST:PORT, e.g. 10.0.0.1:1234.")
  return host.strip("[]"), int(port)


def _wait_for_port(address: str, deadline: float) -> bool:
  """True once something accepts TCP connections at `address`, False at the deadline."""
  host, port = _split_address(address)
  while True:
    try:
      with socket.create_connection((host, port), timeout=max(0.1, min(2.0, deadline - time.monotonic()))):
        return True
    except OSError:
      if time.monotonic() >= deadline:
        return False
      time.sleep(0.25)


def initialize_distributed(
  coordinator: str | None, num_processes: int | None, process_id: int | None, timeout_s: int = 300
) -> None:
  """Joins a multi-process run; with no arguments JAX detects SLURM/TPU/MPI clusters itself.

  JAX aborts the process (C++ LOG(FATAL)) when the other processes do not join in time, so a
  watchdog gives up first with a sentence and exit code 2; jax's own timeout is the backstop.
  """
  if num_processes is not None and num_processes < 1:
    raise UserError(f"--num_processes must be >= 1, got {num_processes}.")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise UserError(
      f"--process_id={process_id} is out of range for --num_processes={num_processes}; use 0..{num_processes - 1}."
    )
  if process_id is not None and process_id < 0:
    raise UserError(f"--process_id must be >= 0, got {process_id}.")
  if timeout_s <= 0:
    raise UserError(f"--init_timeout must be a positive number of seconds, got {timeout_s}.")
  me = f"process {process_id} of {num_processes}" if process_id is not None else "this process"
  deadline = time.monotonic() + timeout_s
  if coordinator and process_id:  # Process 0 starts the coordinator service itself.
    if not _wait_for_port(coordinator, deadline):
      raise UserError(
        f"Could not reach the coordinator at {coordinator} within {timeout_s} s ({me}); start "
        "process 0 there, check the address, port and firewall, or raise --init_timeout."
      )
  # Collectives between CPU devices of different processes (tests, CPU clusters); GPUs/TPUs use NCCL/ICI.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  lock, joined = threading.Lock(), threading.Event()

  def give_up() -> None:
    with lock:
      if joined.is_set():
        return
      where = f"coordinator {coordinator}" if coordinator else "the coordinator JAX detected"
      count = f"all {num_processes}" if num_processes else "all"
      sys.stderr.write(
        f"jaxcollab: error: Not {count} processes joined at {where} within {timeout_s} s "
        f"({me}); start every process with the same --coordinator_address and --num_processes, or raise "
        "--init_timeout.\n"
      )
      sys.stderr.flush()
      os._exit(2)  # jax.distributed.initialize cannot be interrupted from Python.

  watchdog = threading.Timer(max(deadline - time.monotonic(), 0.0), give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=timeout_s + 60,
    )
  except Exception as e:  # jax raises several types (RuntimeError, XlaRuntimeError, ValueError).
    detail = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(
      f"Could not join a distributed run ({detail}); pass --coordinator_address, --num_processes and "
      "--process_id, or run under SLURM or on a TPU pod where JAX detects them."
    ) from e
  finally:
    with lock:
      joined.set()
    watchdog.cancel()
