"""The Hugging Face GPT-2 export: transformers computes the same logits, or the export refuses clearly."""

import os

import numpy as np
import pytest

from bundle_test import make_loaded
from jaxcollab import bundle, export
from jaxcollab import config as config_lib
from jaxcollab.errors import UserError

TEXT = {
  "name": "pydocs",
  "kind": "text",
  "image_shape": None,
  "num_classes": None,
  "vocab_size": 256,
  "seq_len": 16,
  "eval_split": "validation",
  "train_size": 1,
  "eval_size": 1,
}


def gpt_bundle(tmp_path, activation="gelu", tied=True, scan_layers=False):
  config = config_lib.defaults()
  config.model.name, config.dataset.name, config.model.activation, config.model.tied = "gpt", "pydocs", activation, tied
  config.model.num_layers, config.model.num_heads, config.model.embed_dim, config.model.mlp_dim = 2, 4, 32, 48
  config.model.context, config.dataset.seq_len, config.model.scan_layers = 24, 16, scan_layers
  loaded = make_loaded(config, TEXT)
  path = str(tmp_path / f"{activation}-{tied}-{scan_layers}")
  bundle.write(path, loaded, "", {})
  return path, loaded


@pytest.mark.parametrize("activation, tied, scan_layers", [("gelu", True, False), ("relu", False, True)])
def test_transformers_gives_the_same_logits(tmp_path, activation, tied, scan_layers):
  torch = pytest.importorskip("torch", reason="torch is an optional extra (pip install 'jaxcollab[bench]')")
  transformers = pytest.importorskip("transformers", reason="transformers is an optional extra")
  path, loaded = gpt_bundle(tmp_path, activation, tied, scan_layers)
  out = export.export(path, str(tmp_path / "hf"), fmt="hf")
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  tokens = np.random.default_rng(0).integers(0, 256, (3, 24)).astype(np.int32)
  with torch.no_grad():
    theirs = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
  ours = np.asarray(loaded.model.apply(loaded.variables, tokens))
  assert np.abs(ours).max() > 0.1  # Not trivially equal.
  np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_weights_have_gpt2_names_and_shapes(tmp_path):
  _, loaded = gpt_bundle(tmp_path)
  weights = export.hf_weights(loaded)
  assert weights["transformer.h.1.attn.c_attn.weight"].shape == (32, 96)
  assert weights["transformer.h.0.mlp.c_fc.weight"].shape == (32, 48)
  assert "lm_head.weight" not in weights  # Tied: transformers reuses wte.
  assert export.hf_config(loaded)["activation_function"] == "gelu_new"  # jax's gelu is the tanh form.


def test_what_gpt2_cannot_express_is_refused(tmp_path):
  path, _ = gpt_bundle(tmp_path, activation="softplus")
  with pytest.raises(UserError, match="GPT-2 in transformers has no 'softplus' activation"):
    export.export(path, str(tmp_path / "hf"), fmt="hf")
  assert not os.path.exists(tmp_path / "hf")
  config = config_lib.defaults()  # An MLP classifier.
  classifier = make_loaded(config, {"name": "digits", "kind": "image", "image_shape": (8, 8, 1), "num_classes": 10})
  bundle.write(str(tmp_path / "mlp"), classifier, "", {})
  with pytest.raises(UserError, match="classifier"):
    export.export(str(tmp_path / "mlp"), str(tmp_path / "hf2"), fmt="hf")
