"""How much faster is sampling with the KV cache, and does a second `sample` call compile again?

A GPT with gpt_pydocs' dims (4 layers, width 128, byte vocabulary) and a context of 272 continues a
16-byte prompt by 256 tokens, at batch 1 and 8, through `infer.generate`'s one jitted decode loop:
with the cache (one position per step) and without it (each step recomputes the fixed window of 272
positions, the shape the compiled loop needs). If torch and transformers are installed, the same
weights exported as a Hugging Face GPT-2 generate the same greedy tokens with transformers' KV cache,
as a PyTorch reference on the same threads. Weights are random: speed does not depend on them.
Times include feeding the prompt; tokens/s counts new tokens only. Prints a table and writes
benchmarks/results/decode.json.

  python benchmarks/decode.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# As the CLI runs (jaxcollab/main.py): jaxlib's CPU YNNPACK fusions off.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_experimental_ynn_fusion_type=").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import flax.linen as nn
import jax
import jax.monitoring
import numpy as np

from jaxcollab import bundle, export, infer
from jaxcollab import config as config_lib

PROMPT_LEN, NEW_TOKENS, CONTEXT = 16, 256, 272


def _config() -> config_lib.ConfigDict:
  c = config_lib.load_experiment("gpt_pydocs")
  c.model.context, c.model.dropout = CONTEXT, 0.0
  return c


def _seconds(fn, repeats: int) -> float:
  fn()  # Compile and warm up.
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _torch_reference(loaded: bundle.Loaded, prompts: np.ndarray, repeats: int, path: str) -> tuple[float, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 1)
  if not os.path.exists(path):
    export.export(os.path.dirname(path) + "/bundle", path, fmt="hf")
  hf = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
  x = torch.tensor(prompts, dtype=torch.long)
  out = {}

  def run():
    with torch.no_grad():
      out["y"] = hf.generate(
        x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False, use_cache=True, pad_token_id=0
      )

  return _seconds(run, repeats), out["y"][:, PROMPT_LEN:].numpy()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batches", default="1,8")
  args = parser.parse_args()
  config = _config()
  dataset = {
    "name": "pydocs",
    "kind": "text",
    "image_shape": None,
    "num_classes": None,
    "vocab_size": 256,
    "seq_len": CONTEXT,
    "eval_split": "validation",
    "train_size": 0,
    "eval_size": 0,
  }
  model = bundle.build_model(config, dataset)
  variables = nn.unbox(model.init(jax.random.key(0), bundle.example_input(dataset)))
  loaded = bundle.Loaded(model, variables, config, dataset, 0, {})
  results_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
  tmp = os.path.join(results_dir, "decode_model")
  if not os.path.exists(tmp + "/bundle"):
    bundle.write(tmp + "/bundle", loaded, "", {})
  rows = []
  for B in map(int, args.batches.split(",")):
    prompts = np.random.default_rng(B).integers(32, 127, (B, PROMPT_LEN)).astype(np.int32)
    row = {"batch": B}
    for name, use_cache in (("cached", True), ("uncached", False)):
      out = {}
      run = lambda use_cache=use_cache, out=out, prompts=prompts: out.setdefault(
        "tokens",
        infer.generate(model, variables["params"], prompts.tolist(), NEW_TOKENS, temperature=0, use_cache=use_cache),
      )
      # The uncached loop is slow: one timed run is enough to see the ratio.
      seconds = _seconds(run, args.repeats if use_cache else 1)
      row[f"{name} tokens/s"] = round(B * NEW_TOKENS / seconds, 1)
      row[f"{name} tokens"] = out["tokens"]
    row["same tokens"] = bool(np.array_equal(row.pop("cached tokens"), row.pop("uncached tokens")))
    row["speedup"] = round(row["cached tokens/s"] / row["uncached tokens/s"], 1)
    try:
      seconds, hf_tokens = _torch_reference(loaded, prompts, args.repeats, tmp + "/hf")
      row["transformers (KV cache) tokens/s"] = round(B * NEW_TOKENS / seconds, 1)
      row["cached / transformers"] = round(row["cached tokens/s"] / row["transformers (KV cache) tokens/s"], 2)
      ours = infer.generate(model, variables["params"], prompts.tolist(), NEW_TOKENS, temperature=0)
      row["greedy tokens agree with transformers"] = f"{np.mean(hf_tokens == ours):.1%}"
    except ImportError as e:
      row["transformers (KV cache) tokens/s"] = f"skipped ({e.name} not installed)"
    rows.append(row)

  # A second `sample` call in the same process, with another prompt length and settings.
  infer.sample(loaded, "First prompt", max_new_tokens=32, seed=0)
  compiles = []

  def listener(event: str, *_, **__) -> None:
    if event.endswith("backend_compile_duration"):
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  infer.sample(
    loaded,
    "A second, longer prompt",
    max_new_tokens=64,
    temperature=0.8,
    top_k=40,
    top_p=0.95,
    seed=1,
  )
  jax.monitoring.unregister_event_duration_listener(listener)

  keys = list(dict.fromkeys(k for r in rows for k in r))
  print(" | ".join(keys))
  for r in rows:
    print(" | ".join(str(r.get(k, "")) for k in keys))
  print(f"compilations during the second sample call: {len(compiles)}")
  result = {
    "rows": rows,
    "second_call_compiles": len(compiles),
    "prompt_len": PROMPT_LEN,
    "new_tokens": NEW_TOKENS,
    "context": CONTEXT,
    "model": {k: config.model[k] for k in ("num_layers", "num_heads", "embed_dim", "mlp_dim")},
    "machine": {
      "cpus": os.cpu_count(),
      "platform": platform.platform(),
      "jax": jax.__version__,
      "devices": str(jax.devices()),
    },
    "argv": sys.argv,
  }
  os.makedirs(results_dir, exist_ok=True)
  with open(os.path.join(results_dir, "decode.json"), "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
