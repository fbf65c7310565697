"""Does turning off jaxlib's CPU YNNPACK fusions speed up our train steps? (Why main.py sets the flag.)

Runs the cnn_digits and gpt_pydocs train steps in two child processes, one with jaxlib's default
CPU fusions and one with `--xla_cpu_experimental_ynn_fusion_type=` (off), on the same machine in the
same run, and reports steps/s and the ratio. Prints a table and writes benchmarks/results/ynn_fusion.json.

  python benchmarks/ynn_fusion.py [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

CHILD = r"""
import json, sys, time
import jax
from jaxcollab import config as config_lib, sharding, train
from jaxcollab import run as run_lib
name, steps = sys.argv[1], int(sys.argv[2])
config = config_lib.load_experiment(name)
config.train.steps = steps + 10
run = run_lib.build(config, jax.devices()[:1])
state, step = run.init_state(), train.jit_train_step(run)
it = run.dataset.train_iterator(batch_size=config.train.batch_size, seed=0)
put = sharding.batch_sharding(run.mesh)
batches = [sharding.to_global(next(it), put) for _ in range(10)]
for b in batches[:3]:
  state, m = step(state, b)  # Compile and warm up.
jax.block_until_ready(m)
t = time.perf_counter()
for i in range(steps):
  state, m = step(state, batches[i % len(batches)])
jax.block_until_ready(m)
print(json.dumps({"steps_per_s": steps / (time.perf_counter() - t)}))
"""

VARIANTS = {"ynn fusions on (jaxlib default)": "", "ynn fusions off": "--xla_cpu_experimental_ynn_fusion_type="}


def measure(experiment: str, xla_flags: str, steps: int) -> float:
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  out = subprocess.run(
    [sys.executable, "-c", CHILD, experiment, str(steps)], env=env, check=True, capture_output=True, text=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--experiments", default="cnn_digits,gpt_pydocs")
  args = parser.parse_args()
  rows = []
  for experiment in args.experiments.split(","):
    speeds = {label: measure(experiment, flags, args.steps) for label, flags in VARIANTS.items()}
    on, off = speeds.values()
    rows.append(
      {
        "experiment": experiment,
        **{f"{k} steps/s": round(v, 2) for k, v in speeds.items()},
        "speedup with fusions off": round(off / on, 3),
      }
    )
  print(f"{'experiment':<14} {'fusions on steps/s':>20} {'fusions off steps/s':>20} {'off/on':>8}")
  for r in rows:
    vals = list(r.values())
    print(f"{vals[0]:<14} {vals[1]:>20.2f} {vals[2]:>20.2f} {vals[3]:>8.3f}")
  os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
  path = os.path.join(os.path.dirname(__file__), "results", "ynn_fusion.json")
  with open(path, "w") as f:
    json.dump(
      {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "steps": args.steps,
        "rows": rows,
      },
      f,
      indent=2,
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
