"""The pretrained families as the harness runs them, by config alone, on the offline
dataset: BERT over mm_arith's question (its byte tokens: vocabulary 259) and Whisper's
encoder over its audio (16 kHz log-mel computed in the forward), both small and randomly
initialized: training, one-shot GPTQ of the family's default kernels from that run, and
(Whisper) the deploy artifact, which scores as the run did."""
import json
import os

import pytest

from experiments.configs.common import base_config
from mmjax import deploy, train
from mmjax.tokenizer import VOCAB_SIZE

QUIET = lambda *_: None
FAMILIES = {
    "bert": ("text", "mmjax.pretrained.bert", dict(
        variant=None, width=32, depth=2, heads=4, mlp_dim=64, vocab_size=VOCAB_SIZE,
        max_len=48, num_classes=10)),
    "whisper": ("audio", "mmjax.pretrained.whisper", dict(
        variant=None, width=32, depth=2, heads=4, mlp_dim=64, n_mels=80, max_positions=32,
        num_classes=10, input="audio")),
}


def _config(name, data_dir, init=None):
  modality, module, args = FAMILIES[name]
  c = base_config(tiny=True, modalities=(modality,))
  c.model_module, c.model = module, dict(args)
  c.data.data_dir, c.mesh.data = data_dir, 1
  c.train.steps, c.train.eval_every, c.train.checkpoint_every = 8, 8, 8
  if init:
    c.init, c.train.steps = init, 0
    c.compress.post_training = dict(method="gptq", bits=4, granularity="channel",
                                    mode="sequential")
    c.compress.export = True
    c.calibration.examples = 32
  return c


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_pretrained_family_trains_compresses_and_deploys_by_config(name, procedural_dir,
                                                                    tmp_path):
  dense = str(tmp_path / "dense")
  out = train.train_and_evaluate(_config(name, procedural_dir), dense, log=QUIET)
  assert out["step"] == 8 and 0.0 <= out["eval_accuracy"] <= 1.0

  gptq = str(tmp_path / "gptq")
  out = train.train_and_evaluate(_config(name, procedural_dir, dense), gptq, log=QUIET)
  rep = json.load(open(os.path.join(gptq, "compression_report.json")))
  four_bit = sorted(d["path"] for d in rep["leaves"] if d["bits"] == 4)
  assert four_bit == sorted(f"block_{i:02d}/{k}/kernel" for i in (0, 1) for k in (
      "attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2"))
  assert rep["accuracy"] == out["eval_accuracy"]

  if name == "whisper":  # the exported program holds the log-mel front end
    art = str(tmp_path / "artifact")
    res = deploy.build(gptq, art, platforms=("cpu",), log=QUIET)
    assert res["manifest"]["modalities"] == ["audio"]
    ev = deploy.evaluate(gptq, art, log=QUIET)
    assert ev["accuracy"] == pytest.approx(out["eval_accuracy"], abs=1.5 / 1000)
