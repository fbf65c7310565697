"""Tests for jaxcollab/metrics.py: log files, resume, run.json, reports, plots, progress lines."""

import glob
import json
import os
import struct

import numpy as np
import pytest
import sklearn.metrics
from tensorboardX.proto import event_pb2

from jaxcollab import metrics, plots, records

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _events(logdir: str) -> list[event_pb2.Event]:
  """Every event in the TFRecord files under `logdir` (length, crc, data, crc framing)."""
  events = []
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      pos += 12
      events.append(event_pb2.Event.FromString(data[pos : pos + length]))
      pos += length + 4
  return events


def _scalars(logdir: str) -> dict[tuple[str, int], float]:
  return {(v.tag, e.step): v.simple_value for e in _events(logdir) for v in e.summary.value}


def _write_run(workdir: str, steps: range, resume_step: int = 0) -> None:
  writer = metrics.MetricWriter(workdir, resume_step=resume_step)
  for step in steps:
    writer.write(step, "train", {"loss": 1.0 / (step + 3), "learning_rate": 1e-3 * step})
    if step % 2 == 0:
      writer.write(step, "eval", {"loss": 0.1 + 1 / 7 * step, "accuracy": step / 3})
  writer.close()


def test_rows_round_trip_exactly(tmp_path):
  values = {"loss": 0.1 + 0.2, "accuracy": 1 / 3, "grad_norm": np.float32(1.1), "tiny": 5e-324}
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(7, "train", values)
  writer.write(8, "eval", {"loss": 2.0 / 3})
  writer.close()
  rows = records.read_metrics(str(tmp_path))
  assert rows == [
    {
      "step": 7,
      "split": "train",
      "loss": 0.1 + 0.2,
      "accuracy": 1 / 3,
      "grad_norm": float(np.float32(1.1)),
      "tiny": 5e-324,
    },
    {"step": 8, "split": "eval", "loss": 2.0 / 3},
  ]
  assert all(type(v) is float for k, v in rows[0].items() if k not in ("step", "split"))


def test_rows_are_on_disk_before_close(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(1, "train", {"loss": 0.5})
  # A crash now must not lose the row: it is already readable without close().
  assert records.read_metrics(str(tmp_path)) == [{"step": 1, "split": "train", "loss": 0.5}]
  writer.close()


def test_resume_keeps_rows_up_to_step_and_matches_uninterrupted_run(tmp_path):
  full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
  _write_run(full, range(1, 11))
  _write_run(resumed, range(1, 8))  # Killed at step 7, last checkpoint at step 4.
  writer = metrics.MetricWriter(resumed, resume_step=4)
  writer.close()
  assert max(r["step"] for r in records.read_metrics(resumed)) == 4
  assert records.read_metrics(resumed) == [r for r in records.read_metrics(full) if r["step"] <= 4]
  _write_run(resumed, range(5, 11), resume_step=4)
  with open(os.path.join(full, "metrics.jsonl"), "rb") as a, open(os.path.join(resumed, "metrics.jsonl"), "rb") as b:
    assert a.read() == b.read()


def test_resume_drops_torn_last_line(tmp_path):
  _write_run(str(tmp_path), range(1, 4))
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "split": "tra')
  metrics.MetricWriter(str(tmp_path), resume_step=3).close()
  assert [r["step"] for r in records.read_metrics(str(tmp_path))] == [1, 2, 2, 3]


def test_fresh_run_truncates_old_rows(tmp_path):
  _write_run(str(tmp_path), range(1, 6))
  writer = metrics.MetricWriter(str(tmp_path), resume_step=0)
  writer.write(1, "train", {"loss": 9.0})
  writer.close()
  assert records.read_metrics(str(tmp_path)) == [{"step": 1, "split": "train", "loss": 9.0}]
  assert _scalars(str(tmp_path / "tensorboard")) == {("train/loss", 1): 9.0}


def test_disabled_writer_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  writer = metrics.MetricWriter(str(workdir), enabled=False)
  writer.write(1, "train", {"loss": 0.5})
  writer.close()
  assert not workdir.exists()


def test_tensorboard_holds_the_scalars(tmp_path):
  writer = metrics.MetricWriter(str(tmp_path))
  writer.write(3, "train", {"loss": 0.25, "learning_rate": 0.125})
  writer.write(3, "eval", {"accuracy": 0.75})
  writer.close()
  scalars = _scalars(str(tmp_path / "tensorboard"))
  assert scalars == {("train/loss", 3): 0.25, ("train/learning_rate", 3): 0.125, ("eval/accuracy", 3): 0.75}


def test_tensorboard_resume_sets_purge_step(tmp_path):
  _write_run(str(tmp_path), range(1, 8))
  _write_run(str(tmp_path), range(5, 9), resume_step=4)
  starts = [e.step for e in _events(str(tmp_path / "tensorboard")) if e.HasField("session_log")]
  # TensorBoard hides the first run's steps >= 5 when it reads this START marker.
  assert starts == [5]


def test_read_metrics_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="No metrics.jsonl in"):
    records.read_metrics(str(tmp_path))


def test_run_info(tmp_path):
  config_json = json.dumps({"seed": 0})
  metrics.write_run_info(
    str(tmp_path),
    config_json=config_json,
    mesh_shape={"data": 8, "fsdp": 1},
    argv=["jaxcollab", "train", "--workdir", "x"],
  )
  with open(tmp_path / "run.json") as f:
    info = json.load(f)
  for key in ("jaxcollab", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy", "python"):
    assert info["versions"][key], key
  assert info["devices"]["platform"] == "cpu" and info["devices"]["count"] == 8
  assert info["devices"]["local_count"] == 8 and info["process_count"] == 1
  assert info["mesh_shape"] == {"data": 8, "fsdp": 1}
  assert info["command"] == "jaxcollab train --workdir x"
  assert len(info["config_sha256"]) == 64
  assert "git_commit" in info and "git_dirty" in info
  assert (info["git_commit"] is None) == (info["git_dirty"] is None)


def test_run_info_without_git(tmp_path, monkeypatch):
  monkeypatch.setenv("PATH", str(tmp_path))  # No git executable on the PATH.
  metrics.write_run_info(str(tmp_path), config_json="{}", mesh_shape={}, argv=[])
  with open(tmp_path / "run.json") as f:
    info = json.load(f)
  assert info["git_commit"] is None and info["git_dirty"] is None


def _labels_from_counts(confusion):
  true, pred = [], []
  for i, j in np.ndindex(confusion.shape):
    true += [i] * int(confusion[i, j])
    pred += [j] * int(confusion[i, j])
  return np.array(true), np.array(pred)


def test_classification_report_matches_sklearn():
  # Class 3 is never predicted and class 4 never occurs: both exercise zero division.
  confusion = np.array(
    [
      [5, 1, 0, 2, 0],
      [0, 7, 3, 0, 1],
      [2, 0, 4, 0, 0],
      [1, 1, 1, 0, 0],
      [0, 0, 0, 0, 0],
    ]
  )
  confusion[3, 3] = 0
  true, pred = _labels_from_counts(confusion)
  labels = list(range(5))
  p, r, f, s = sklearn.metrics.precision_recall_fscore_support(true, pred, labels=labels, zero_division=0)
  report = metrics.classification_report(confusion, class_names=list("abcde"))
  np.testing.assert_allclose([c["precision"] for c in report["per_class"]], p, rtol=1e-12)
  np.testing.assert_allclose([c["recall"] for c in report["per_class"]], r, rtol=1e-12)
  np.testing.assert_allclose([c["f1"] for c in report["per_class"]], f, rtol=1e-12)
  assert [c["support"] for c in report["per_class"]] == list(s)
  assert [c["class"] for c in report["per_class"]] == list("abcde")
  assert report["accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(true, pred))
  assert report["macro_f1"] == pytest.approx(
    sklearn.metrics.f1_score(true, pred, labels=labels, average="macro", zero_division=0)
  )
  np.testing.assert_array_equal(sklearn.metrics.confusion_matrix(true, pred, labels=labels), confusion)


def test_classification_report_rejects_bad_input():
  with pytest.raises(ValueError, match="square"):
    metrics.classification_report(np.zeros((2, 3)))
  with pytest.raises(ValueError, match="class names"):
    metrics.classification_report(np.eye(3), class_names=["a", "b"])


def test_format_report_has_rows_and_averages():
  report = metrics.classification_report(np.array([[3, 1], [0, 4]]), class_names=["cat", "dog"])
  text = metrics.format_report(report)
  lines = text.splitlines()
  assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
  assert lines[2].split() == ["cat", "1.0000", "0.7500", "0.8571", "4"]
  assert lines[3].split() == ["dog", "0.8000", "1.0000", "0.8889", "4"]
  assert "accuracy" in text and "0.8750" in text and "macro avg" in text


def _assert_png(path, min_bytes=5_000):
  with open(path, "rb") as f:
    data = f.read()
  assert data[:8] == PNG_MAGIC
  assert len(data) > min_bytes


def test_plot_confusion_writes_png(tmp_path):
  path = tmp_path / "plots" / "confusion.png"
  plots.plot_confusion(
    np.array([[50, 2, 1], [3, 40, 7], [0, 5, 44]]), str(path), class_names=["a", "b", "c"], title="digits"
  )
  _assert_png(path)


def test_plot_curves_writes_png(tmp_path):
  _write_run(str(tmp_path), range(1, 30))
  rows = records.read_metrics(str(tmp_path))
  rows.append({"step": 29, "split": "test", "loss": 0.2, "accuracy": 0.9})
  path = tmp_path / "plots" / "curves.png"
  plots.plot_curves(rows, str(path))
  _assert_png(path, min_bytes=20_000)


def test_plot_curves_without_eval_or_rows(tmp_path):
  plots.plot_curves([{"step": 1, "split": "train", "loss": 1.0}], str(tmp_path / "a.png"))
  plots.plot_curves([], str(tmp_path / "b.png"))
  _assert_png(tmp_path / "a.png")
  _assert_png(tmp_path / "b.png", min_bytes=1_000)


def test_progress_prints_plain_lines_at_every_step_and_last(capsys):
  progress = metrics.Progress(total=120, initial=0, every=50)
  for step in range(1, 121):
    progress.update(step, {"loss": 1.0 / step})
  progress.close()
  lines = capsys.readouterr().err.splitlines()
  assert [line.split(" | ")[0] for line in lines] == [
    "step 50/120 (41%) loss 0.0200",
    "step 100/120 (83%) loss 0.0100",
    "step 120/120 (100%) loss 0.0083",
  ]
  for line in lines:
    _, rate, eta = line.split(" | ")
    assert rate.endswith(" steps/s") and float(rate.split()[0]) > 0
    assert eta.startswith("ETA ")
  assert lines[-1].endswith("ETA 0:00:00")


def test_progress_resumed_and_disabled(capsys):
  progress = metrics.Progress(total=100, initial=60, every=20)
  for step in range(61, 101):
    progress.update(step, {"loss": 0.5})
  metrics.Progress(total=100, every=1, enabled=False).update(1, {"loss": 0.5})
  steps = [line.split()[1] for line in capsys.readouterr().err.splitlines()]
  assert steps == ["80/100", "100/100"]
