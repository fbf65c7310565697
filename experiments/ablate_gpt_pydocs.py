"""ablate_gpt_pydocs: does the GPT's MLP activation (GELU, as GPT-2, vs ReLU vs SiLU) change how well it models prose?

The gpt_pydocs model and recipe (4 layers, 128 wide, byte-level, dropout 0.1) with the MLP
activation swept over gelu, relu and silu, three seeds each (9 runs):

  jaxcollab sweep --config experiments/ablate_gpt_pydocs.py --workdir runs/ablate_gpt_pydocs
  jaxcollab compare runs/ablate_gpt_pydocs --activations

One run of the base config (GELU): jaxcollab train --config experiments/ablate_gpt_pydocs.py --workdir runs/gpt_gelu

Validation bits per byte is the metric (lower is better). Expected, as measured: on one H200 the 9
runs took 96 s (about 80 minutes on a 2-core CPU, each cell's three seeds training together at about
4 s per step); ReLU ended at 2.45 bits per byte, GELU 2.59, SiLU 2.70, both gaps significant over 3
seeds (README, Ablation studies). `:smoke` is the 2-layer toy of gpt_pydocs:smoke with two activations and two seeds.
"""

from jaxcollab import config as config_lib


def get_config(arg: str | None = None) -> config_lib.ConfigDict:
  config_lib.check_variant(arg, ("smoke",), "ablate_gpt_pydocs")
  c = config_lib.load_experiment("gpt_pydocs", arg)  # Its model, data and optimizer, unchanged.
  if arg is None:
    c.train.steps = 400
    c.train.eval_every = 100
    c.checkpoint.every = 400  # Only the final step.
    c.checkpoint.keep = 1
  return c


def get_sweep(arg: str | None = None) -> dict:
  """The study's grid and seeds; --grid and --seeds on the command line replace them."""
  if arg == "smoke":
    return {"grid": {"model.activation": ["gelu", "relu"]}, "seeds": [0, 1]}
  return {"grid": {"model.activation": ["gelu", "relu", "silu"]}, "seeds": [0, 1, 2]}
