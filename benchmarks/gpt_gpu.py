"""Is jaxcollab's GPT train step as fast as PyTorch's on a GPU? (issue 10) One short job, one table.

Times, one child process after another on the same device (so each has the device, and its memory
peak, to itself): the bf16 matmul peak; jaxcollab's bare train step (`run.build` +
`train.jit_train_step`) with each attention choice; `jaxcollab train` through the CLI (tokens/s from
its metrics.jsonl); and Hugging Face `GPT2LMHeadModel` of the same shape (random init, vocab 256,
sdpa attention, bf16 autocast, fused AdamW, clipping 1.0, `torch.compile`). Prints ms/step,
tokens/s, TFLOP/s by 6N + 12·L·H·K·T per token (N: parameters less the position embedding),
share of the measured peak, peak device memory and time from process start to the first finished
step; writes the rows as JSON after each one, so a job cut short still leaves what it measured.

Shape: experiments/gpt_pydocs.py with --config.model.size=gpt2-124m --config.model.dtype=bfloat16
--config.model.dropout=0.0 --config.dataset.seq_len=1024, batches 16 and 32 x 1024.

  python benchmarks/gpt_gpu.py --wheels .whl --out $OUT/gpt_gpu.json   # a GPU: at most --budget (480 s) + 90 s
  python benchmarks/gpt_gpu.py --cpu                               # shrunk to a 2-layer toy on a CPU
  python benchmarks/gpt_gpu.py --depth [--cpu]                     # time to first step vs depth, scan on/off

The GPU machines have jax (CUDA), flax, optax, orbax, torch, transformers and matplotlib (Python
3.12) but not grain, ml_collections or tensorboardX. Carry those as wheels: here, where pip works,
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
      grain array_record ml_collections tensorboardX portpicker importlib_resources
(4.5 MB; .whl/ is gitignored), send .whl along and pass --wheels .whl: the script then runs
`pip install --no-index --no-deps .whl/*.whl` before anything else.
Run it from the repository root; it imports this checkout through PYTHONPATH (no pip install).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # Measure this checkout, not whatever jaxcollab is installed (children get PYTHONPATH).
NEEDED = ("jax", "flax", "optax", "orbax.checkpoint", "grain", "ml_collections", "tensorboardX", "matplotlib", "tqdm")
GIB = 2**30

GPU_SHAPE = [
  "--config.model.size=gpt2-124m",
  "--config.model.dtype=bfloat16",
  "--config.model.dropout=0.0",
  "--config.dataset.seq_len=1024",
]
CPU_SHAPE = [
  "--config.model.num_layers=2",
  "--config.model.num_heads=2",
  "--config.model.embed_dim=64",
  "--config.model.mlp_dim=256",
  "--config.model.context=128",
  "--config.dataset.seq_len=128",
  "--config.model.dropout=0.0",
]

# ---------------------------------------------------------------------------------------------
# Children: each measures one thing and prints one JSON line; `t0` is the parent's clock at spawn.


def _jax_config(overrides: list[str]):
  from jaxcollab import config as config_lib  # children import after setting XLA flags

  return config_lib.apply_overrides(
    config_lib.load_experiment(os.path.join(ROOT, "experiments", "gpt_pydocs.py")), overrides
  )


def _flops_per_token(n_params: int, layers: int, heads: int, head_dim: int, seq: int) -> float:
  return 6 * n_params + 12 * layers * heads * head_dim * seq


def child_peak(spec: dict) -> dict:
  """bf16 (float32 on a CPU) n^3 matmul throughput by jax, and by torch where it has a GPU."""
  import jax
  import jax.numpy as jnp

  n, reps = spec["n"], spec["reps"]
  dtype = jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  mm = jax.jit(lambda a, b: a @ b)
  mm(a, b).block_until_ready()
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    mm(a, b).block_until_ready()
    times.append(time.perf_counter() - t)
  out = {
    "jax_tflops": 2 * n**3 / min(times) / 1e12,
    "n": n,
    "dtype": jnp.dtype(dtype).name,
    "device": jax.devices()[0].device_kind,
  }
  try:
    import torch

    if torch.cuda.is_available():
      x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
      y = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
      x @ y
      torch.cuda.synchronize()
      times = []
      for _ in range(reps):
        t = time.perf_counter()
        x @ y
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
      out["torch_tflops"] = 2 * n**3 / min(times) / 1e12
  except ImportError:
    pass
  out["tflops"] = max(out["jax_tflops"], out.get("torch_tflops", 0.0))
  return out


def child_jax_step(spec: dict) -> dict:
  """jaxcollab's bare train step on random tokens (no input pipeline), as `jaxcollab train` jits it."""
  import jax
  import numpy as np

  from jaxcollab import run, sharding, train

  config = _jax_config(spec["overrides"])
  built = run.build(config, jax.devices()[:1])
  state, step = built.init_state(), train.jit_train_step(built)
  B, T, V = config.train.batch_size, config.dataset.seq_len, built.dataset.info.vocab_size
  rng = np.random.default_rng(0)
  batches = [
    sharding.to_global(
      {
        "inputs": rng.integers(0, V, (B, T), dtype=np.int32),
        "targets": rng.integers(0, V, (B, T), dtype=np.int32),
        "mask": np.ones((B, T), np.float32),
      },
      sharding.batch_sharding(built.mesh),
    )
    for _ in range(2)
  ]
  jax.block_until_ready(state)
  t = time.time()
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics)
  first, first_call = time.time() - spec["t0"], time.time() - t  # The first call is mostly compilation.
  for i in range(spec["warmup"]):
    state, metrics = step(state, batches[i % 2])
  jax.block_until_ready(metrics)
  per_step = []
  for _ in range(spec["repeats"]):
    t = time.perf_counter()
    for i in range(spec["steps"]):
      state, metrics = step(state, batches[i % 2])
    jax.block_until_ready(metrics)
    per_step.append((time.perf_counter() - t) / spec["steps"])
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  n_params -= int(np.prod(_find(state.params, "position_embed").shape))
  c = built.model.config
  stats = jax.devices()[0].memory_stats() or {}
  return {
    "s_per_step": statistics.median(per_step),
    "first_step_s": first,
    "first_call_s": first_call,
    "batch": B,
    "seq": T,
    "flops_per_token": _flops_per_token(n_params, c.num_layers, c.num_heads, c.embed_dim // c.num_heads, T),
    "peak_bytes": stats.get("peak_bytes_in_use"),
    "attention": c.attention,
    "scan_layers": c.scan_layers,
    "loss": float(metrics["loss"]),
  }


def _find(tree: dict, key: str):
  """The first value stored under `key` in a nested dict (params hold position_embed at the top level)."""
  if key in tree:
    return tree[key]
  return next(_find(v, key) for v in tree.values() if isinstance(v, dict) and _contains(v, key))


def _contains(tree: dict, key: str) -> bool:
  return key in tree or any(isinstance(v, dict) and _contains(v, key) for v in tree.values())


def child_hf(spec: dict) -> dict:
  """Hugging Face GPT2LMHeadModel of the same shape: AdamW (fused on a GPU), clipping 1.0, optional compile."""
  import torch
  import transformers

  d = spec["dims"]
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  torch.manual_seed(0)
  hf_config = transformers.GPT2Config(
    vocab_size=d["vocab"],
    n_positions=d["context"],
    n_embd=d["embed_dim"],
    n_layer=d["num_layers"],
    n_head=d["num_heads"],
    n_inner=d["mlp_dim"],
    activation_function="gelu_new",  # jax.nn.gelu's tanh form.
    resid_pdrop=0.0,
    embd_pdrop=0.0,
    attn_pdrop=0.0,
    attn_implementation="sdpa",
  )
  model = transformers.GPT2LMHeadModel(hf_config).to(device).train()
  opt = torch.optim.AdamW(
    model.parameters(), lr=spec["lr"], betas=(0.9, spec["b2"]), weight_decay=spec["wd"], fused=cuda
  )
  bf16 = spec["bf16"]
  # nanoGPT's pattern: compile the model; backward, clipping and the fused AdamW step stay eager.
  forward = torch.compile(model) if spec["compile"] else model

  def train_step(x, y):
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      logits = forward(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  step = train_step
  B, T = spec["batch"], spec["seq"]
  g = torch.Generator().manual_seed(0)
  batches = [
    (
      torch.randint(0, d["vocab"], (B, T), generator=g).to(device),
      torch.randint(0, d["vocab"], (B, T), generator=g).to(device),
    )
    for _ in range(2)
  ]
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  loss = step(*batches[0])
  sync()
  first = time.time() - spec["t0"]
  for i in range(spec["warmup"]):
    loss = step(*batches[i % 2])
  sync()
  per_step = []
  for _ in range(spec["repeats"]):
    t = time.perf_counter()
    for i in range(spec["steps"]):
      loss = step(*batches[i % 2])
    sync()
    per_step.append((time.perf_counter() - t) / spec["steps"])
  n_params = sum(p.numel() for p in model.parameters()) - model.transformer.wpe.weight.numel()
  return {
    "s_per_step": statistics.median(per_step),
    "first_step_s": first,
    "batch": B,
    "seq": T,
    "flops_per_token": _flops_per_token(n_params, d["num_layers"], d["num_heads"], d["embed_dim"] // d["num_heads"], T),
    "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    "loss": float(loss),
    "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
    "attn_implementation": model.config._attn_implementation,
  }


CHILDREN = {"peak": child_peak, "jax_step": child_jax_step, "hf": child_hf}

# ---------------------------------------------------------------------------------------------
# Parent: spawns the children one after another and assembles the table.


# Wall-clock time by which every child must have finished (set from --budget), so that one stuck
# child cannot run the job past a device lease: rows that did finish are already in the JSON.
DEADLINE = [float("inf")]


def _timeout(default: float) -> float:
  return max(30.0, min(default, DEADLINE[0] - time.time()))


def spawn(kind: str, spec: dict, env: dict | None = None, timeout: float = 420) -> dict:
  """Runs one child; returns its JSON result, or {"error": ...} (a failed row never stops the others)."""
  spec, timeout = {**spec, "t0": time.time()}, _timeout(timeout)
  env = {**os.environ, "PYTHONPATH": _pythonpath(), "TF_CPP_MIN_LOG_LEVEL": "3", **(env or {})}
  try:
    out = subprocess.run(
      [sys.executable, __file__, "--child", kind, json.dumps(spec)],
      env=env,
      cwd=ROOT,
      capture_output=True,
      text=True,
      timeout=timeout,
      check=False,
    )
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
  if out.returncode or not lines:
    return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:300]}
  return json.loads(lines[-1])


def cli_run(overrides: list[str], steps: int, log_every: int, timeout: float = 420) -> dict:
  """`jaxcollab train` as a user runs it; tokens/s is the median of the logged rows after the first."""
  timeout = _timeout(timeout)
  with tempfile.TemporaryDirectory() as workdir:
    args = [
      sys.executable,
      "-m",
      "jaxcollab.main",
      "train",
      "--config",
      "experiments/gpt_pydocs.py",
      "--workdir",
      workdir,
      *overrides,
      f"--config.train.steps={steps}",
      f"--config.train.log_every={log_every}",
      f"--config.train.eval_every={steps}",
      f"--config.checkpoint.every={steps}",
      f"--config.optimizer.warmup_steps={min(steps // 2, 100)}",
    ]
    env = {**os.environ, "PYTHONPATH": _pythonpath(), "JAXCOLLAB_CACHE": "", "TF_CPP_MIN_LOG_LEVEL": "3"}
    t = time.time()
    try:
      out = subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
      return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.time() - t
    if out.returncode:
      return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1][:300]}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [r for r in map(json.loads, f) if r["split"] == "train" and "tokens_per_s" in r]
  speeds = [r["tokens_per_s"] for r in rows[1:]] or [rows[-1]["tokens_per_s"]]
  return {"tokens_per_s": statistics.median(speeds), "wall_s": wall, "logged_rows": len(rows)}


def install_wheels(folder: str) -> None:
  """Installs every wheel in `folder` without dependencies (the GPU image has them) if grain & co. are missing."""
  if all(_importable(m) for m in ("grain", "ml_collections", "tensorboardX")):
    return
  wheels = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".whl"))
  print(f"installing {', '.join(os.path.basename(w) for w in wheels)}", flush=True)
  subprocess.run(
    [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-cache-dir", *wheels], check=True
  )


def _pythonpath() -> str:
  return os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)


def _importable(module: str) -> bool:
  import importlib.util

  return importlib.util.find_spec(module.split(".")[0]) is not None


def _row(name: str, r: dict, peak_tflops: float | None) -> dict:
  if "error" in r or "s_per_step" not in r:
    return {"name": name, **r}
  tokens = r["batch"] * r["seq"] / r["s_per_step"]
  tflops = tokens * r["flops_per_token"] / 1e12
  return {
    "name": name,
    **r,
    "ms_per_step": 1e3 * r["s_per_step"],
    "tokens_per_s": tokens,
    "tflops": tflops,
    "share_of_peak": tflops / peak_tflops if peak_tflops else None,
  }


def _fmt(x, spec: str, scale: float = 1.0) -> str:
  return "-" if x is None else format(x * scale, spec)


def print_table(rows: list[dict], peak: dict) -> None:
  print(
    f"\nmatmul peak: {_fmt(peak.get('tflops'), '.1f')} TFLOP/s ({peak.get('dtype')} {peak.get('n')}^3 on "
    f"{peak.get('device')}; jax {_fmt(peak.get('jax_tflops'), '.1f')}, "
    f"torch {_fmt(peak.get('torch_tflops'), '.1f')})"
  )
  head = (
    f"{'run':<44} {'batch':>9} {'ms/step':>8} {'tokens/s':>10} {'TFLOP/s':>8} {'of peak':>8} "
    f"{'peak mem':>9} {'1st step':>8}"
  )
  print(head)
  print("-" * len(head))
  for r in rows:
    if "error" in r:
      print(f"{r['name']:<44} error: {r['error']}")
      continue
    batch = f"{r['batch']}x{r['seq']}" if "batch" in r else "-"
    print(
      f"{r['name']:<44} {batch:>9} {_fmt(r.get('ms_per_step'), '.1f'):>8} {_fmt(r['tokens_per_s'], ',.0f'):>10} "
      f"{_fmt(r.get('tflops'), '.1f'):>8} {_fmt(r.get('share_of_peak'), '.0%'):>8} "
      f"{_fmt(r.get('peak_bytes'), '.2f', 1 / GIB):>6} GiB {_fmt(r.get('first_step_s'), '.1f'):>7}s"
    )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cpu", action="store_true", help="shrink to a 2-layer toy that runs in a minute on a CPU")
  parser.add_argument("--quick", action="store_true", help="fewer timed steps and only batch 16 (and its CLI run)")
  parser.add_argument("--depth", action="store_true", help="time to first step vs depth, with and without scan")
  parser.add_argument("--batches", default="", help="comma-separated batch sizes instead of 16,32 (--quick: 16)")
  parser.add_argument("--no-torch", action="store_true", help="skip the Hugging Face rows")
  parser.add_argument("--budget", type=float, default=480, help="seconds; rows not started by then are skipped")
  parser.add_argument("--wheels", default="", help="folder of wheels to install missing dependencies from first")
  parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "gpt_gpu.json"))
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    from jaxcollab import runtime  # XLA flags before jax starts, as the CLI sets them

    runtime.set_xla_flags()
    print(json.dumps(CHILDREN[args.child[0]](json.loads(args.child[1]))), flush=True)
    return
  if args.wheels:
    install_wheels(args.wheels)
  missing = [m for m in NEEDED if not _importable(m)]
  if missing:
    sys.exit(f"gpt_gpu.py: missing {', '.join(missing)}; carry them as wheels and pass --wheels (see the docstring).")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  (depth if args.depth else speed)(args)


def _write(path: str, result: dict) -> None:
  with open(path, "w") as f:
    json.dump(result, f, indent=2)


def speed(args: argparse.Namespace) -> None:
  """The issue's table: peak, jaxcollab's step, the CLI, Hugging Face; one child at a time, in priority order."""
  shape, batches = (CPU_SHAPE, (4, 8)) if args.cpu else (GPU_SHAPE, (16, 32))
  batches = batches[:1] if args.quick else batches
  batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else batches
  timing = (
    {"warmup": 3, "steps": 5, "repeats": 3}
    if args.cpu
    else {"warmup": 5, "steps": 10, "repeats": 3}
    if args.quick
    else {"warmup": 10, "steps": 20, "repeats": 3}
  )
  started = time.time()
  DEADLINE[0] = started + args.budget + 90  # A row started just before the budget may still finish.
  result = {
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "python": platform.python_version(),
    "machine": platform.node(),
    "cpu": args.cpu,
    "overrides": shape,
    "rows": [],
  }
  peak = spawn("peak", {"n": 1024 if args.cpu else 8192, "reps": 5 if args.cpu else 20})
  result["peak"] = peak
  print(f"peak: {peak}", flush=True)
  config = _jax_config(shape)  # Imports only the config machinery; the parent never starts a backend.
  from jaxcollab.models import gpt_config

  seq, o = config.dataset.seq_len, config.optimizer
  hf = {
    "dims": {"vocab": 256, **gpt_config.dims(config.model)},
    "seq": seq,
    "lr": o.learning_rate,
    "b2": o.b2,
    "wd": o.weight_decay,
    "bf16": not args.cpu,
    **timing,
  }
  size = lambda b: [*shape, f"--config.train.batch_size={b}"]
  step = lambda b, *extra, env=None: lambda: spawn("jax_step", {"overrides": [*size(b), *extra], **timing}, env=env)
  compiled = "eager" if args.cpu else "torch.compile"  # Inductor on a CPU needs a C++ toolchain and minutes.

  def cli(b: int) -> dict:
    r = cli_run(size(b), steps=30 if args.cpu else 80, log_every=5 if args.cpu else 10)
    bare = next((x for x in result["rows"] if x["name"] == f"jaxcollab step, attention=auto, b{b}"), {})
    if "tokens_per_s" in r and "tokens_per_s" in bare:
      r["of_bare_step"] = r["tokens_per_s"] / bare["tokens_per_s"]
    return {**r, "batch": b, "seq": seq}

  # What the acceptance needs first, then what explains it; --budget skips what would not fit.
  b0 = batches[0]
  plan = []
  for b in batches:
    plan += [
      (f"jaxcollab step, attention=auto, b{b}", step(b)),
      (f"HF GPT2LMHeadModel, {compiled}, b{b}", lambda b=b: spawn("hf", {**hf, "batch": b, "compile": not args.cpu})),
    ]
    if b == b0:
      plan.append((f"jaxcollab train (CLI), b{b}", lambda b=b: cli(b)))
  plan += [
    (f"jaxcollab step, attention=xla, b{b0}", step(b0, "--config.model.attention=xla")),
    (f"jaxcollab step, auto, MaxText GPU flags, b{b0}", step(b0, env={"JAXCOLLAB_GPU_FLAGS": "1"})),
    (f"jaxcollab step, auto, scan_layers, b{b0}", step(b0, "--config.model.scan_layers=true")),
  ]
  if not args.cpu:
    plan.append((f"HF GPT2LMHeadModel, eager, b{b0}", lambda: spawn("hf", {**hf, "batch": b0, "compile": False})))
  for name, measure in plan:
    if args.no_torch and name.startswith("HF"):
      continue
    if time.time() - started > args.budget:
      r = {"error": f"skipped: past --budget {args.budget} s"}
    else:
      r = measure()
    row = _row(name, r, peak.get("tflops"))
    result["rows"].append(row)
    _write(args.out, result)
    print(f"{name}: {json.dumps({k: v for k, v in row.items() if k != 'name'})}", flush=True)
  print_table(result["rows"], peak)
  for b in batches:
    mine = next((r for r in result["rows"] if r["name"] == f"jaxcollab step, attention=auto, b{b}"), {})
    ref = next((r for r in result["rows"] if r["name"] == f"HF GPT2LMHeadModel, {compiled}, b{b}"), {})
    if "tokens_per_s" in mine and "tokens_per_s" in ref:
      result.setdefault("ratios", {})[f"b{b}"] = ratio = mine["tokens_per_s"] / ref["tokens_per_s"]
      print(f"batch {b}: jaxcollab step / HF {compiled} tokens/s = {ratio:.2f}x")
  result["elapsed_s"] = time.time() - started
  _write(args.out, result)
  print(f"wrote {args.out} ({result['elapsed_s']:.0f} s)")


def depth(args: argparse.Namespace) -> None:
  """Time from process start to the first finished step, by depth, with and without model.scan_layers."""
  if args.cpu:
    sizes = {f"{n} layers": [*CPU_SHAPE, f"--config.model.num_layers={n}"] for n in (2, 4, 8, 16)}
    batch = 4
  else:
    sizes = {s: [*GPU_SHAPE, f"--config.model.size={s}"] for s in ("gpt2-124m", "gpt2-medium", "gpt2-xl")}
    sizes["gpt2-xl"].append("--config.model.remat=true")
    batch = 16
  timing = {"warmup": 1, "steps": 2, "repeats": 1}
  started = time.time()
  DEADLINE[0] = started + args.budget + 90
  result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": args.cpu, "rows": []}
  print(f"{'model':<14} {'scan_layers':>11} {'1st step s':>10} {'compile+1st call s':>18} {'ms/step':>8}")
  for name, overrides in sizes.items():
    for scan in (False, True):
      overrides_ = [*overrides, f"--config.train.batch_size={batch}", f"--config.model.scan_layers={scan}"]
      if time.time() - started > args.budget:
        r = {"error": f"skipped: past --budget {args.budget} s"}
      else:
        r = spawn("jax_step", {"overrides": overrides_, **timing})
      result["rows"].append({"model": name, "scan_layers": scan, **r})
      _write(args.out.replace(".json", "_depth.json"), result)
      if "error" in r:
        print(f"{name:<14} {scan!s:>11} error: {r['error']}")
      else:
        print(
          f"{name:<14} {scan!s:>11} {r['first_step_s']:>10.1f} {r['first_call_s']:>18.1f} "
          f"{1e3 * r['s_per_step']:>8.1f}",
          flush=True,
        )
  print(f"wrote {args.out.replace('.json', '_depth.json')}")


if __name__ == "__main__":
  main()
