"""mmjax's pretrained encoders next to the same models in PyTorch eager (Hugging Face
transformers, same weights, same process): the forward and an AdamW train step.

  pip install -e ".[bench,golden]"     # torch 2.13.0 (CPU), transformers
  python bench/pretrained_speed.py [--models vit_b16,whisper_base] [--reps 7]

For each model, transformers builds it with random weights; its state dict is written as
a safetensors file and loaded by mmjax's loader (`mmjax.pretrained.<family>`), and both
outputs are checked equal (relative 1e-4) before anything is timed. Then, interleaved,
`--reps` rounds of: the forward (mmjax jitted; PyTorch under `no_grad`) and one train step
(cross-entropy of a linear head, AdamW; mmjax's jitted with its state donated). ViT-B/16:
8 images of 224 px (`ViTForImageClassification`, 1000 classes); Whisper base: the encoder
over 2 clips of 30 s (3000 log-mel frames), mean-pooled into a 10-class head. Medians
and mmjax / PyTorch ratios (the issue's goal: at most 0.9); PyTorch runs on as many
threads as the machine has cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import results_file  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402


def _vit(torch):
  from transformers import ViTConfig, ViTForImageClassification
  from mmjax.pretrained import vit
  model = ViTForImageClassification(ViTConfig(num_labels=1000, attn_implementation="sdpa"))
  fam = vit.family(dict(variant="B/16"))
  x = np.random.default_rng(0).normal(size=(8, 3, 224, 224)).astype(np.float32)
  labels = np.arange(8) % 1000
  torch_forward = lambda m, t: m(pixel_values=t).logits
  return model, fam, {"image": x.transpose(0, 2, 3, 1)}, torch.from_numpy(x), labels, \
      torch_forward, None


def _whisper(torch):
  from transformers import WhisperConfig, WhisperModel
  from mmjax.pretrained import whisper
  cfg = WhisperConfig(d_model=512, encoder_layers=6, encoder_attention_heads=8,
                      encoder_ffn_dim=2048, decoder_layers=1, decoder_attention_heads=8,
                      decoder_ffn_dim=2048, num_mel_bins=80, max_source_positions=1500,
                      attn_implementation="sdpa")

  class Classifier(torch.nn.Module):  # the encoder, mean-pooled, a linear head
    def __init__(self):
      super().__init__()
      self.model = WhisperModel(cfg)
      self.head = torch.nn.Linear(512, 10)

    def forward(self, feats):
      return self.head(self.model.encoder(input_features=feats).last_hidden_state.mean(1))

  model = Classifier()
  fam = whisper.family(dict(variant="base", num_classes=10))
  x = np.random.default_rng(0).normal(size=(2, 80, 3000)).astype(np.float32)
  head = {"head/kernel": model.head.weight.detach().numpy().T,
          "head/bias": model.head.bias.detach().numpy()}
  return model, fam, {"mel": x.transpose(0, 2, 1)}, torch.from_numpy(x), np.arange(2) % 10, \
      (lambda m, t: m(t)), head


MODELS = {"vit_b16": _vit, "whisper_base": _whisper}


def _median_ms(xs):
  return 1e3 * statistics.median(xs)


def bench(name, reps, log):
  import torch
  from safetensors.torch import save_file
  from mmjax.compress import flatten, unflatten
  torch.manual_seed(0)
  model, fam, batch, tx, labels, torch_forward, extra = MODELS[name](torch)
  with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "model.safetensors")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if extra is not None:  # the Whisper classifier: the encoder as WhisperModel names it
      state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    save_file(state, path)
    params = fam.load(path, fam.abstract_params())
  if extra is not None:
    flat = flatten(params)
    flat.update({k: jnp.asarray(v) for k, v in extra.items()})
    params = unflatten(flat, params)

  # the same model: outputs equal before timing
  model.eval()
  with torch.no_grad():
    want = torch_forward(model, tx).numpy()
  got = np.asarray(jax.jit(fam.apply)(params, batch)[0])
  rel = float(np.abs(got - want).max() / np.abs(want).max())
  log(f"{name}: {sum(x.size for x in jax.tree.leaves(params)):,} parameters; outputs "
      f"equal to transformers' within {rel:.1e} (relative)")
  assert rel < 1e-4, rel

  forward = jax.jit(lambda p, b: fam.apply(p, b)[0])
  opt = optax.adamw(1e-4)
  y = jnp.asarray(labels)

  def loss_fn(p, b):
    return optax.softmax_cross_entropy_with_integer_labels(fam.apply(p, b)[0], y).mean()

  def step(p, s, b):
    loss, g = jax.value_and_grad(loss_fn)(p, b)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, loss
  step = jax.jit(step, donate_argnums=(0, 1))
  state = opt.init(params)
  topt = torch.optim.AdamW(model.parameters(), lr=1e-4)
  ty = torch.from_numpy(np.asarray(labels))

  def torch_step():
    topt.zero_grad()
    loss = torch.nn.functional.cross_entropy(torch_forward(model, tx), ty)
    loss.backward()
    topt.step()

  jax.block_until_ready(forward(params, batch))  # compiles
  p2, s2, _ = step(jax.tree.map(jnp.copy, params), state, batch)
  jax.block_until_ready(p2)
  times = {k: [] for k in ("jax_forward", "torch_forward", "jax_step", "torch_step")}
  for r in range(reps + 1):  # the first round warms PyTorch up; not counted
    t = time.perf_counter(); jax.block_until_ready(forward(params, batch))
    jf = time.perf_counter() - t
    model.eval()
    with torch.no_grad():
      t = time.perf_counter(); torch_forward(model, tx); tf = time.perf_counter() - t
    t = time.perf_counter(); p2, s2, _ = step(p2, s2, batch); jax.block_until_ready(p2)
    js = time.perf_counter() - t
    model.train()
    t = time.perf_counter(); torch_step(); ts = time.perf_counter() - t
    if r:
      for k, v in zip(times, (jf, tf, js, ts)):
        times[k].append(v)
  med = {k: _median_ms(v) for k, v in times.items()}
  out = dict(med, forward_ratio=med["jax_forward"] / med["torch_forward"],
             step_ratio=med["jax_step"] / med["torch_step"], reps=reps, max_rel_diff=rel,
             torch=torch.__version__, torch_threads=torch.get_num_threads())
  log(f"| {name} | forward | {med['jax_forward']:.0f} ms | {med['torch_forward']:.0f} ms | "
      f"{out['forward_ratio']:.2f} |")
  log(f"| {name} | train step | {med['jax_step']:.0f} ms | {med['torch_step']:.0f} ms | "
      f"{out['step_ratio']:.2f} |")
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--models", default="vit_b16,whisper_base")
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--out", default="bench/results/pretrained_speed_cpu.json")
  args = ap.parse_args()
  log = lambda m: print(m, flush=True)
  import torch
  torch.set_num_threads(os.cpu_count())
  result = {m: bench(m, args.reps, log) for m in args.models.split(",")}
  results_file.write(args.out, result, log)


if __name__ == "__main__":
  main()
