"""compare: the table equals a hand computation from metrics.jsonl files, t-test included; bad inputs exit 2."""

import json
import math
import os
import pathlib

import numpy as np
import pytest
from scipy import stats

from jaxcollab import compare, main
from jaxcollab import config as config_lib

# Final test accuracy per seed of three hand-written groups.
FINALS = {"relu": [0.95, 0.97, 0.96, 0.98], "tanh": [0.90, 0.93, 0.91], "gelu": [0.96, 0.97, 0.965, 0.955, 0.96]}


def _write_run(workdir, activation, seed, final, dataset="digits", model="mlp", loss="cross_entropy"):
  os.makedirs(workdir)
  config = config_lib.apply_overrides(
    config_lib.load_experiment("mlp_digits", "smoke"),
    [
      f"model.activation={activation}",
      f"seed={seed}",
      f"dataset.name={dataset}",
      f"model.name={model}",
      f"loss.name={loss}",
    ],
  )
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config_lib.to_json(config))
  rows = [
    {"step": 10, "split": "train", "loss": 1.0 + seed},
    {"step": 10, "split": "eval", "loss": 0.5, "accuracy": final - 0.1},
    {"step": 20, "split": "train", "loss": 0.5},
    {"step": 20, "split": "eval", "loss": 0.2, "accuracy": final},
    {"step": 20, "split": "test", "loss": 0.2, "accuracy": final},
  ]
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def study(tmp_path):
  for activation, finals in FINALS.items():
    for seed, final in enumerate(finals):
      _write_run(str(tmp_path / "sweep" / f"activation={activation}" / f"seed_{seed}"), activation, seed, final)
  return tmp_path / "sweep"


def _welch_by_hand(x, y):
  x, y = np.asarray(x), np.asarray(y)
  vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
  t = (x.mean() - y.mean()) / math.sqrt(vx + vy)
  df = (vx + vy) ** 2 / (vx**2 / (len(x) - 1) + vy**2 / (len(y) - 1))  # Welch-Satterthwaite.
  return 2 * stats.t.sf(abs(t), df)


def test_table_equals_a_hand_computation(study):
  c, paths = compare.compare([str(study)], baseline="activation=relu")
  by_group = {r["group"]: r for r in c.rows}
  assert [r["group"] for r in c.rows] == ["activation=relu", "activation=gelu", "activation=tanh"]  # Best first.
  for activation, finals in FINALS.items():
    row = by_group[f"activation={activation}"]
    x = np.array(finals)
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    assert row["n"] == len(x)
    assert row["accuracy_mean"] == pytest.approx(x.mean())
    assert row["accuracy_std"] == pytest.approx(x.std(ddof=1))
    assert (row["accuracy_ci_low"], row["accuracy_ci_high"]) == pytest.approx((x.mean() - half, x.mean() + half))
    assert row["best_step"] == 20
    if activation != "relu":
      assert row["p_vs_baseline"] == pytest.approx(_welch_by_hand(finals, FINALS["relu"]), rel=1e-9)
  assert math.isnan(by_group["activation=relu"]["p_vs_baseline"])
  assert by_group["activation=tanh"]["p_vs_baseline"] < 0.05 < by_group["activation=gelu"]["p_vs_baseline"]
  table = pathlib.Path(paths["md"]).read_text()
  assert "| activation=tanh | 3 | 0.9133 ± 0.0153 |" in table
  saved = json.loads(pathlib.Path(paths["json"]).read_text())
  assert saved["groups"][2]["finals"] == FINALS["tanh"]
  assert pathlib.Path(paths["csv"]).read_text().startswith("group,model.activation,n,accuracy_mean")
  for png in ("curves", "bars"):
    assert os.path.getsize(paths[png]) > 10_000


def test_default_baseline_is_the_best_and_min_mode_reverses(study):
  c, _ = compare.compare([str(study)], metric="accuracy", mode="min")
  assert c.baseline == "activation=tanh" == c.rows[0]["group"]


def test_groups_only_by_keys_that_differ(tmp_path):
  _write_run(str(tmp_path / "a"), "relu", 0, 0.9)
  _write_run(str(tmp_path / "b"), "relu", 1, 0.8)  # Only the seed differs: one group.
  runs = [compare.read_run(str(tmp_path / w)) for w in ("a", "b")]
  (group,) = compare.group_runs(runs)
  assert group.name == "all" and len(group.runs) == 2


@pytest.mark.parametrize(
  "setup, args, needle",
  [
    ("empty", [], "No runs under"),
    ("study", ["--baseline", "activation=swish"], "--baseline 'activation=swish' names no group; choose one of"),
    ("study", ["--metric", "bleu"], "No run has a final 'bleu'"),
    ("mixed", [], "different tasks"),
  ],
)
def test_bad_inputs_exit_2(tmp_path, capsys, setup, args, needle):
  root = tmp_path / "runs"
  root.mkdir()
  if setup == "study":
    _write_run(str(root / "a"), "relu", 0, 0.9)
    _write_run(str(root / "b"), "tanh", 0, 0.8)
  if setup == "mixed":
    _write_run(str(root / "a"), "relu", 0, 0.9)
    _write_run(str(root / "lm"), "gelu", 0, 0.9, dataset="pydocs", model="gpt", loss="next_token")
  code = main.main(["compare", str(root), *args])
  err = capsys.readouterr().err
  assert code == 2, err
  assert needle in err
  assert err.count("\n") == 1 and "Traceback" not in err
