"""cnn_mnist: the Flax-examples MNIST conv net (two 3x3 conv stages, Dense 256) on real MNIST.

Needs MNIST prepared by TFDS (`tfds build mnist`, then --config.dataset.data_dir=DIR if needed).

  jaxcollab train --config experiments/cnn_mnist.py --workdir runs/cnn_mnist

Expected: about 99.2% test accuracy after 5 epochs; tens of minutes on a laptop CPU, a minute on a GPU.
"""

from jaxcollab import config as config_lib


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  config_lib.check_variant(arg, ("smoke",), "cnn_mnist")
  c = config_lib.defaults()
  c.dataset.name = "mnist"
  c.dataset.augment = False
  c.model.name = "cnn"
  c.model.features = (32, 64)
  c.model.dense = 256
  c.loss.name = "cross_entropy"
  c.optimizer.name = "sgd"  # As in flax examples/mnist.
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.train.steps = 2350
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.train.eval_every = 470
  c.checkpoint.every = 470
  if arg == "smoke":
    c.train.steps, c.train.eval_every, c.train.log_every, c.checkpoint.every = 10, 5, 5, 5
    c.train.batch_size, c.train.eval_batch_size = 8, 8
  return c
