"""The grain input pipeline: batches, determinism, resumption, host sharding, eval coverage."""
import json

import numpy as np
import pytest

from mmjax.data.pipeline import InputConfig, eval_batches, train_iterator
from mmjax.models import MultimodalModel, get_preset
from data_fixtures import SIZES


def _cfg(data_dir, **kw):
  return InputConfig(data_dir=data_dir, **{"batch_size": 32, "num_threads": 1, **kw})


def _take(it, n):
  return [next(it) for _ in range(n)]


def test_batches_are_model_ready(procedural_dir):
  b = next(train_iterator(_cfg(procedural_dir)))
  assert b["image"].shape == (32, 28, 28, 1) and b["image"].dtype == np.float32
  assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert b["audio"].shape == (32, 8000) and np.abs(b["audio"]).max() <= 1.0
  assert b["audio_mask"].all()
  assert b["text"].shape == (32, 48) and b["text"].dtype == np.int32
  assert np.array_equal(b["text_mask"], b["text"] != 0)
  assert b["label"].dtype == np.int32 and b["example_mask"].all()
  # the tiny model takes the batch as it comes
  import jax
  cfg = get_preset("tiny")
  model = MultimodalModel(cfg)
  logits, _ = jax.jit(model.apply)(model.init(jax.random.key(0), b), b)
  assert logits.shape == (32, 10)


def test_modality_subsets(procedural_dir):
  b = next(train_iterator(_cfg(procedural_dir, modalities=("image", "audio"))))
  assert "text" not in b and "image" in b and "audio" in b
  with pytest.raises(ValueError, match="needs modality 'video', which mm_arith.* does not provide"):
    train_iterator(_cfg(procedural_dir, modalities=("video",)))


def test_same_seed_same_batches_other_seed_other_batches(procedural_dir):
  a = _take(train_iterator(_cfg(procedural_dir, seed=1)), 3)
  b = _take(train_iterator(_cfg(procedural_dir, seed=1)), 3)
  c = _take(train_iterator(_cfg(procedural_dir, seed=2)), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_each_epoch_is_a_fresh_permutation(procedural_dir):
  cfg = _cfg(procedural_dir, batch_size=1000, modalities=("text",))
  it = train_iterator(cfg)
  epochs = []
  per_epoch = SIZES["num_train"] // 1000
  for _ in range(2):
    keys = np.concatenate([b["index"] for b in _take(it, per_epoch)])
    epochs.append(keys)
  assert sorted(epochs[0].tolist()) == list(range(SIZES["num_train"])), "one epoch, each once"
  assert sorted(epochs[1].tolist()) == list(range(SIZES["num_train"]))
  assert not np.array_equal(epochs[0], epochs[1]), "epochs are reshuffled"


def test_iterator_state_resumes_exactly(procedural_dir):
  cfg = _cfg(procedural_dir)
  it = train_iterator(cfg)
  _take(it, 5)
  state = json.loads(json.dumps(it.get_state()))  # survives a round trip through JSON
  expected = _take(it, 3)
  resumed = train_iterator(cfg)
  resumed.set_state(state)
  for x, y in zip(expected, _take(resumed, 3)):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_hosts_split_each_global_batch(procedural_dir):
  single = _take(train_iterator(_cfg(procedural_dir, batch_size=32)), 2)
  hosts = [_take(train_iterator(_cfg(procedural_dir, batch_size=32), process_index=p,
                                process_count=2), 2) for p in range(2)]
  for step in range(2):
    assert all(len(h[step]["label"]) == 16 for h in hosts)
    joint = np.sort(np.concatenate([h[step]["image"].reshape(16, -1).sum(1) for h in hosts]))
    np.testing.assert_allclose(joint, np.sort(single[step]["image"].reshape(32, -1).sum(1)))


def test_eval_sees_every_example_exactly_once(procedural_dir):
  seen = []
  n_batches = []
  for p in range(3):
    cfg = _cfg(procedural_dir, batch_size=96)  # 1000 examples: the last batch is padded
    batches = list(eval_batches(cfg, process_index=p, process_count=3))
    n_batches.append(len(batches))
    for b in batches:
      assert len(b["label"]) == 32
      seen.extend(b["index"][b["example_mask"]].tolist())
  assert len(set(n_batches)) == 1, "every host must run the same number of eval steps"
  assert sorted(seen) == list(range(SIZES["num_test"]))


@pytest.mark.parametrize("kw,needle", [
    (dict(batch_size=30), "does not divide across 4 processes"),
    (dict(batch_size=0), "must be positive"),
    (dict(dataset="mm_arith/weird"), "unknown config 'weird'"),
    (dict(dataset="no_adapter_ds"), "unknown dataset 'no_adapter_ds'"),
])
def test_bad_configs(procedural_dir, kw, needle):
  with pytest.raises(ValueError) as err:
    train_iterator(_cfg(procedural_dir, **kw), process_index=0, process_count=4)
  assert needle in str(err.value)
