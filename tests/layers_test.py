"""The module graph: each layer imports only the layers below it, so there is no import cycle."""

import ast
import os
import subprocess
import sys

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxcollab")

# Module -> layer, bottom first (DESIGN.md draws them). A module may import only lower layers, and
# a package's own submodules (data.*, models.*) may import each other.
LAYERS = {
  "errors": 0,
  "config": 1,
  "pytree": 1,
  "runtime": 1,
  "records": 1,
  "stop": 1,
  "jaxprs": 1,  # Rewrites of jaxprs through jax.extend.core.
  "threefry": 1,  # jax.random's threefry draws with numpy; sharding's init uses it.
  "choices": 1.5,  # Registry names and the checks that need only them (no jax); the components import them.
  "data": 2,
  "models": 2,
  "losses": 2,
  "optim": 2,
  "sharding": 2,
  "checkpoint": 2,
  "metrics": 2,
  "workdir": 2,
  "plots": 3,
  "bundle": 3,
  "schema": 3,  # The whole config checked before jax: config, models, choices.
  "run": 4,
  "reload": 5,
  "evaluate": 6,
  "infer": 6,
  "export": 6,
  "probe": 6,
  "train": 7,
  "compare": 7,
  "seeds": 8,  # Vmaps train's step.
  "sweep": 9,  # Runs seeds or train, names cells as compare names groups.
  "main": 10,
}
# Imports inside functions, each for a reason the module states: jax must not start before the CLI
# has checked the config and set XLA_FLAGS; the package's names load lazily.
NESTED_ALLOWED = {"main", "__init__", "runtime"}


def modules() -> dict[str, ast.Module]:
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(root, name), PACKAGE)[:-3].replace(os.sep, ".")
        with open(os.path.join(root, name)) as f:
          out[rel.removesuffix(".__init__")] = ast.parse(f.read())
  return out


def imported(tree: ast.Module, nested: bool) -> set[str]:
  """jaxcollab modules imported at the top level (nested=False) or inside functions (nested=True)."""
  out = set()
  top = set(map(id, tree.body))
  for node in ast.walk(tree):
    if (id(node) in top) == nested or not isinstance(node, (ast.Import, ast.ImportFrom)):
      continue
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "jaxcollab":
      base = node.module.split(".")[1:]
      out |= {".".join(base + [a.name]) if not base else ".".join(base) for a in node.names}
    elif isinstance(node, ast.Import):
      out |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("jaxcollab.")}
  return {m for m in out if m}


def layer(module: str) -> int:
  return LAYERS[module.split(".")[0]]


def test_every_module_has_a_layer():
  unknown = sorted(m for m in modules() if m != "__init__" and m.split(".")[0] not in LAYERS)
  assert not unknown, f"add these modules to LAYERS: {unknown}"


@pytest.mark.parametrize("module", sorted(m for m in modules() if m != "__init__"))
def test_imports_only_lower_layers(module):
  tree = modules()[module]
  for target in imported(tree, nested=False) | imported(tree, nested=True):
    if target.split(".")[0] == module.split(".")[0] or target == "__version__":
      continue  # Within one package (models.gpt -> models.activations), or the version string.
    assert layer(target) < layer(module), f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"


def test_imports_inside_functions_only_where_jax_must_wait():
  for module, tree in modules().items():
    if module not in NESTED_ALLOWED:
      assert not imported(tree, nested=True), f"{module} imports jaxcollab modules inside a function"


def test_importing_the_cli_does_not_start_jax():
  code = "import sys, jaxcollab.main; print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_training_starts_without_matplotlib():
  # Curves are drawn at the end of a run; importing matplotlib first delayed the first step by ~0.2 s.
  code = "import sys, jaxcollab.train; print(sorted(m for m in sys.modules if m.split('.')[0] == 'matplotlib'))"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def test_load_imports_no_training_stack(tmp_path):
  workdir = str(tmp_path / "w")
  subprocess.run(
    [
      sys.executable,
      "-m",
      "jaxcollab.main",
      "train",
      "--config",
      "mlp_digits:smoke",
      "--workdir",
      workdir,
      "--config.train.steps=2",
      "--config.train.eval_every=2",
      "--config.checkpoint.every=2",
    ],
    capture_output=True,
    text=True,
    check=True,
  )
  code = (
    "import sys, jaxcollab; model, variables, config = jaxcollab.load(sys.argv[1]); "
    "print(type(model).__name__, sorted(m for m in sys.modules if m.split('.')[0] in "
    "('matplotlib', 'tensorboardX') or m in ('jaxcollab.train', 'jaxcollab.evaluate')))"
  )
  out = subprocess.run([sys.executable, "-c", code, workdir], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "MLP []"
