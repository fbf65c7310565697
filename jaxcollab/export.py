"""`jaxcollab export`: a run's step as a bundle (safetensors + config + model card) or a Hugging Face GPT-2.

The Hugging Face directory is what `transformers.GPT2LMHeadModel.from_pretrained` reads: config.json
and model.safetensors with GPT-2's names and layouts. Writing it needs neither torch nor transformers.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import safetensors.numpy

from jaxcollab import bundle, reload
from jaxcollab.errors import UserError
from jaxcollab.models import gpt

FORMATS = ("bundle", "hf")
_PROMPT = "The "
# jaxcollab activation -> transformers' ACT2FN name computing the same function (jax's gelu is the tanh form).
HF_ACTIVATIONS = {
  "gelu": "gelu_new",
  "relu": "relu",
  "silu": "silu",
  "swish": "silu",
  "tanh": "tanh",
  "sigmoid": "sigmoid",
  "leaky_relu": "leaky_relu",
  "identity": "linear",
}


def _read_json(path: str) -> dict[str, Any]:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return {}


def _metrics_at(workdir: str, step: int) -> list[dict[str, Any]]:
  rows = []
  try:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      rows = [json.loads(line) for line in f if line.strip()]
  except (OSError, ValueError):
    pass
  return [r for r in rows if r.get("step") == step and r.get("split") != "train"]


def _workdir_of(path: str) -> str:
  """The run directory of a workdir, its checkpoints/ directory or one step directory."""
  path = os.path.abspath(path)
  for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
    if os.path.isfile(os.path.join(candidate, "run.json")) or os.path.isdir(os.path.join(candidate, "checkpoints")):
      return candidate
  return path


def param_count(loaded: bundle.Loaded) -> int:
  return int(sum(np.size(x) for x in bundle.flatten(loaded.variables["params"]).values()))


def _table(shown: list[tuple[str, dict[str, Any]]], eval_split: str) -> list[str]:
  keys = sorted({k for _, m in shown for k in m})
  fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else str(v)
  return [
    f"| split | {' | '.join(keys)} |",
    "|---" * (len(keys) + 1) + "|",
    *(f"| {split} ({eval_split}) | {' | '.join(fmt(m.get(k, '')) for k in keys)} |" for split, m in shown),
  ]


def model_card(loaded: bundle.Loaded, run: dict[str, Any], rows: list[dict[str, Any]], title: str) -> str:
  """README.md for a bundle: what it is, how well it does at this step, and how to make it again."""
  c, d = loaded.config, loaded.dataset
  evals = loaded.meta.get("eval") or {}
  shown = [("eval", evals)] if evals else []
  shown += [
    (r["split"], {k: v for k, v in r.items() if k not in ("step", "split")})
    for r in rows
    if r.get("split") != "eval" or not evals
  ]
  argv = run.get("command", "").split(" ")
  command = " ".join(["jaxcollab", *argv[1:]]) if argv[0] else "(not recorded: run.json is missing)"
  commit = run.get("git_commit")
  dirty = " (with uncommitted changes)" if run.get("git_dirty") else ""
  use = (
    f"jaxcollab sample --workdir THIS_DIR --prompt {_PROMPT!r}"
    if d["kind"] == "text"
    else "jaxcollab predict --workdir THIS_DIR image.png"
  )
  versions = run.get("versions") or loaded.meta.get("versions") or {}
  lines = [
    f"# {title}",
    "",
    (
      f"A `{c.model.name}` model (activation `{c.model.activation}`) trained by jaxcollab on `{d['name']}` "
      f"({d['kind']}), exported at step {loaded.step} of {c.train.steps}; {param_count(loaded):,} parameters."
    ),
    "",
    "## Evaluation at this step",
    "",
    *(
      _table(shown, d.get("eval_split", ""))
      if shown
      else ["No evaluation was recorded at this step; run `jaxcollab eval --workdir THIS_DIR`."]
    ),
    "",
    "## Reproduce",
    "",
    "```",
    command,
    "```",
    "",
    f"jaxcollab at git commit `{commit}`{dirty}." if commit else "The git commit of the training code is unknown.",
    (
      f"The command saves step {loaded.step} on its way if `checkpoint.every` divides it; `config.json` here is the "
      "full resolved config it trained with."
    ),
    "",
    "## Use it",
    "",
    "```",
    use,
    "jaxcollab eval --workdir THIS_DIR",
    "```",
    "",
    (
      "In Python, `model, variables, config = jaxcollab.load('THIS_DIR')` needs neither orbax nor jaxcollab's "
      "training code; `model.safetensors` holds the arrays under their flattened paths."
    ),
    "",
    "## Versions",
    "",
    *([f"- {k} {v}" for k, v in versions.items()] or ["(not recorded)"]),
  ]
  return "\n".join(lines) + "\n"


def hf_config(loaded: bundle.Loaded) -> dict[str, Any]:
  """GPT2Config fields for this GPT; UserError for what GPT-2 cannot express."""
  c = loaded.config.model
  if c.name != "gpt":
    raise UserError(
      f"--format hf writes GPT-2 language models, but this run is a {c.name!r} classifier; "
      "export it as a bundle (--format bundle)."
    )
  if c.activation not in HF_ACTIVATIONS:
    raise UserError(
      f"GPT-2 in transformers has no {c.activation!r} activation (it can express "
      f"{', '.join(sorted(HF_ACTIVATIONS))}); export this run as a bundle instead."
    )
  g = loaded.model.config
  return {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "vocab_size": g.vocab_size,
    "n_positions": g.context,
    "n_embd": g.embed_dim,
    "n_layer": g.num_layers,
    "n_head": g.num_heads,
    "n_inner": g.mlp_dim,
    "activation_function": HF_ACTIVATIONS[c.activation],
    "resid_pdrop": g.dropout,
    "embd_pdrop": g.dropout,
    "attn_pdrop": 0.0,  # No dropout on attention weights.
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False,
    "reorder_and_upcast_attn": False,
    "tie_word_embeddings": bool(g.tied),
    "bos_token_id": None,
    "eos_token_id": None,  # Bytes: no special tokens.
    "torch_dtype": "float32",
  }


def hf_weights(loaded: bundle.Loaded) -> dict[str, np.ndarray]:
  """GPT-2's state dict: Conv1D weights are [in, out] like flax kernels; q, k, v are concatenated."""
  g = loaded.model.config
  p = loaded.variables["params"]
  if g.scan_layers:  # One stacked "blocks" subtree -> block_0 .. block_{N-1}, as GPT-2 numbers its layers.
    p = gpt.unscan_params(p, g.num_layers)
  D = g.embed_dim
  a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
  out = {
    "transformer.wte.weight": a(p["token_embed"]["embedding"]),
    "transformer.wpe.weight": a(p["position_embed"]),
    "transformer.ln_f.weight": a(p["ln_f"]["scale"]),
    "transformer.ln_f.bias": a(p["ln_f"]["bias"]),
  }
  for i in range(g.num_layers):
    b, h = p[f"block_{i}"], f"transformer.h.{i}."
    out.update(
      {
        h + "ln_1.weight": a(b["ln1"]["scale"]),
        h + "ln_1.bias": a(b["ln1"]["bias"]),
        h + "ln_2.weight": a(b["ln2"]["scale"]),
        h + "ln_2.bias": a(b["ln2"]["bias"]),
        # (D, 3, H, K) -> (D, 3D): HF splits the output into q | k | v, each into heads of K.
        h + "attn.c_attn.weight": a(np.reshape(b["attn"]["qkv"]["kernel"], (D, 3 * D))),
        h + "attn.c_attn.bias": a(np.reshape(b["attn"]["qkv"]["bias"], (3 * D,))),
        h + "attn.c_proj.weight": a(np.reshape(b["attn"]["out"]["kernel"], (D, D))),  # (H, K, D) -> (D, D)
        h + "attn.c_proj.bias": a(b["attn"]["out"]["bias"]),
        h + "mlp.c_fc.weight": a(b["mlp"]["fc"]["kernel"]),
        h + "mlp.c_fc.bias": a(b["mlp"]["fc"]["bias"]),
        h + "mlp.c_proj.weight": a(b["mlp"]["proj"]["kernel"]),
        h + "mlp.c_proj.bias": a(b["mlp"]["proj"]["bias"]),
      }
    )
  if not g.tied:
    out["lm_head.weight"] = a(np.transpose(p["head"]["kernel"]))  # nn.Linear stores [out, in].
  return out


def export(path: str, out: str, step: int | None = None, fmt: str = "bundle") -> str:
  """Writes the step of a workdir (or a bundle) to `out` as a bundle or a Hugging Face GPT-2; returns `out`."""
  if fmt not in FORMATS:
    raise UserError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise UserError(f"--out {out!r} already exists and is not an empty directory; choose a new path.")
  loaded = reload.open_model(path, step)
  if fmt == "hf":
    config, weights = hf_config(loaded), hf_weights(loaded)
    os.makedirs(out, exist_ok=True)
    safetensors.numpy.save_file(weights, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(out, "config.json"), "w") as f:
      json.dump(config, f, indent=2)
    return out
  workdir = _workdir_of(path)
  run = _read_json(os.path.join(workdir, "run.json")) if not bundle.is_bundle(path) else loaded.meta.get("run", {})
  rows = _metrics_at(workdir, loaded.step) if not bundle.is_bundle(path) else []
  title = f"{loaded.config.model.name} on {loaded.dataset['name']}, step {loaded.step}"
  card = model_card(loaded, run, rows, title)
  bundle.write(
    out,
    loaded,
    card,
    {
      "eval": loaded.meta.get("eval") or {},
      "metrics_at_step": rows,
      "param_count": param_count(loaded),
      "run": run,
      "versions": loaded.meta.get("versions", {}),
      "source": os.path.abspath(path),
    },
  )
  return out
