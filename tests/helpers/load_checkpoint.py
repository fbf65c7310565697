"""Loads a checkpoint with `jaxcollab.load` in a fresh process and saves its variables as .npz.

  python tests/helpers/load_checkpoint.py PATH STEP OUT.npz

Run with any XLA device count; prints one JSON line: devices, where the variables live, model.
"""

import json
import sys

import jax
import numpy as np

import jaxcollab
from jaxcollab import run as run_lib


def main(path: str, step: str, out: str) -> None:
  model, variables, config = jaxcollab.load(path, int(step))
  flat = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(variables)[0]}
  np.savez(out, **flat)
  from jaxcollab import data  # pylint: disable=g-import-not-at-top

  info = data.get_dataset(config).info
  logits = model.apply(variables, run_lib.model_input(run_lib.example_batch(info)), train=False)
  print(
    json.dumps(
      {
        "devices": jax.device_count(),
        "on": sorted({str(d) for x in jax.tree.leaves(variables) for d in x.devices()}),
        "model": config.model.name,
        "finite": bool(np.isfinite(np.asarray(logits)).all()),
      }
    )
  )


if __name__ == "__main__":
  main(*sys.argv[1:])
