"""S seeds trained together (vmapped, one program) against the same S seeds one run at a time.

Each side is the user's command, `jaxcollab sweep --seeds 0-4` with and without `--sequential`, in a
fresh process with the persistent compilation cache off, so both pay their compiles; the sides
alternate order between experiments. Prints a table and writes benchmarks/results/sweep_seeds.json.

  python benchmarks/sweep_seeds.py                # mlp_digits (1,000 steps) and gpt_pydocs:smoke
  python benchmarks/sweep_seeds.py --steps 300    # shorter mlp_digits
"""

from __future__ import annotations

import argparse
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
    command = [sys.executable, "-m", "jaxcollab.main", "sweep", "--config", experiment, "--workdir", workdir,
               "--seeds", f"0-{seeds - 1}", *(["--sequential"] if sequential else []), *overrides]
    env = {**os.environ, "JAXCOLLAB_CACHE": "", "PYTHONPATH": ROOT}
    start = time.perf_counter()
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
    order = (True, False) if i % 2 else (False, True)  # Alternate which side runs first.
    seconds = {seq: _sweep(experiment, args.seeds, seq, overrides) for seq in order}
    rows.append({"experiment": experiment, "overrides": overrides, "seeds": args.seeds,
                 "vmapped_s": round(seconds[False], 2), "sequential_s": round(seconds[True], 2),
                 "speedup": round(seconds[True] / seconds[False], 2)})
  print(f"{'experiment':<20} {'S':>2} {'vmapped s':>10} {'sequential s':>13} {'speedup':>8}")
  for r in rows:
    print(f"{r['experiment']:<20} {r['seeds']:>2} {r['vmapped_s']:>10.1f} {r['sequential_s']:>13.1f} "
          f"{r['speedup']:>7.2f}x")
  os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
  path = os.path.join(ROOT, "benchmarks", "results", "sweep_seeds.json")
  with open(path, "w") as f:
    json.dump({"cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows}, f, indent=2)
  print(f"Wrote {path}")


if __name__ == "__main__":
  main()
