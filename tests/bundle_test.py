"""Bundles: what is written loads back exactly, in a process without orbax, and damage is one sentence."""

import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from jaxcollab import bundle, main
from jaxcollab import config as config_lib

ROOT = os.path.join(os.path.dirname(__file__), "..")
RESNET_DATA = {
  "name": "cifar10",
  "kind": "image",
  "image_shape": (8, 8, 3),
  "num_classes": 10,
  "vocab_size": None,
  "seq_len": None,
  "eval_split": "test",
  "train_size": 1,
  "eval_size": 1,
}


def make_loaded(config, dataset, seed=0):
  """A randomly initialised model as `load` would return it (no training needed)."""
  model = bundle.build_model(config, dataset)
  variables = nn.unbox(model.init(jax.random.key(seed), bundle.example_input(dataset), train=False))
  return bundle.Loaded(model, variables, config, dataset, 7, {"eval": {"accuracy": 0.5}, "versions": {}})


@pytest.fixture(scope="module")
def resnet_bundle(tmp_path_factory):
  config = config_lib.defaults()
  config.model.name, config.model.width, config.dataset.name = "resnet", 8, "cifar10"
  loaded = make_loaded(config, RESNET_DATA)
  # BatchNorm statistics away from their init, so that a reader ignoring them would differ.
  stats = jax.tree.map(lambda x: x + np.random.default_rng(0).random(x.shape, np.float32), loaded.variables)
  loaded = bundle.Loaded(loaded.model, stats, config, RESNET_DATA, 7, loaded.meta)
  out = str(tmp_path_factory.mktemp("b") / "resnet")
  bundle.write(out, loaded, "# card\n", {})
  return out, loaded


def test_written_keys_are_flat_paths(resnet_bundle):
  out, loaded = resnet_bundle
  names = set(bundle.flatten(loaded.variables))
  assert any(n.startswith("batch_stats/") for n in names) and all(n.count("/") >= 2 for n in names)
  assert set(os.listdir(out)) == {"bundle.json", "config.json", "model.safetensors", "README.md"}


def test_fresh_process_loads_identical_logits_without_orbax(resnet_bundle, tmp_path):
  out, loaded = resnet_bundle
  x = np.random.default_rng(1).random((2, 8, 8, 3), np.float32)
  np.save(tmp_path / "x.npy", x)
  code = f"""
import sys, numpy as np, jaxcollab
model, variables, config = jaxcollab.load({out!r})
np.save({str(tmp_path / "y.npy")!r}, np.asarray(model.apply(variables, np.load({str(tmp_path / "x.npy")!r}),
                                                            train=False)))
heavy = [m for m in sys.modules if m.split(".")[0] in ("orbax", "grain", "tensorflow_datasets")
         or m in ("jaxcollab.train", "jaxcollab.reload", "jaxcollab.checkpoint", "jaxcollab.data")]
assert not heavy, heavy
"""
  subprocess.run(
    [sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": ROOT}
  )
  expected = loaded.model.apply(loaded.variables, x, train=False)
  np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), np.asarray(expected))


def _damage(path, name):
  with open(os.path.join(path, name), "r+b") as f:
    f.seek(-3, os.SEEK_END)
    f.write(b"xyz")


@pytest.mark.parametrize(
  "how, needle",
  [
    (lambda p: os.remove(os.path.join(p, "model.safetensors")), "has no model.safetensors"),
    (lambda p: os.remove(os.path.join(p, "bundle.json")), "has no bundle.json"),
    (lambda p: _damage(p, "model.safetensors"), "model.safetensors is damaged"),
    (lambda p: _damage(p, "config.json"), "config.json is damaged"),
    (lambda p: _damage(p, "bundle.json"), "bundle.json is damaged"),
  ],
)
def test_damaged_bundle_is_one_sentence_exit_2(resnet_bundle, tmp_path, capsys, how, needle):
  copy = str(tmp_path / "copy")
  shutil.copytree(resnet_bundle[0], copy)
  how(copy)
  assert main.main(["predict", "--workdir", copy, "x.png"]) == 2
  err = capsys.readouterr().err
  assert needle in err and err.count("\n") == 1


def test_weights_that_do_not_fit_the_config_are_refused(resnet_bundle, tmp_path):
  _, loaded = resnet_bundle
  config = config_lib.from_json(config_lib.to_json(loaded.config))
  config.model.width = 16  # The weights were made for width 8.
  wrong = bundle.Loaded(loaded.model, loaded.variables, config, RESNET_DATA, 7, {})
  bundle.write(str(tmp_path / "w"), wrong, "", {})
  with pytest.raises(bundle.BundleError, match="do not fit the model"):
    bundle.read(str(tmp_path / "w"))


@pytest.mark.slow
def test_workdir_to_bundle_to_every_command(tmp_path, capsys):
  """A trained smoke run, exported: the bundle evaluates, samples and reloads like its workdir."""
  work, out = str(tmp_path / "w"), str(tmp_path / "bundle")
  assert (
    main.main(
      [
        "train",
        "--config",
        "gpt_pydocs:smoke",
        "--workdir",
        work,
        "--config.train.steps=4",
        "--config.checkpoint.every=2",
      ]
    )
    == 0
  )
  assert main.main(["export", "--workdir", work, "--step", "2", "--out", out]) == 0
  with open(os.path.join(out, "bundle.json")) as f:
    manifest = json.load(f)
  with open(os.path.join(out, "README.md")) as f:
    card = f.read()
  assert manifest["step"] == 2 and manifest["param_count"] > 0
  with open(os.path.join(work, "run.json")) as f:
    command = json.load(f)["command"]  # The process's argv, here pytest's.
  assert " ".join(command.split(" ")[1:]) in card and f"{manifest['param_count']:,} parameters" in card
  capsys.readouterr()
  assert main.main(["eval", "--workdir", os.path.join(work, "checkpoints", "2")]) == 0
  from_workdir = json.loads(capsys.readouterr().out)
  assert main.main(["eval", "--workdir", out]) == 0
  assert json.loads(capsys.readouterr().out) == from_workdir
  args = ["--prompt", "The ", "--max-new-tokens", "12", "--seed", "3"]
  assert main.main(["sample", "--workdir", work, "--step", "2", *args]) == 0
  assert main.main(["sample", "--workdir", out, *args]) == 0
  first, second = capsys.readouterr().out.splitlines()
  assert first == second and first.startswith("The ")
  assert main.main(["predict", "--workdir", out, "x.png"]) == 2
  assert "use `jaxcollab sample`" in capsys.readouterr().err


@pytest.fixture(scope="module")
def gpt_bundle_dir(tmp_path_factory):
  config = config_lib.defaults()
  config.model.name, config.dataset.name = "gpt", "pydocs"
  config.model.num_layers, config.model.num_heads, config.model.embed_dim, config.model.mlp_dim = 1, 2, 16, 32
  config.model.context, config.dataset.seq_len = 32, 16
  dataset = {"name": "pydocs", "kind": "text", "vocab_size": 256, "seq_len": 16, "eval_split": "validation"}
  out = str(tmp_path_factory.mktemp("b") / "gpt")
  bundle.write(out, make_loaded(config, dataset), "", {})
  return out


@pytest.mark.parametrize(
  "command, needle",
  [
    (["sample", "--prompt", ""], "The prompt is empty"),
    (["sample", "--prompt", "Hi", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["sample", "--prompt", "Hi", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
    (["sample", "--prompt", "Hi", "--temperature", "-1"], "--temperature must be >= 0"),
    (["sample", "--prompt", "Hi", "--max-new-tokens", "40"], "ask for 1 to 31"),
    (["predict", "x.png"], "use `jaxcollab sample`"),
  ],
)
def test_bad_sample_requests_exit_2(gpt_bundle_dir, capsys, command, needle):
  assert main.main([command[0], "--workdir", gpt_bundle_dir, *command[1:]]) == 2
  err = capsys.readouterr().err
  assert needle in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
  "command, needle",
  [
    (["sample", "--prompt", "Hi"], "use `jaxcollab predict`"),
    (["predict", "JUNK"], "cannot be decoded as an image"),
    (["predict", "TWO_CHANNELS"], "takes 3-channel images"),
  ],
)
def test_bad_predict_requests_exit_2(resnet_bundle, tmp_path, capsys, command, needle):
  (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
  np.save(tmp_path / "two.npy", np.zeros((8, 8, 2), np.uint8))
  files = {"JUNK": str(tmp_path / "junk.jpg"), "TWO_CHANNELS": str(tmp_path / "two.npy")}
  assert main.main([command[0], "--workdir", resnet_bundle[0], *[files.get(c, c) for c in command[1:]]]) == 2
  err = capsys.readouterr().err
  assert needle in err and err.count("\n") == 1 and "Traceback" not in err
