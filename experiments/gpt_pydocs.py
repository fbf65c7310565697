"""gpt_pydocs: how well does a small byte-level GPT model English technical prose on a laptop?

Trains a 4-layer GPT on the text of CPython's documentation topics (pydoc_data.topics, ~465 KB,
bundled with Python, so it works offline); the last 10% of the bytes are the validation split.

  jaxcollab train --config experiments/gpt_pydocs.py --workdir runs/gpt_pydocs

Expected: about 1.9 validation bits per byte (perplexity ~3.7) after 1,000 steps, in about 7
minutes on a 2-core CPU; the unigram byte entropy of the validation text is 4.53 bits, so the
model has learned far more than byte frequencies. `:smoke` is a 2-layer toy for tests.
"""

from jaxcollab import config as config_lib


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  config_lib.check_variant(arg, ("smoke",), "gpt_pydocs")
  c = config_lib.defaults()
  c.dataset.name = "pydocs"
  c.dataset.seq_len = 128  # Bytes per training window.
  c.model.name = "gpt"
  c.model.activation = "gelu"
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.embed_dim = 128
  c.model.mlp_dim = 512
  c.model.context = 128
  c.model.dropout = 0.1  # 420 KB of text: without it validation loss rises after ~1,500 steps.
  c.model.tied = True
  c.loss.name = "next_token"
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-3
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 100
  c.optimizer.end_learning_rate = 3e-4
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.99
  c.optimizer.grad_clip = 1.0
  c.train.steps = 1000
  c.train.batch_size = 32
  c.train.eval_batch_size = 64
  c.train.eval_every = 250
  c.train.log_every = 50
  c.checkpoint.every = 500
  if arg == "smoke":
    c.dataset.seq_len = 32
    c.model.num_layers, c.model.num_heads, c.model.embed_dim, c.model.mlp_dim, c.model.context = 2, 2, 32, 64, 32
    c.train.steps, c.train.eval_every, c.train.log_every, c.checkpoint.every = 8, 4, 2, 4
    c.optimizer.warmup_steps = 2
    c.train.batch_size, c.train.eval_batch_size = 8, 64
  return c
