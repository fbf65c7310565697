"""Is jaxcollab fast on the CPU? Side by side with PyTorch eager, in alternating fresh processes.

Measures, each in its own child process, alternating jax and torch, for >= 3 rounds:
  - GPT train and eval tokens/s at gpt_pydocs dims (4 layers, 4 heads, width 128, seq 128) and at
    6 layers x 6 heads x width 384 x seq 256; batch 32, dropout 0, AdamW, clipping 1.0;
  - the cnn_digits CNN's train images/s (batch 128, Adam);
  - process start to the first finished GPT step, cold (empty compilation cache) and warm;
  - compilations after the first step (must be 0);
  - the `jaxcollab train` loop's steps/s against the bare jitted step's for cnn_digits (with its
    augmentation), mlp_digits and gpt_pydocs, and the wall time of the README's main job.
The PyTorch models are benchmarks/torch_reference.py (needs the `bench` extra: pip install -e .[bench]).
Prints a table (medians; ratios are medians of per-round ratios, with their range) and writes
benchmarks/results/cpu_vs_torch.json.

  python benchmarks/cpu_vs_torch.py [--quick] [--rounds 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

GPT_SIZES = {
  "gpt 4x128 seq128": {"num_layers": 4, "num_heads": 4, "embed_dim": 128, "mlp_dim": 512, "context": 128},
  "gpt 6x384 seq256": {"num_layers": 6, "num_heads": 6, "embed_dim": 384, "mlp_dim": 1536, "context": 256},
}
GPT_BATCH = 32
CNN_BATCH = 128

# ---------------------------------------------------------------------------------------------
# Children: each prints one JSON line. `started` is the parent's time.time() just before spawning.


def _jax_runtime(cache_dir: str, start_up: bool = False) -> None:
  """The CLI's runtime setup (CPU fusion flag, persistent compilation cache) before jax computes.

  start_up: also pause the cyclic collector until `runtime.resume_gc()`, as `jaxcollab train` does
  until its first step.
  """
  from jaxcollab import runtime  # pylint: disable=g-import-not-at-top

  runtime.configure(cache_dir, log_level=None)
  if start_up:
    runtime.pause_gc()


def _compile_counter():
  import jax  # pylint: disable=g-import-not-at-top

  count = [0]

  def listener(event: str, duration: float, **kwargs) -> None:
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      count[0] += 1

  jax.monitoring.register_event_duration_secs_listener(listener)
  return count


def _timed(fn, steps: int, reps: int, sync, stat=min) -> float:
  """Seconds per call over `reps` runs of `steps` calls: the fastest run (robust to a busy machine).

  stat=statistics.median where the figure is compared with the training loop's median rate.
  """
  runs = []
  for _ in range(reps):
    t = time.perf_counter()
    for _ in range(steps):
      out = fn()
    sync(out)
    runs.append((time.perf_counter() - t) / steps)
  return stat(runs)


def child_jax_gpt(size: str, steps: int, reps: int, cache_dir: str, started: float) -> dict:
  _jax_runtime(cache_dir, start_up=True)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from jaxcollab import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxcollab import evaluate, runtime, sharding, train
  from jaxcollab import run as run_lib

  config = config_lib.load_experiment("gpt_pydocs")
  for k, v in GPT_SIZES[size].items():
    config.model[k] = v
  config.dataset.seq_len = config.model.context
  config.model.dropout = 0.0
  config.train.batch_size = config.train.eval_batch_size = GPT_BATCH
  compiles = _compile_counter()
  run = run_lib.build(config)
  step, compiled, init_state = train.compile_ahead(run)  # As `jaxcollab train` starts (no checkpoint).
  state = init_state()
  put = sharding.batch_sharding(run.mesh)
  it = run.dataset.train_iterator(batch_size=GPT_BATCH, seed=0)
  batches = [sharding.to_global(next(it), put) for _ in range(4)]
  compiled()
  state, metrics = step(state, batches[0])
  jax.block_until_ready(metrics)
  first_step_s = time.time() - started
  runtime.resume_gc()
  after_first = compiles[0]
  box = {"state": state}

  def train_once():
    box["state"], m = step(box["state"], batches[0])
    return m

  train_s = _timed(train_once, steps, reps, jax.block_until_ready)
  train_recompiles = compiles[0] - after_first
  evaluator = evaluate.Evaluator(run)
  params, stats = box["state"].params, box["state"].batch_stats
  jax.block_until_ready(evaluator._step(params, stats, batches[1]))  # pylint: disable=protected-access
  after_eval_compile = compiles[0]
  eval_s = _timed(lambda: evaluator._step(params, stats, batches[1]), steps, reps, jax.block_until_ready)  # pylint: disable=protected-access
  tokens = GPT_BATCH * config.dataset.seq_len
  return {
    "train_tokens_per_s": tokens / train_s,
    "eval_tokens_per_s": tokens / eval_s,
    "first_step_s": first_step_s,
    "compiles_to_first_step": after_first,
    # Compilations while timing steps that had run once already: 0 unless something retraces.
    "compiles_after_first_step": train_recompiles + compiles[0] - after_eval_compile,
    "loss": float(np.asarray(metrics["loss"])),
  }


def child_torch_gpt(size: str, steps: int, reps: int, threads: int, started: float) -> dict:
  import torch  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, HERE)
  import torch_reference as ref  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  dims = GPT_SIZES[size]
  seq = dims["context"]
  model = ref.GPT(256, **dims)
  opt = ref.gpt_optimizer(model, lr=3e-3, weight_decay=0.1, b2=0.99)
  # The same bytes a jaxcollab batch holds: windows of the pydocs training text.
  from jaxcollab.data import embedded  # pylint: disable=g-import-not-at-top  # numpy only.

  text = torch.from_numpy(embedded.pydocs_bytes("train")[: GPT_BATCH * seq + 1].astype("int64"))
  inputs, targets = text[:-1].view(GPT_BATCH, seq), text[1:].view(GPT_BATCH, seq)
  loss = ref.gpt_train_step(model, opt, inputs, targets, clip=1.0)
  first_step_s = time.time() - started
  train_s = _timed(lambda: ref.gpt_train_step(model, opt, inputs, targets, clip=1.0), steps, reps, lambda x: x.item())

  def evaluate():
    with torch.no_grad():
      logits = model(inputs)
      return torch.nn.functional.cross_entropy(logits.view(-1, 256), targets.view(-1))

  evaluate()
  eval_s = _timed(evaluate, steps, reps, lambda x: x.item())
  tokens = GPT_BATCH * seq
  return {
    "train_tokens_per_s": tokens / train_s,
    "eval_tokens_per_s": tokens / eval_s,
    "first_step_s": first_step_s,
    "loss": float(loss),
  }


def child_jax_cnn(steps: int, reps: int, cache_dir: str, started: float) -> dict:
  del started
  _jax_runtime(cache_dir)
  import jax  # pylint: disable=g-import-not-at-top

  from jaxcollab import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxcollab import run as run_lib
  from jaxcollab import sharding, train
  from jaxcollab.data import augment

  config = config_lib.load_experiment("cnn_digits")
  run = run_lib.build(config)
  state, step = run.init_state(), train.jit_train_step(run)
  batch = next(run.dataset.train_iterator(batch_size=CNN_BATCH, seed=0))
  # The model's step alone, as torch's: the loop rows below time the step with its augmentation.
  batch = sharding.to_global({k: v for k, v in batch.items() if k != augment.KEY}, sharding.batch_sharding(run.mesh))
  box = {"state": step(state, batch)[0]}

  def once():
    box["state"], m = step(box["state"], batch)
    return m

  return {"images_per_s": CNN_BATCH / _timed(once, steps, reps, jax.block_until_ready)}


def child_torch_cnn(steps: int, reps: int, threads: int, started: float) -> dict:
  del started
  import torch  # pylint: disable=g-import-not-at-top

  sys.path.insert(0, HERE)
  import torch_reference as ref  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = ref.CNN()
  opt = torch.optim.Adam(model.parameters(), lr=2e-3)
  images, labels = torch.rand(CNN_BATCH, 1, 8, 8), torch.randint(0, 10, (CNN_BATCH,))
  ref.cnn_train_step(model, opt, images, labels)
  seconds = _timed(lambda: ref.cnn_train_step(model, opt, images, labels), steps, reps, lambda x: x.item())
  return {"images_per_s": CNN_BATCH / seconds}


def child_bare_step(experiment: str, steps: int, reps: int, cache_dir: str, started: float) -> dict:
  """The jitted train step of `experiment` on batches already on the device: the loop's ceiling."""
  del started
  _jax_runtime(cache_dir)
  import jax  # pylint: disable=g-import-not-at-top

  from jaxcollab import config as config_lib  # pylint: disable=g-import-not-at-top
  from jaxcollab import run as run_lib
  from jaxcollab import sharding, train

  config = config_lib.load_experiment(experiment)
  run = run_lib.build(config)
  state, step = run.init_state(), train.jit_train_step(run)
  it = run.dataset.train_iterator(batch_size=config.train.batch_size, seed=0)
  batches = [sharding.to_global(next(it), sharding.batch_sharding(run.mesh)) for _ in range(8)]
  box = {"state": step(state, batches[0])[0], "i": 0}

  def once():
    box["i"] += 1
    box["state"], m = step(box["state"], batches[box["i"] % len(batches)])
    return m

  # Median, like the loop's rate (the median of its log intervals), so that load affects both alike.
  return {"steps_per_s": 1 / _timed(once, steps, reps, jax.block_until_ready, statistics.median)}


CHILDREN = {
  "jax_gpt": child_jax_gpt,
  "torch_gpt": child_torch_gpt,
  "jax_cnn": child_jax_cnn,
  "torch_cnn": child_torch_cnn,
  "bare_step": child_bare_step,
}

# ---------------------------------------------------------------------------------------------
# Parent.


def _omp_wait_policy() -> str:
  # On a machine busier than its cores, OpenMP threads that spin at barriers wait for descheduled
  # peers: torch's GPT step measured 9.7 s spinning vs 0.8 s passive here under load 15 on 2
  # cores. Give torch the setting that suits the machine's load, and record it.
  return "PASSIVE" if os.getloadavg()[0] > (os.cpu_count() or 1) else "ACTIVE"


def _env(threads: int) -> dict[str, str]:
  # Both frameworks get the same cores: XLA's CPU client sizes its pool from the affinity mask,
  # torch from set_num_threads (passed as an argument).
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    TF_CPP_MIN_LOG_LEVEL="3",
    PYTHONPATH=ROOT,
    OMP_NUM_THREADS=str(threads),
    OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", _omp_wait_policy()),
  )
  return env


def spawn(name: str, *args, threads: int) -> dict:
  started = time.time()
  cmd = [sys.executable, os.path.abspath(__file__), "--child", name, json.dumps([*args, started])]
  env = _env(threads)
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
  if out.returncode:
    raise RuntimeError(f"child {name}{args} failed:\n{out.stderr[-3000:]}")
  result = json.loads(out.stdout.strip().splitlines()[-1])
  return {
    **result,
    "load_1min": os.getloadavg()[0],
    **({"omp_wait": env["OMP_WAIT_POLICY"]} if "torch" in name else {}),
  }


def loop_rate(experiment: str, steps: int | None, cache_dir: str, threads: int) -> dict:
  """`jaxcollab train` on a fresh workdir: steps/s from its metrics rows after the first, and wall time."""
  workdir = tempfile.mkdtemp(prefix=f"bench_{experiment}_")
  overrides = (
    []
    if steps is None
    else [
      f"--config.train.steps={steps}",
      f"--config.train.eval_every={steps}",
      f"--config.checkpoint.every={steps}",
      "--config.train.log_every=25",
      "--config.optimizer.warmup_steps=5",  # gpt_pydocs warms up for 100 steps, longer than a short run.
    ]
  )
  env = dict(_env(threads), JAXCOLLAB_CACHE=cache_dir)
  cmd = [sys.executable, "-m", "jaxcollab.main", "train", "--config", experiment, "--workdir", workdir, *overrides]
  t = time.perf_counter()
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
  wall = time.perf_counter() - t
  if out.returncode:
    raise RuntimeError(f"jaxcollab train {experiment} failed:\n{out.stderr[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  shutil.rmtree(workdir, ignore_errors=True)
  train_rows = [r for r in rows if r["split"] == "train"]
  per_batch = config["train"]["batch_size"] * (config["dataset"]["seq_len"] if "tokens_per_s" in train_rows[0] else 1)
  rates = [r.get("tokens_per_s", r.get("examples_per_s")) / per_batch for r in train_rows[1:]]
  # Train-only time: what the steps between the first and the last row took (no start-up, no final report).
  return {
    "steps_per_s": statistics.median(rates),
    "wall_s": wall,
    "steps": config["train"]["steps"],
    "final": {k: v for k, v in rows[-1].items() if k != "step"},
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="fewer steps, repetitions and rounds (~5 min)")
  parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 3; --quick 1)")
  parser.add_argument("--threads", type=int, default=2, help="threads for torch (jax uses every core it may)")
  parser.add_argument("--only", default="gpt,cnn,loop,start", help="comma-separated parts to run")
  parser.add_argument("--loops", default="cnn_digits,mlp_digits,gpt_pydocs", help="experiments of the loop part")
  parser.add_argument("--out", default=os.path.join(HERE, "results", "cpu_vs_torch.json"), help="JSON results file")
  parser.add_argument("--child", help=argparse.SUPPRESS)
  parser.add_argument("child_args", nargs="?", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    if not args.child.startswith("torch"):
      # As `jaxcollab train` starts (jaxcollab/runtime.py): malloc with huge pages. torch's eager
      # step measured the same with and without them (24.7-25.6k tokens/s both ways, 3 rounds).
      from jaxcollab import runtime  # pylint: disable=g-import-not-at-top

      runtime.restart_with_huge_pages()
    print(json.dumps(CHILDREN[args.child](*json.loads(args.child_args))))
    return

  rounds = args.rounds or (1 if args.quick else 3)
  steps, reps = (3, 2) if args.quick else (5, 3)
  parts = set(args.only.split(","))
  cache = tempfile.mkdtemp(prefix="bench_xla_cache_")
  results: dict[str, list] = {}

  def add(key: str, fn, *fn_args, **fn_kwargs) -> None:
    try:
      value = fn(*fn_args, **fn_kwargs)
    except RuntimeError as e:  # One failed child must not cost the rest of the run.
      print(f"  {key}: FAILED {e}", flush=True)
      return
    results.setdefault(key, []).append(value)
    print(
      f"  {key}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in value.items()})}", flush=True
    )

  for r in range(rounds):
    print(f"round {r + 1}/{rounds}", flush=True)
    if "gpt" in parts:
      for size in GPT_SIZES:
        gpt_steps = steps if "384" not in size else max(2, steps // 2)
        add(f"torch {size}", spawn, "torch_gpt", size, gpt_steps, reps, args.threads, threads=args.threads)
        add(f"jax {size}", spawn, "jax_gpt", size, gpt_steps, reps, cache, threads=args.threads)
    if "cnn" in parts:
      add("torch cnn", spawn, "torch_cnn", 20 * steps, reps, args.threads, threads=args.threads)
      add("jax cnn", spawn, "jax_cnn", 20 * steps, reps, cache, threads=args.threads)
    if "start" in parts:
      cold = tempfile.mkdtemp(prefix="bench_cold_cache_")
      size = next(iter(GPT_SIZES))
      add("start torch", spawn, "torch_gpt", size, 1, 1, args.threads, threads=args.threads)
      add("start jax cold", spawn, "jax_gpt", size, 1, 1, cold, threads=args.threads)
      add("start jax warm", spawn, "jax_gpt", size, 1, 1, cold, threads=args.threads)
      shutil.rmtree(cold, ignore_errors=True)
    if "loop" in parts:
      for experiment in args.loops.split(","):
        # The digits experiments run whole (cnn_digits is the README's main job, timed end to end):
        # 150 steps of mlp_digits' 0.6 ms step gave 5 log intervals of ~15 ms, too few to time.
        loop_steps = 60 if experiment == "gpt_pydocs" else None if "digits" in experiment else 150
        bare_steps = 2 * steps if experiment.startswith("gpt") else 10 * steps  # ~1 s per GPT step.
        add(f"bare {experiment}", spawn, "bare_step", experiment, bare_steps, 5, cache, threads=args.threads)
        add(f"loop {experiment}", loop_rate, experiment, loop_steps, cache, args.threads)
  shutil.rmtree(cache, ignore_errors=True)
  report(results, args, rounds)


def _ratio_row(label: str, results: dict, a: str, b: str, key: str, unit: str, higher_better: bool = True) -> dict:
  if a not in results or b not in results:
    return {}
  xs, ys = [v[key] for v in results[a]], [v[key] for v in results[b]]
  ratios = [x / y for x, y in zip(xs, ys)] if higher_better else [y / x for x, y in zip(xs, ys)]
  return {
    "metric": label,
    "unit": unit,
    "jax": statistics.median(xs),
    "reference": statistics.median(ys),
    "ratio": statistics.median(ratios),
    "ratio_min": min(ratios),
    "ratio_max": max(ratios),
    "per_round": ratios,
  }


def report(results: dict, args, rounds: int) -> None:
  rows = []
  for size in GPT_SIZES:
    if f"jax {size}" in results:
      rows.append(
        _ratio_row(
          f"{size} train (vs torch)", results, f"jax {size}", f"torch {size}", "train_tokens_per_s", "tokens/s"
        )
      )
      rows.append(
        _ratio_row(f"{size} eval (vs torch)", results, f"jax {size}", f"torch {size}", "eval_tokens_per_s", "tokens/s")
      )
  if "jax cnn" in results:
    rows.append(
      _ratio_row("cnn_digits CNN train (vs torch)", results, "jax cnn", "torch cnn", "images_per_s", "images/s")
    )
  if "start jax cold" in results:
    rows.append(
      _ratio_row(
        "start to first step, cold (torch/jax)",
        results,
        "start jax cold",
        "start torch",
        "first_step_s",
        "s",
        higher_better=False,
      )
    )
    rows.append(
      _ratio_row(
        "start to first step, warm cache (torch/jax)",
        results,
        "start jax warm",
        "start torch",
        "first_step_s",
        "s",
        higher_better=False,
      )
    )
  for experiment in ("cnn_digits", "mlp_digits", "gpt_pydocs"):
    if f"loop {experiment}" in results:
      rows.append(
        _ratio_row(
          f"{experiment}: jaxcollab train loop (vs bare step)",
          results,
          f"loop {experiment}",
          f"bare {experiment}",
          "steps_per_s",
          "steps/s",
        )
      )
  compiles = [v["compiles_after_first_step"] for k, vs in results.items() if k.startswith("jax gpt") for v in vs]
  print(f"\n{'metric':<50} {'unit':>9} {'jaxcollab':>10} {'reference':>10} {'ratio':>7} {'range':>13}")
  rows = [r for r in rows if r]
  for r in rows:
    print(
      f"{r['metric']:<50} {r['unit']:>9} {r['jax']:>10.1f} {r['reference']:>10.1f} {r['ratio']:>6.2f}x "
      f"{r['ratio_min']:>5.2f}-{r['ratio_max']:<5.2f}"
    )
  if compiles:
    print(f"compilations after the first step (train + eval steps): max {max(compiles)}")
  if "loop cnn_digits" in results:
    print(
      f"cnn_digits main job, whole `jaxcollab train` process: "
      f"{statistics.median(v['wall_s'] for v in results['loop cnn_digits']):.1f} s for "
      f"{results['loop cnn_digits'][0]['steps']} steps"
    )
  print("\nmarkdown:\n| measure | jaxcollab | reference | ratio (range over rounds) |\n|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['metric']} | {r['jax']:,.1f} {r['unit']} | {r['reference']:,.1f} {r['unit']} | "
      f"{r['ratio']:.2f}× ({r['ratio_min']:.2f}–{r['ratio_max']:.2f}) |"
    )
  meta = {
    "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
    "machine": platform.processor() or platform.machine(),
    "cpu_model": _cpu_model(),
    "cpus": os.cpu_count(),
    "load_average": os.getloadavg(),
    "threads": args.threads,
    "omp_wait_policy": _env(1)["OMP_WAIT_POLICY"],
    "rounds": rounds,
    "quick": args.quick,
    "python": platform.python_version(),
    "versions": _versions(),
  }
  print(json.dumps(meta))
  path = args.out
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({**meta, "rows": rows, "raw": results}, f, indent=2)
  print(f"wrote {path}")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
  except OSError:
    return ""


def _versions() -> dict[str, str]:
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  out = {}
  for name in ("jax", "jaxlib", "flax", "optax", "grain", "torch", "numpy"):
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


if __name__ == "__main__":
  main()
