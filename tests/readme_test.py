"""README.md's code, run as a reader copies it: in a fresh directory, with the repository's experiments/.

The `bash` and `python` blocks of the Checkpoints section run in order (they build on each other:
train, resume, train longer, load, eval, inspect, read with plain orbax). Blocks fenced without a
language (installing, GPUs, clusters, a second 1,000-step run) are shown, not run.
"""

import os
import re
import subprocess
import sys

import pytest

import checkpoint_runs as runs
from jaxcollab import config as config_lib

README = os.path.join(runs.REPO, "README.md")


def _section(title: str) -> str:
  with open(README) as f:
    text = f.read()
  start = text.index(f"\n## {title}\n")
  end = text.find("\n## ", start + 1)
  return text[start : end if end >= 0 else None]


def _blocks(text: str) -> list[tuple[str, str]]:
  return re.findall(r"```(bash|python)\n(.*?)```", text, re.S)


def test_the_checkpoints_section_has_runnable_blocks():
  kinds = [lang for lang, _ in _blocks(_section("Checkpoints"))]
  assert kinds.count("bash") >= 4 and kinds.count("python") == 2, kinds


@pytest.mark.slow
def test_checkpoints_section_runs_as_written(tmp_path):
  os.symlink(os.path.join(runs.REPO, "experiments"), tmp_path / "experiments")  # As in a checkout.
  env = {
    **runs.env(1),
    "PYTHONPATH": runs.REPO,
    "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
  }
  for lang, code in _blocks(_section("Checkpoints")):
    argv = ["bash", "-e", "-c", code] if lang == "bash" else [sys.executable, "-c", code]
    out = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert out.returncode == 0, f"{code}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
  assert sorted(int(s) for s in os.listdir(tmp_path / "runs/mlp_digits/checkpoints") if s.isdigit()) == [
    500,
    1000,
    1200,
  ]


def _kept_steps(experiment: str) -> set[int]:
  c = config_lib.load_experiment(experiment)
  saved = sorted({*range(c.checkpoint.every, c.train.steps + 1, c.checkpoint.every), c.train.steps})
  return set(saved[-c.checkpoint.keep :])


def test_every_step_the_readme_names_is_one_its_run_keeps():
  """`eval --step 500` on cnn_digits (which keeps 1000 and 1500) could never work."""
  with open(README) as f:
    text = f.read()
  checked = 0
  for line in text.splitlines():
    match = re.search(r"jaxcollab (?:eval --workdir|inspect) runs/(\w+)\S* .*--step (\d+)", line)
    if match and os.path.exists(os.path.join(runs.REPO, "experiments", match.group(1) + ".py")):
      assert int(match.group(2)) in _kept_steps(match.group(1)), line
      checked += 1
  assert checked >= 3
