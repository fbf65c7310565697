"""What the activations do: per-layer statistics and linear CKA of a run on a fixed probe batch.

The probe batch is the first `n` examples of the eval split, the same for every run of a dataset.
Activations are read through flax's `capture_intermediates`: the outputs of the layers that feed
the model's activation function (pre-activations), to which the activation is then applied.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from matplotlib.figure import Figure

from jaxcollab import data, losses, plots, reload
from jaxcollab import run as run_lib
from jaxcollab.config import ConfigDict
from jaxcollab.errors import UserError
from jaxcollab.models import activations

PyTree = Any
PROBE_FILE = "activations.json"
PROBE_SIZE = 256  # Examples (text: windows) in the probe batch.

# Per model: which captured layer outputs go into the activation function (path of module names).
ACTIVATED: dict[str, Callable[[tuple[str, ...]], bool]] = {
  "mlp": lambda path: path == ("hidden",),
  "cnn": lambda path: len(path) == 1 and (path[0].startswith("conv_") or path[0] == "dense"),
  "gpt": lambda path: path[-2:] == ("mlp", "fc"),
}
# Where an activation is flat: |tanh| > 0.99, sigmoid < 0.01 or > 0.99. Others do not saturate on both sides.
SATURATED: dict[str, Callable[[jax.Array], jax.Array]] = {
  "tanh": lambda y: jnp.abs(y) > 0.99,
  "sigmoid": lambda y: (y < 0.01) | (y > 0.99),
}
STATS = ("mean", "std", "zero_frac", "saturated_frac", "grad_norm")


def _stats(y: jax.Array, activation: str) -> dict[str, jax.Array]:
  y = y.astype(jnp.float32)
  saturated = jnp.mean(SATURATED[activation](y)) if activation in SATURATED else jnp.float32(jnp.nan)
  return {"mean": jnp.mean(y), "std": jnp.std(y), "zero_frac": jnp.mean(y == 0), "saturated_frac": saturated}


def activation_stats(y: jax.Array, activation: str) -> dict[str, float]:
  """mean, std, fraction of exact zeros and fraction saturated (NaN where `activation` has no saturation)."""
  return {k: float(v) for k, v in _stats(jnp.asarray(y), activation).items()}


def probe_batch(dataset: data.Dataset, n: int = PROBE_SIZE) -> dict[str, np.ndarray]:
  """The first `n` examples of the eval split (fewer if the split is smaller), without padding rows."""
  batch = next(iter(dataset.eval_batches(batch_size=n)))
  keep = np.asarray(batch["mask"]).reshape(len(batch["mask"]), -1).max(axis=1) > 0
  return {k: np.asarray(v)[keep] for k, v in batch.items()}


def _captured(model, variables: PyTree, x: jax.Array) -> tuple[jax.Array, dict[tuple[str, ...], jax.Array]]:
  """(logits, {module path: output}) for every module call of one forward pass."""
  logits, state = model.apply(variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"]))
  return logits, {path[:-1]: outs[0] for path, outs in flat.items() if path[-1] == "__call__" and len(path) > 1}


def layer_outputs(model, variables: PyTree, x: jax.Array, model_name: str, activation: str) -> dict[str, jax.Array]:
  """'layer path' -> post-activation output of each activated layer, plus 'logits', on the probe inputs."""
  if model_name not in ACTIVATED:
    raise UserError(f"Activation probes know models {', '.join(ACTIVATED)}, not {model_name!r}.")
  logits, outs = _captured(model, variables, x)
  act = activations.get(activation)
  layers = {"/".join(p): act(v) for p, v in outs.items() if ACTIVATED[model_name](p)}
  layers["logits"] = logits
  return layers


@functools.lru_cache(maxsize=16)
def _probe_fn(model, model_name: str, activation: str, loss_json: str) -> Callable:
  """Jitted (variables, batch) -> per-layer statistics; cached so that the seeds of a group compile once."""
  loss_fn = losses.get_loss(ConfigDict(json.loads(loss_json)))

  def fn(variables, batch):
    x = run_lib.model_input(batch)
    layers = layer_outputs(model, variables, x, model_name, activation)
    mask = batch["mask"]

    def loss_of(params):
      logits = model.apply({**variables, "params": params}, x, train=False)
      return jnp.sum(loss_fn(logits, batch) * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    grads = jax.grad(loss_of)(variables["params"])
    out = {}
    for name, y in layers.items():
      if name != "logits":
        node = grads
        for k in name.split("/"):
          node = node[k]
        out[name] = {**_stats(y, activation), "grad_norm": optax.tree.norm(node)}
    return out

  return jax.jit(fn)


def probe(model, variables: PyTree, config, batch: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
  """Per activated layer: activation statistics on `batch` and the norm of the loss gradient of its parameters."""
  fn = _probe_fn(model, config.model.name, config.model.activation, json.dumps(config.loss.to_dict(), sort_keys=True))
  out = jax.device_get(fn(variables, batch))
  return {layer: {k: float(v) for k, v in values.items()} for layer, values in out.items()}


def probe_run(workdir: str, n: int = PROBE_SIZE) -> dict[str, Any]:
  """A workdir's activation statistics at its newest step, cached in WORKDIR/activations.json."""
  ref = reload.resolve(workdir)
  path = os.path.join(workdir, PROBE_FILE)
  if os.path.exists(path):
    with open(path) as f:
      cached = json.load(f)
    if cached.get("step") == ref.step and cached.get("probe_size") == n:
      return cached
  model, variables, config = reload.load(workdir)
  batch = probe_batch(data.get_dataset(config), n)
  result = {"step": ref.step, "probe_size": n, "layers": probe(model, variables, config, batch)}
  with open(path, "w") as f:
    json.dump(result, f, indent=2, allow_nan=True)
  return result


# ---- Linear CKA (Kornblith et al. 2019) --------------------------------------------------------


def linear_cka(x_NxA: np.ndarray, y_NxB: np.ndarray) -> float:
  """Linear CKA of two representations of the same N examples: HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y))."""
  x = np.asarray(x_NxA, np.float64).reshape(len(x_NxA), -1)
  y = np.asarray(y_NxB, np.float64).reshape(len(y_NxB), -1)
  if len(x) != len(y):
    raise ValueError(f"CKA needs the same examples on both sides; got {len(x)} and {len(y)} rows.")
  x = x - x.mean(0)
  y = y - y.mean(0)
  # Gram form: N x N, cheaper than the feature form when layers are wider than the probe batch.
  kx, ky = x @ x.T, y @ y.T
  return float(np.sum(kx * ky) / max(np.linalg.norm(kx) * np.linalg.norm(ky), 1e-300))


def _rows(x: jax.Array) -> int:
  """Examples for images; tokens for an LM, whose activations are [B*L, F] or [B, L, F]."""
  return x.shape[0] * x.shape[1] if jnp.issubdtype(x.dtype, jnp.integer) else x.shape[0]


def cka_runs(workdir_a: str, workdir_b: str, n: int = PROBE_SIZE) -> tuple[np.ndarray, list[str], list[str]]:
  """CKA between every layer of run A and every layer of run B on the shared probe batch."""
  reps = []
  for w in (workdir_a, workdir_b):
    model, variables, config = reload.load(w)
    reps.append((config, model, variables))
  if reps[0][0].dataset.name != reps[1][0].dataset.name:
    raise UserError(
      f"The runs trained on different datasets ({reps[0][0].dataset.name} and "
      f"{reps[1][0].dataset.name}); CKA compares representations of the same probe examples."
    )
  batch = probe_batch(data.get_dataset(reps[0][0]), n)
  x = run_lib.model_input(batch)
  layers = [layer_outputs(m, v, x, c.model.name, c.model.activation) for c, m, v in reps]
  rows = _rows(x)
  a = {k: np.asarray(v).reshape(rows, -1) for k, v in layers[0].items()}
  b = {k: np.asarray(v).reshape(rows, -1) for k, v in layers[1].items()}
  matrix = np.array([[linear_cka(va, vb) for vb in b.values()] for va in a.values()])
  return matrix, list(a), list(b)


def plot_cka(matrix: np.ndarray, names_a: list[str], names_b: list[str], path: str, title: str = "") -> None:
  """Heat map of a CKA matrix (rows: layers of A, columns: layers of B), values annotated."""
  fig = Figure(figsize=(1.2 * len(names_b) + 3, 0.9 * len(names_a) + 2))
  ax = fig.subplots()
  image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  ax.set_xticks(range(len(names_b)), names_b, rotation=45, ha="right", fontsize="small")
  ax.set_yticks(range(len(names_a)), names_a, fontsize="small")
  for i in range(len(names_a)):
    for j in range(len(names_b)):
      ax.text(
        j,
        i,
        f"{matrix[i, j]:.2f}",
        ha="center",
        va="center",
        fontsize=8,
        color="black" if matrix[i, j] > 0.5 else "white",
      )
  ax.set_xlabel("B")
  ax.set_ylabel("A")
  ax.set_title(title or "linear CKA")
  fig.tight_layout()
  plots.save(fig, path)


def cka(workdir_a: str, workdir_b: str, out: str | None = None, n: int = PROBE_SIZE) -> tuple[np.ndarray, str]:
  """`jaxcollab cka A B`: the matrix, and its heat map written to `out` (default A/plots/cka.png)."""
  matrix, names_a, names_b = cka_runs(workdir_a, workdir_b, n)
  out = out or os.path.join(workdir_a, "plots", "cka.png")
  plot_cka(matrix, names_a, names_b, out, title=f"linear CKA, {n} probe examples")
  return matrix, out
