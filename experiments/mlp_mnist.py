"""mlp_mnist: the seed article's setup on real MNIST: flatten -> Dense 1024 -> ReLU -> Dense 10, Adam.

The article reports 95.5% test accuracy. Needs MNIST prepared by TFDS (`tfds build mnist` on a
machine with internet, then --config.dataset.data_dir=DIR if it is not ~/tensorflow_datasets).

  jaxcollab train --config experiments/mlp_mnist.py --workdir runs/mlp_mnist

Expected: about 98% test accuracy after 5 epochs; a few minutes on a laptop CPU.
"""

from jaxcollab import config as config_lib


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  config_lib.check_variant(arg, ("smoke",), "mlp_mnist")
  c = config_lib.defaults()
  c.dataset.name = "mnist"
  c.model.name = "mlp"
  c.model.hidden = 1024
  c.model.activation = "relu"
  c.loss.name = "cross_entropy"
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.train.steps = 2350  # 5 epochs of 60,000 at batch 128.
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.train.eval_every = 470
  c.checkpoint.every = 470
  if arg == "smoke":
    c.train.steps, c.train.eval_every, c.train.log_every, c.checkpoint.every = 10, 5, 5, 5
    c.train.batch_size, c.train.eval_batch_size = 8, 8
  return c
