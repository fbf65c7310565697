"""The GPT's config part: its task, sizes, config keys and their checks, importable before jax."""

from __future__ import annotations

import ml_collections

from jaxcollab.errors import ConfigError

ATTENTION_CHOICES = ("auto", "xla", "cudnn")  # Values of the config key model.attention.

GPT_SIZES: dict[str, dict[str, int]] = {
  "tiny": dict(num_layers=2, num_heads=2, embed_dim=64, mlp_dim=256, context=256),
  "small": dict(num_layers=4, num_heads=4, embed_dim=128, mlp_dim=512, context=256),
  "gpt2-124m": dict(num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072, context=1024),
  "gpt2-medium": dict(num_layers=24, num_heads=16, embed_dim=1024, mlp_dim=4096, context=1024),
  "gpt2-large": dict(num_layers=36, num_heads=20, embed_dim=1280, mlp_dim=5120, context=1024),
  "gpt2-xl": dict(num_layers=48, num_heads=25, embed_dim=1600, mlp_dim=6400, context=1024),
}
DIMS = ("num_layers", "num_heads", "embed_dim", "mlp_dim", "context")

TASK = "text"
# Read back on any machine with these: the attention kernel changes speed, not the model, and a run
# trained with cuDNN attention on a GPU must load on a laptop CPU.
PORTABLE = {"attention": "auto"}
# Config keys behind the logical axis names, named when a mesh cannot split that axis.
AXIS_KEYS = {
  "heads": "model.num_heads",
  "mlp": "model.mlp_dim",
  "embed": "model.embed_dim",
  "vocab": "the vocabulary size",
}


def config_fields() -> ml_collections.ConfigDict:
  """The model.* keys the GPT reads besides name, activation and dtype, with their defaults."""
  c = ml_collections.ConfigDict()
  c.size = ""  # named size (gpt2-124m, gpt2-medium, tiny, small, ...) or "" to use the five fields below.
  c.num_layers = 4  # int > 0: transformer blocks.
  c.num_heads = 4  # int > 0: attention heads; must divide embed_dim.
  c.embed_dim = 128  # int > 0: residual stream width.
  c.mlp_dim = 512  # int > 0: hidden width of each block's MLP.
  c.context = 256  # int > 0: learned positions (max sequence length); >= dataset.seq_len.
  c.dropout = 0.0  # float in [0, 1): dropout on the embeddings and each residual branch.
  c.remat = False  # bool: rematerialise each block in the backward pass (saves memory).
  c.tied = True  # bool: the output head shares the token embedding matrix.
  c.attention = "auto"  # auto (cuDNN fused attention on NVIDIA GPUs in bfloat16, XLA elsewhere) | xla | cudnn.
  c.scan_layers = False  # bool: one nn.scan over the blocks (compile time flat in depth; stacked params).
  return c


def dims(model: ml_collections.ConfigDict) -> dict[str, int]:
  """Shape fields: from GPT_SIZES[model.size] when a size is named, else from the model fields."""
  if model.get("size", ""):
    if model.size not in GPT_SIZES:
      raise ConfigError(f"Unknown model.size {model.size!r}; choose one of {', '.join(sorted(GPT_SIZES))}.")
    return dict(GPT_SIZES[model.size])
  return {k: int(model[k]) for k in DIMS}


def check(model: ml_collections.ConfigDict, dataset: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for a value the GPT cannot use."""
  d = dims(model)
  for key in DIMS:
    if d[key] <= 0:
      raise ConfigError(f"model.{key} must be a positive integer, got {d[key]}.")
  if d["embed_dim"] % d["num_heads"]:
    raise ConfigError(f"model.num_heads ({d['num_heads']}) must divide model.embed_dim ({d['embed_dim']}).")
  if not 0 <= model.dropout < 1:
    raise ConfigError(f"model.dropout must be in [0, 1), got {model.dropout}.")
  if dataset.seq_len > d["context"]:
    raise ConfigError(
      f"dataset.seq_len ({dataset.seq_len}) exceeds model.context ({d['context']}); raise "
      "model.context or lower dataset.seq_len."
    )
  if model.attention not in ATTENTION_CHOICES:
    raise ConfigError(f"model.attention must be one of {', '.join(ATTENTION_CHOICES)}, got {model.attention!r}.")
