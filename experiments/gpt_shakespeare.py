"""gpt_shakespeare: a byte-level GPT on TFDS tiny_shakespeare (nanoGPT's character-level classic).

Needs tiny_shakespeare prepared by TFDS (`tfds build tiny_shakespeare`, then
--config.dataset.data_dir=DIR if it is not ~/tensorflow_datasets).

  jaxcollab train --config experiments/gpt_shakespeare.py --workdir runs/gpt_shakespeare

Expected: validation loss about 1.5 nats/byte (~2.1 bits per byte) after 5,000 steps, as nanoGPT's
6-layer character model; several minutes on a GPU, hours on a laptop CPU.
"""

from jaxcollab import config as config_lib


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  config_lib.check_variant(arg, ("smoke",), "gpt_shakespeare")
  c = config_lib.defaults()
  c.dataset.name = "tiny_shakespeare"
  c.dataset.seq_len = 256
  c.model.name = "gpt"
  c.model.activation = "gelu"
  c.model.num_layers = 6  # nanoGPT's shakespeare_char model: 6 layers, 6 heads, 384 wide.
  c.model.num_heads = 6
  c.model.embed_dim = 384
  c.model.mlp_dim = 1536
  c.model.context = 256
  c.model.dropout = 0.2
  c.loss.name = "next_token"
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 100
  c.optimizer.end_learning_rate = 1e-4
  c.optimizer.weight_decay = 0.1
  c.optimizer.b2 = 0.99
  c.optimizer.grad_clip = 1.0
  c.train.steps = 5000
  c.train.batch_size = 64
  c.train.eval_batch_size = 64
  c.train.eval_every = 500
  c.checkpoint.every = 1000
  if arg == "smoke":
    c.dataset.seq_len = 32
    c.model.num_layers, c.model.num_heads, c.model.embed_dim, c.model.mlp_dim, c.model.context = 2, 2, 32, 64, 32
    c.model.dropout = 0.1
    c.train.steps, c.train.eval_every, c.train.log_every, c.checkpoint.every = 6, 3, 3, 3
    c.optimizer.warmup_steps = 1
    c.train.batch_size, c.train.eval_batch_size = 8, 8
  return c
