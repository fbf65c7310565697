"""ablate_digits: which activation and which loss train the seed article's MLP and a small CNN best on digits?

The seed articles compare ReLU, Sigmoid, Tanh and GELU, and MSE against cross-entropy. This study
crosses both models with five activations and two losses, five seeds each (100 runs):

  jaxcollab sweep --config experiments/ablate_digits.py --workdir runs/ablate_digits
  jaxcollab compare runs/ablate_digits/model=mlp* --out runs/ablate_digits/mlp

The grid lives in get_sweep() below. Both models share one recipe (Adam 1e-3, batch 128, 400 steps,
about 36 epochs of the 1,437 training digits, no augmentation) so that only the grid keys differ.
One run of the base config (MLP, ReLU, cross-entropy):

  jaxcollab train --config experiments/ablate_digits.py --workdir runs/ablate_digits_one

Expected: the 100 runs in about 2.5 minutes on a 2-core CPU (2 min 21 s measured, the seeds of each
cell trained together); the MLP with ReLU and cross-entropy best at 97.9%, the sigmoid CNN at 73-76%
(README "Ablation studies" has the table). `:smoke` is 2 activations x 2 losses x 2 seeds of a few steps.
"""

from jaxcollab import config as config_lib


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  config_lib.check_variant(arg, ("smoke",), "ablate_digits")
  c = config_lib.defaults()
  c.dataset.name = "digits"
  c.dataset.augment = False  # Per-element augmentation would cost more than the steps themselves.
  c.model.name = "mlp"  # Ablate: cnn (its defaults: features (32, 64), dense 256, as cnn_digits).
  c.model.hidden = 1024  # mlp: the seed article's width; dropped for cnn.
  c.model.activation = "relu"  # Ablate: gelu, tanh, sigmoid, silu.
  c.loss.name = "cross_entropy"  # Ablate: mse.
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.train.steps = 400
  c.train.batch_size = 128
  c.train.eval_batch_size = 360  # The whole test split in one batch.
  c.train.eval_every = 50  # Eight points per curve.
  c.train.log_every = 25
  c.checkpoint.every = 400  # Only the final step: 100 runs x several saves would cost minutes.
  c.checkpoint.keep = 1
  if arg == "smoke":
    c.train.steps, c.train.eval_every, c.train.log_every, c.checkpoint.every = 12, 6, 3, 6
    c.train.batch_size = 32
  return c


def get_sweep(arg: str | None = None) -> dict:
  """The study's grid and seeds; `jaxcollab sweep` takes both, and --grid/--seeds replace them."""
  if arg == "smoke":
    return {"grid": {"model.activation": ["relu", "tanh"], "loss.name": ["cross_entropy", "mse"]}, "seeds": [0, 1]}
  return {
    "grid": {
      "model.name": ["mlp", "cnn"],
      "model.activation": ["relu", "gelu", "tanh", "sigmoid", "silu"],
      "loss.name": ["cross_entropy", "mse"],
    },
    "seeds": [0, 1, 2, 3, 4],
  }
