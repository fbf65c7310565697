"""S seeds trained together (vmapped, one program) against the same S seeds one run at a time.

Each side is what a user runs, in fresh processes with the persistent compilation cache off, so every
side pays its compiles: `jaxcollab sweep --seeds 0-4` (vmapped), the same with `--sequential` (one
process, runs one after another), and five separate `jaxcollab train --config.seed=K` commands. The
sides rotate order between experiments. Prints a table and writes benchmarks/results/sweep_seeds.json.

  python benchmarks/sweep_seeds.py                # mlp_digits (1,000 steps) and gpt_pydocs:smoke
  python benchmarks/sweep_seeds.py --steps 300    # shorter mlp_digits
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sweep(experiment: str, seeds: int, sequential: bool, overrides: list[str]) -> float:
  """Wall seconds of one `jaxcollab sweep` in a fresh process."""
  with tempfile.TemporaryDirectory() as workdir:
    command = [
      sys.executable,
      "-m",
      "jaxcollab.main",
      "sweep",
      "--config",
      experiment,
      "--workdir",
      workdir,
      "--seeds",
      f"0-{seeds - 1}",
      *(["--sequential"] if sequential else []),
      *overrides,
    ]
    env = {**os.environ, "JAXCOLLAB_CACHE": "", "PYTHONPATH": ROOT}
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def _trains(experiment: str, seeds: int, overrides: list[str]) -> float:
  """Wall seconds of `seeds` separate `jaxcollab train` commands, one after another."""
  env = {**os.environ, "JAXCOLLAB_CACHE": "", "PYTHONPATH": ROOT}
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as root:
    for seed in range(seeds):
      command = [
        sys.executable,
        "-m",
        "jaxcollab.main",
        "train",
        "--config",
        experiment,
        "--workdir",
        os.path.join(root, f"seed_{seed}"),
        f"--config.seed={seed}",
        *overrides,
      ]
      subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, default=5, help="S, the seeds per side")
  parser.add_argument("--steps", type=int, default=None, help="train.steps for mlp_digits (default: its 1,000)")
  args = parser.parse_args()
  cases = {"mlp_digits": [f"--config.train.steps={args.steps}"] if args.steps else [], "gpt_pydocs:smoke": []}
  rows = []
  for i, (experiment, overrides) in enumerate(cases.items()):
    sides = {
      "vmapped": functools.partial(_sweep, experiment, args.seeds, False, overrides),
      "sequential": functools.partial(_sweep, experiment, args.seeds, True, overrides),
      "trains": functools.partial(_trains, experiment, args.seeds, overrides),
    }
    names = list(sides)
    seconds = {name: sides[name]() for name in names[i % 3 :] + names[: i % 3]}  # Rotate which side runs first.
    rows.append(
      {
        "experiment": experiment,
        "overrides": overrides,
        "seeds": args.seeds,
        **{f"{k}_s": round(v, 2) for k, v in seconds.items()},
        "speedup_vs_sequential": round(seconds["sequential"] / seconds["vmapped"], 2),
        "speedup_vs_trains": round(seconds["trains"] / seconds["vmapped"], 2),
      }
    )
  print(
    f"{'experiment':<18} {'S':>2} {'vmapped s':>10} {'sequential s':>13} {'S x train s':>12} "
    f"{'vs sequential':>14} {'vs S x train':>13}"
  )
  for r in rows:
    print(
      f"{r['experiment']:<18} {r['seeds']:>2} {r['vmapped_s']:>10.1f} {r['sequential_s']:>13.1f} "
      f"{r['trains_s']:>12.1f} {r['speedup_vs_sequential']:>13.2f}x {r['speedup_vs_trains']:>12.2f}x"
    )
  os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
  path = os.path.join(ROOT, "benchmarks", "results", "sweep_seeds.json")
  with open(path, "w") as f:
    json.dump({"cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows}, f, indent=2)
  print(f"Wrote {path}")


if __name__ == "__main__":
  main()
