"""The offline mm_arith dataset: content, determinism, held-out styles, prepare's guarantees."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mmjax.data import mm_arith, questions, sources
from data_fixtures import SIZES


def _examples(data_dir, split, n=None, config="procedural"):
  src = sources.open_split(f"mm_arith/{config}", split, data_dir)
  return [src[i] for i in range(n or len(src))]


def test_features_labels_and_latents(procedural_dir):
  ex = _examples(procedural_dir, "train")
  assert len(ex) == SIZES["num_train"]
  e = ex[0]
  assert e["image"].shape == (28, 28, 1) and e["image"].dtype == np.uint8
  assert e["audio"].shape == (8000,) and e["audio"].dtype == np.int16
  ops = np.array([e["op"] for e in ex])
  a, b, y = (np.array([e[k] for e in ex]) for k in ("digit_a", "digit_b", "label"))
  assert np.all(y == np.where(ops == 0, (a + b) % 10, (a - b) % 10))
  for e in ex[:50]:
    q = e["question"].decode()
    assert q in questions.TEMPLATES[questions.OPS[e["op"]]]
    assert len(q.encode()) <= questions.MAX_BYTES
  # a, b, op independent and uniform: every (a, b, op) cell is populated, none dominates
  counts = np.zeros((10, 10, 2))
  np.add.at(counts, (a, b, ops), 1)
  assert counts.min() > 0 and counts.max() < 3 * counts.mean()
  assert np.abs(np.corrcoef(a, b)[0, 1]) < 0.05


def test_test_split_uses_held_out_writers_and_voices(procedural_dir):
  train = _examples(procedural_dir, "train", 500)
  test = _examples(procedural_dir, "test", 500)
  assert max(e["writer_id"] for e in train) < mm_arith.NUM_TRAIN_STYLES
  assert max(e["voice_id"] for e in train) < mm_arith.NUM_TRAIN_STYLES
  assert min(e["writer_id"] for e in test) >= mm_arith.NUM_TRAIN_STYLES
  assert min(e["voice_id"] for e in test) >= mm_arith.NUM_TRAIN_STYLES


def test_examples_are_a_function_of_their_index(procedural_dir):
  stored = _examples(procedural_dir, "test", 3)
  for e in stored:
    again = mm_arith._procedural_example("test", np.random.default_rng([0, 1, e["index"]]))
    np.testing.assert_array_equal(again["image"], e["image"])
    np.testing.assert_array_equal(again["audio"], e["audio"])
    assert again["label"] == e["label"]


def test_prepare_is_idempotent_and_refuses_other_sizes(procedural_dir):
  logs = []
  sources.prepare("mm_arith/procedural", procedural_dir, log=logs.append, **SIZES)
  assert "already prepared" in logs[-1]
  with pytest.raises(ValueError, match="--overwrite"):
    sources.prepare("mm_arith/procedural", procedural_dir, num_train=10)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(dataset="mm_arith/fancy"), "unknown config 'fancy'"),
    (dict(dataset="no_such_dataset_xyz"), "unknown dataset 'no_such_dataset_xyz'"),
    (dict(dataset="mm_arith/procedural", num_train=0), "--num_train=0 is invalid"),
    (dict(dataset="mm_arith/procedural", num_test=-3), "--num_test=-3 is invalid"),
])
def test_prepare_bad_input(tmp_path, kwargs, needle):
  with pytest.raises(ValueError) as err:
    sources.prepare(data_dir=str(tmp_path), log=lambda *_: None, **kwargs)
  assert needle in str(err.value)
  assert not os.path.exists(tmp_path / "mm_arith" / "procedural" / "1.1.0")


def test_unprepared_data_dir_fails_at_once_with_the_command(tmp_path, caplog):
  t0 = time.perf_counter()
  with pytest.raises(sources.DatasetNotPreparedError) as err:
    sources.open_split("mm_arith/procedural", "train", str(tmp_path))
  assert "python -m mmjax.data.prepare --dataset=mm_arith/procedural" in str(err.value)
  assert time.perf_counter() - t0 < 10
  assert not [r for r in caplog.records if "dataset_info.json" in r.getMessage()]


def test_prepare_cli_exit_codes(tmp_path):
  run = lambda *a: subprocess.run([sys.executable, "-m", "mmjax.data.prepare", *a],
                                  capture_output=True, text=True, timeout=120)
  r = run(f"--data_dir={tmp_path}", "--num_train=0")
  assert r.returncode != 0 and "--num_train=0 is invalid" in r.stderr
  r = run(f"--data_dir={tmp_path}", "--dataset=mm_arith/nope")
  assert r.returncode != 0 and "valid configs: mm_arith/procedural, mm_arith/real" in r.stderr
  r = run(f"--data_dir={tmp_path}", "--num_train=40", "--num_test=10")
  assert r.returncode == 0, r.stderr
  assert "prepared mm_arith/procedural: train 40, test 10" in r.stdout
  # only mmjax's own lines: no TFDS download banner or not-prepared-yet warnings
  assert "preparing mm_arith/procedural (40 train + 10 test examples)" in r.stdout
  out = r.stdout + r.stderr
  assert "Downloading and preparing" not in out and "dataset_info.json" not in out, out


def test_corrupted_record_file_is_a_clear_error(procedural_dir, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(procedural_dir, copy)
  version_dir = copy / "mm_arith" / "procedural" / "1.1.0"
  record = next(p for p in version_dir.iterdir() if "test.array_record" in p.name)
  with open(record, "r+b") as f:
    f.truncate(record.stat().st_size // 2)
  with pytest.raises(sources.DatasetCorruptedError) as err:
    sources.open_split("mm_arith/procedural", "test", str(copy))
  assert "delete that directory and prepare again" in str(err.value)


def test_killed_prepare_never_looks_complete(tmp_path):
  proc = subprocess.Popen([sys.executable, "-m", "mmjax.data.prepare", f"--data_dir={tmp_path}",
                           "--num_train=200000", "--num_test=10"],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  config_dir = tmp_path / "mm_arith" / "procedural"
  deadline = time.time() + 60
  while time.time() < deadline:
    if config_dir.exists() and any(p.name.startswith("incomplete") for p in config_dir.iterdir()):
      break
    time.sleep(0.2)
  time.sleep(2.0)  # let it write some records
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (config_dir / "1.1.0").exists(), "a killed prepare left a complete-looking dir"
  with pytest.raises(sources.DatasetNotPreparedError):
    sources.open_split("mm_arith/procedural", "train", str(tmp_path))
  sources.prepare("mm_arith/procedural", str(tmp_path), num_train=30, num_test=10,
                  log=lambda *_: None)
  assert len(sources.open_split("mm_arith/procedural", "train", str(tmp_path))) == 30


def test_real_config_scans_and_voices(tmp_path):
  if shutil.which("espeak-ng") is None:
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
      sources.prepare("mm_arith/real", str(tmp_path), num_train=20, num_test=10,
                      log=lambda *_: None)
    pytest.skip("espeak-ng is not installed here (./launch.sh setup installs it as root)")
  from mmjax.data import handwriting, speech
  sources.prepare("mm_arith/real", str(tmp_path), num_train=60, num_test=30,
                  log=lambda *_: None)
  train = _examples(str(tmp_path), "train", config="real")
  test = _examples(str(tmp_path), "test", config="real")
  n_train_voices = len(speech.voices("train"))
  test_scans = set(np.concatenate(list(handwriting.by_digit("test").values())).tolist())
  assert all(e["writer_id"] not in test_scans for e in train)
  assert all(e["writer_id"] in test_scans for e in test)
  assert all(e["voice_id"] < n_train_voices for e in train)
  assert all(e["voice_id"] >= n_train_voices for e in test)
  for e in train[:10]:
    assert np.abs(e["audio"]).max() > 3000, "speech should be clearly audible"
    assert e["image"].max() > 200
