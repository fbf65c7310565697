"""resnet_cifar10: ResNet-18 (CIFAR stem, BatchNorm) on CIFAR-10 with crop+flip augmentation.

Needs CIFAR-10 prepared by TFDS (`tfds build cifar10`, then --config.dataset.data_dir=DIR if needed).

  jaxcollab train --config experiments/resnet_cifar10.py --workdir runs/resnet_cifar10

Expected: about 93-94% test accuracy after 30 epochs with SGD+momentum and a cosine schedule;
roughly 20-30 minutes on one modern GPU, far too slow for a CPU (use :smoke there).
"""

from jaxcollab import config as config_lib


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  config_lib.check_variant(arg, ("smoke",), "resnet_cifar10")
  c = config_lib.defaults()
  c.dataset.name = "cifar10"
  c.dataset.augment = True  # Random translation (crop) and small rotation...
  c.dataset.flip = True  # ...plus horizontal flips, which suit CIFAR's objects.
  c.model.name = "resnet"
  c.model.depth = 18
  c.model.width = 64
  c.model.stem = "cifar"
  c.loss.name = "cross_entropy"
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = True
  c.optimizer.schedule = "warmup_cosine"
  c.optimizer.warmup_steps = 390
  c.train.steps = 11700  # 30 epochs of 50,000 at batch 128.
  c.train.batch_size = 128
  c.train.eval_batch_size = 500
  c.train.eval_every = 1950
  c.checkpoint.every = 1950
  c.checkpoint.best_metric = "accuracy"
  if arg == "smoke":
    c.model.width = 8
    c.train.steps, c.train.eval_every, c.train.log_every, c.checkpoint.every = 6, 3, 3, 3
    c.optimizer.warmup_steps = 1
    c.train.batch_size, c.train.eval_batch_size = 8, 8
  return c
