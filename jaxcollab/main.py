"""The `jaxcollab` command: flags in, one library call out; user errors exit 2 with one sentence."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jaxcollab
from jaxcollab import config as config_lib
from jaxcollab import runtime, schema
from jaxcollab.errors import UserError


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="jaxcollab", description=__doc__, allow_abbrev=False)
  sub = parser.add_subparsers(dest="command", required=True)

  train = sub.add_parser(
    "train",
    allow_abbrev=False,
    help="train an experiment into a workdir (resumes if it has checkpoints)",
    description="Train an experiment; extra --config.a.b=VALUE flags override its config.",
  )
  train.add_argument(
    "--config",
    required=True,
    help="experiment file (experiments/cnn_digits.py) or name (cnn_digits); FILE:ARG passes ARG to "
    "get_config, e.g. cnn_digits:smoke",
  )
  train.add_argument("--workdir", required=True, help="run directory: config.json, metrics, checkpoints, plots")
  train.add_argument(
    "--use_nonempty_workdir",
    action="store_true",
    help="write into a non-empty directory that is not a jaxcollab workdir (refused otherwise)",
  )
  dist = train.add_argument_group("several processes (see README 'Scaling out')")
  dist.add_argument(
    "--coordinator_address", default=os.environ.get("JAX_COORDINATOR_ADDRESS"), help="HOST:PORT of process 0"
  )
  dist.add_argument("--num_processes", type=int, default=_env_int("JAX_NUM_PROCESSES"), help="processes in the run")
  dist.add_argument(
    "--process_id", type=int, default=_env_int("JAX_PROCESS_ID"), help="this process, 0..num_processes-1"
  )
  dist.add_argument("--distributed", action="store_true", help="join a cluster JAX detects itself (SLURM, TPU pods)")
  dist.add_argument(
    "--init_timeout",
    type=int,
    default=300,
    help="seconds to wait for the coordinator and the other processes before exiting with code 2",
  )

  ev = sub.add_parser(
    "eval",
    allow_abbrev=False,
    help="re-evaluate a saved step on its eval split",
    description="Evaluate the newest (or --step N) checkpoint of a workdir on its eval split.",
  )
  ev.add_argument("--workdir", required=True, help="run directory, a checkpoint step directory or an exported bundle")
  ev.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")

  sw = sub.add_parser(
    "sweep",
    allow_abbrev=False,
    help="train a grid of config values x seeds, one workdir per run",
    description="Train every cell of a grid x every seed into DIR/<cell>/seed_<k>/; rerunning the "
    "same command skips finished runs and resumes interrupted ones. Extra --config.a.b=VALUE flags "
    "apply to every run.",
  )
  sw.add_argument(
    "--config",
    required=True,
    help="experiment file or name (FILE:ARG passes ARG); its get_sweep() may declare a grid and seeds",
  )
  sw.add_argument("--workdir", required=True, help="sweep directory: sweep.json and one workdir per cell and seed")
  sw.add_argument(
    "--grid",
    action="append",
    default=[],
    metavar="KEY=V1,V2",
    help="a config key and its values, parsed like --config.KEY=VALUE; repeat for more keys",
  )
  sw.add_argument("--seeds", default=None, help="seeds, e.g. 0-4 or 0,1,2 (default: get_sweep()'s, else the config's)")
  sw.add_argument(
    "--sequential",
    action="store_true",
    help="train one run at a time instead of a cell's seeds together in one vmapped program",
  )

  cmp = sub.add_parser(
    "compare",
    allow_abbrev=False,
    help="tabulate and plot runs grouped by the config keys that differ",
    description="Group runs by the config keys that differ (seeds pooled); print mean +- std, 95% "
    "CI and Welch's t-test against a baseline; write comparison.md/.csv/.json and PNGs.",
  )
  cmp.add_argument("paths", nargs="+", metavar="DIR", help="workdirs or sweep directories (searched recursively)")
  cmp.add_argument("--metric", default=None, help="final eval metric to rank by (default: accuracy or bits_per_byte)")
  cmp.add_argument("--mode", default=None, choices=("max", "min"), help="whether larger is better (default: by metric)")
  cmp.add_argument("--baseline", default=None, help="group every other group is tested against (default: the best)")
  cmp.add_argument("--out", default=None, help="where the tables and PNGs go (default: the common directory of DIR)")
  cmp.add_argument(
    "--activations",
    action="store_true",
    help="also tabulate and plot per-layer activation statistics on a fixed probe batch",
  )

  ck = sub.add_parser(
    "cka",
    allow_abbrev=False,
    help="linear CKA between the layers of two runs, as a heat map",
    description="Linear CKA between every layer of run A and every layer of run B on the same "
    "probe batch (the first eval examples); prints the matrix and writes a heat map PNG.",
  )
  ck.add_argument("a", metavar="A", help="workdir of the first run")
  ck.add_argument("b", metavar="B", help="workdir of the second run")
  ck.add_argument("--out", default=None, help="PNG path (default: A/plots/cka.png)")

  ins = sub.add_parser(
    "inspect",
    allow_abbrev=False,
    help="show a checkpoint's steps, config, metadata and parameters",
    description="Show the steps, config, metadata, metrics and parameter tree of a checkpoint.",
  )
  ins.add_argument("path", help="workdir, its checkpoints/ directory, or one step directory")
  ins.add_argument("--step", type=int, default=None, help="step to describe (default: newest)")
  ins.add_argument("--json", action="store_true", help="print one JSON object instead of text")
  _add_use_commands(sub)
  return parser


def _add_use_commands(sub) -> None:
  """sample, predict, export: the commands that use a trained model (README 'Use a trained model')."""
  source = "run directory, a checkpoint step directory or an exported bundle"
  sa = sub.add_parser(
    "sample",
    allow_abbrev=False,
    help="generate text from a GPT run or bundle",
    description="Continue a prompt with a GPT's KV cache; a single sample streams to stdout.",
  )
  sa.add_argument("--workdir", required=True, help=source)
  sa.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  sa.add_argument("--prompt", required=True, help="text to continue (UTF-8; the model reads bytes)")
  sa.add_argument("--max-new-tokens", type=int, default=200, help="bytes to generate per sample")
  sa.add_argument("--temperature", type=float, default=1.0, help="softmax temperature; 0 = greedy")
  sa.add_argument("--top-k", type=int, default=0, help="sample among the K likeliest bytes; 0 = all")
  sa.add_argument("--top-p", type=float, default=1.0, help="nucleus: smallest set with mass >= P, in (0, 1]")
  sa.add_argument("--num-samples", type=int, default=1, help="independent samples, decoded as one batch")
  sa.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same text")

  pr = sub.add_parser(
    "predict",
    allow_abbrev=False,
    help="classify images with an image-model run or bundle",
    description="Top classes for PNG/JPEG/.npy files, resized and scaled as in training.",
  )
  pr.add_argument("--workdir", required=True, help=source)
  pr.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  pr.add_argument("files", nargs="+", help="PNG, JPEG (anything Pillow reads) or .npy files")
  pr.add_argument("--top-k", type=int, default=3, help="classes shown per image")
  pr.add_argument("--invert", action="store_true", help="swap light and dark (dark ink on white paper)")
  pr.add_argument("--json", action="store_true", help="print one JSON list instead of text")

  ex = sub.add_parser(
    "export",
    allow_abbrev=False,
    help="write a step as a bundle or a Hugging Face GPT-2",
    description="Write a self-contained bundle (safetensors, config, model card) or, with "
    "--format hf, a transformers GPT2LMHeadModel directory.",
  )
  ex.add_argument("--workdir", required=True, help=source)
  ex.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  ex.add_argument("--out", required=True, help="new directory to write")
  ex.add_argument("--format", default="bundle", choices=("bundle", "hf"), help="bundle (default) or hf")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value and value.lstrip("-").isdigit() else None


def _train(args: argparse.Namespace, overrides: list[str]) -> None:
  # The whole config is checked before jax is imported: every config mistake is one sentence in well
  # under a second (tests/schema_test.py).
  config = config_lib.apply_overrides(config_lib.load_experiment(args.config), overrides)
  config = schema.resolve(config, config_lib.override_keys(overrides))
  runtime.configure()
  runtime.pause_gc()  # For the start-up: the loop resumes it after the first step, and so does an error.
  try:
    _train_configured(args, config)
  finally:
    runtime.resume_gc()


def _train_configured(args: argparse.Namespace, config: config_lib.ConfigDict) -> None:
  # Imported here, not at the top: XLA_FLAGS (set by configure) must be in place before jax starts.
  import jax  # pylint: disable=g-import-not-at-top

  from jaxcollab import sharding, train, workdir  # pylint: disable=g-import-not-at-top

  # Before anything touches a device: jax.distributed must start before the backends do.
  if args.distributed or args.coordinator_address or args.num_processes is not None or args.process_id is not None:
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id, args.init_timeout)
    sharding.check_same_across_processes(os.path.abspath(args.workdir), "--workdir")
  workdir.quiet_terminal()  # Library tracebacks (orbax after a failed write) go to WORKDIR/jaxcollab.log.
  start = time.perf_counter()
  result = train.train_and_evaluate(config, args.workdir, use_nonempty_workdir=args.use_nonempty_workdir)
  if not result:  # Stopped by a signal; train_and_evaluate has said where it saved.
    return
  if jax.process_index() == 0:
    summary = ", ".join(f"{k} {v:.4f}" for k, v in result.items())
    print(f"Final evaluation: {summary} ({time.perf_counter() - start:.0f} s); results in {args.workdir}")


def _eval(args: argparse.Namespace) -> None:
  runtime.configure()
  from jaxcollab import evaluate  # pylint: disable=g-import-not-at-top  # After configure: see _train.

  result = evaluate.evaluate_checkpoint(args.workdir, args.step)
  print(json.dumps(result, indent=2))


def _inspect(args: argparse.Namespace) -> None:
  runtime.configure()
  from jaxcollab import reload  # pylint: disable=g-import-not-at-top  # After configure: see _train.

  info = reload.describe(args.path, args.step)
  if args.json:
    print(json.dumps(info, indent=2))
    return
  meta, config = info["meta"], info["config"]
  print(f"{info['directory']}: steps {', '.join(map(str, info['steps']))}; showing step {info['step']}")
  print(
    f"model {config['model']['name']} on {config['dataset']['name']}, seed {config['seed']}; saved on "
    f"{meta.get('devices')} {meta.get('platform')} device(s), {meta.get('processes')} process(es), mesh "
    f"{meta.get('mesh')}"
  )
  last = meta.get("last_eval")
  if meta.get("eval"):
    print(f"eval at this step: {meta['eval']}")
  else:
    print(f"eval: none at this step; newest: step {last['step']} {last['metrics']}" if last else "eval: none yet")
  print(f"files: {info['integrity']}")
  print("versions: " + ", ".join(f"{k} {v}" for k, v in (meta.get("versions") or {}).items()))
  totals = "; ".join(
    f"{k} {t['count']:,} values in {t['arrays']} arrays, {t['bytes'] / 2**20:.2f} MiB"
    for k, t in sorted(info["totals"].items(), key=lambda kv: kv[0] != "params")
  )
  print(f"{info['param_count']:,} parameters; state: {totals}")
  shown = [a for a in info["arrays"] if a["path"].split("/")[0] in ("params", "batch_stats")]
  width = max((len(a["path"]) for a in shown), default=0)
  for a in shown:
    print(
      f"  {a['path']:<{width}}  {str(tuple(a['shape'])):>16}  {a['dtype']:>8}  {a['count']:>12,}  {a['bytes']:>13,} B"
    )
  for row in info["metrics"]["at_step"] or info["metrics"]["last"]:
    print("  metrics:", json.dumps(row))
  print("(--json gives every array, optimizer state included, and the full config)")


def _sweep(args: argparse.Namespace, overrides: list[str]) -> int:
  runtime.configure()
  from jaxcollab import sweep  # pylint: disable=g-import-not-at-top  # After configure: see _train.

  return sweep.sweep(args.config, args.workdir, args.grid, args.seeds, overrides, args.sequential)


def _compare(args: argparse.Namespace) -> None:
  runtime.configure()
  from jaxcollab import compare  # pylint: disable=g-import-not-at-top  # After configure: see _train.

  result, paths = compare.compare(args.paths, args.metric, args.mode, args.baseline, args.out, args.activations)
  print(compare.markdown(result))
  if "activations" in paths:
    with open(paths["activations"]) as f:
      print(f.read())
  print("Wrote " + ", ".join(paths.values()))


def _cka(args: argparse.Namespace) -> None:
  runtime.configure()
  from jaxcollab import probe  # pylint: disable=g-import-not-at-top  # After configure: see _train.

  matrix, out = probe.cka(args.a, args.b, args.out)
  print(json.dumps(matrix.round(4).tolist()))
  print(f"Wrote {out}")


def _sample(args: argparse.Namespace) -> None:
  runtime.configure()

  jaxcollab.sample(
    args.workdir,
    args.prompt,
    step=args.step,
    max_new_tokens=args.max_new_tokens,
    temperature=args.temperature,
    top_k=args.top_k,
    top_p=args.top_p,
    num_samples=args.num_samples,
    seed=args.seed,
    stream=sys.stdout,
  )


def _predict(args: argparse.Namespace) -> None:
  runtime.configure()

  results = jaxcollab.predict(args.workdir, args.files, step=args.step, top_k=args.top_k, invert=args.invert)
  if args.json:
    print(json.dumps(results, indent=2))
    return
  for r in results:
    print(f"{r['input']}: " + ", ".join(f"{t['name']} {t['probability']:.3f}" for t in r["top"]))


def _export(args: argparse.Namespace) -> None:
  runtime.configure()
  from jaxcollab import export  # pylint: disable=g-import-not-at-top  # After configure: see _train.

  out = export.export(args.workdir, args.out, step=args.step, fmt=args.format)
  print(
    f"Wrote {out}"
    + (
      " (load it with transformers.GPT2LMHeadModel.from_pretrained)"
      if args.format == "hf"
      else " (jaxcollab.load, or --workdir of eval/sample/predict)"
    )
  )


def main(argv: list[str] | None = None) -> int:
  """Runs one subcommand; returns the process exit code."""
  if argv is None:  # The process's own command line: start it again with huge pages (runtime.py says why).
    runtime.restart_with_huge_pages()
  argv = sys.argv[1:] if argv is None else argv
  parser = _parser()
  args, unknown = parser.parse_known_args(argv)
  overrides = [u for u in unknown if u.startswith("--config.")]
  stray = [u for u in unknown if not u.startswith("--config.")]
  if stray or (overrides and args.command not in ("train", "sweep")):
    parser.error(f"unrecognized arguments: {' '.join(stray or overrides)}")
  commands = {
    "train": lambda: _train(args, overrides),
    "eval": lambda: _eval(args),
    "inspect": lambda: _inspect(args),
    "sweep": lambda: _sweep(args, overrides),
    "compare": lambda: _compare(args),
    "cka": lambda: _cka(args),
    "sample": lambda: _sample(args),
    "predict": lambda: _predict(args),
    "export": lambda: _export(args),
  }
  try:
    code = commands[args.command]()
  except (UserError, FileNotFoundError) as e:
    print(f"jaxcollab {args.command}: error: {e}", file=sys.stderr)
    return 2
  return code or 0


if __name__ == "__main__":
  sys.exit(main())
