"""A PyTorch twin of `mmjax.models.MultimodalModel` (cross fusion, classification head),
built from the same ModelConfig: same layers, same shapes, same parameter count. Used only
by `bench/train_step.py --vs_torch` to compare train-step speed on this machine.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmjax.models.audio_features import mel_filterbank


class Attention(nn.Module):
  def __init__(self, d, heads):
    super().__init__()
    self.heads = heads
    self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))

  def forward(self, x, ctx, ctx_mask):
    b, nq, d = x.shape
    split = lambda y: y.view(b, y.shape[1], self.heads, d // self.heads).transpose(1, 2)
    mask = None if ctx_mask is None else ctx_mask[:, None, None, :]
    o = F.scaled_dot_product_attention(split(self.query(x)), split(self.key(ctx)),
                                       split(self.value(ctx)), attn_mask=mask)
    return self.out(o.transpose(1, 2).reshape(b, nq, d))


class Mlp(nn.Module):
  def __init__(self, d, hidden, gated=False):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
    self.gate = nn.Linear(d, hidden) if gated else None

  def forward(self, x):
    h = F.gelu(self.fc1(x), approximate="tanh")
    if self.gate is not None:
      h = h * self.gate(x)
    return self.fc2(h)


def _ln(d):
  return nn.LayerNorm(d, eps=1e-6)


class EncoderBlock(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    d = cfg.d_model
    self.ln_attn, self.attn = _ln(d), Attention(d, cfg.num_heads)
    self.ln_mlp, self.mlp = _ln(d), Mlp(d, cfg.mlp_dim, cfg.mlp_gated)

  def forward(self, x, mask):
    h = self.ln_attn(x)
    x = x + self.attn(h, h, mask)
    return x + self.mlp(self.ln_mlp(x))


class CrossBlock(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    d = cfg.d_model
    self.ln_query, self.ln_context = _ln(d), _ln(d)
    self.cross_attn = Attention(d, cfg.num_heads)
    self.ln_mlp, self.mlp = _ln(d), Mlp(d, cfg.mlp_dim, cfg.mlp_gated)

  def forward(self, x, ctx, ctx_mask):
    x = x + self.cross_attn(self.ln_query(x), self.ln_context(ctx), ctx_mask)
    return x + self.mlp(self.ln_mlp(x))


class Tower(nn.Module):
  def __init__(self, t, cfg):
    super().__init__()
    d, self.t = cfg.d_model, t
    if t.kind == "text":
      self.embed = nn.Embedding(t.vocab_size, d)
      n = t.max_len
    elif t.kind == "image":
      self.embed = nn.Conv2d(t.channels, d, t.patch_size, stride=t.patch_size)
      n = t.num_tokens
    else:
      self.embed = nn.Conv2d(1, d, (t.patch_time, t.patch_freq),
                             stride=(t.patch_time, t.patch_freq))
      n = t.num_tokens
      self.register_buffer("fb", torch.from_numpy(mel_filterbank(
          t.sample_rate, t.n_fft, t.n_mels, t.f_min, t.f_max)))
      self.register_buffer("window", torch.from_numpy(
          np.hanning(t.n_fft + 1)[:-1].astype(np.float32)))
    self.pos = nn.Parameter(torch.randn(n, d) * 0.02)
    self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(t.num_layers))
    self.ln_final = _ln(d)

  def forward(self, x, mask):
    t = self.t
    if t.kind == "text":
      x = (self.embed(x) + self.pos[:x.shape[1]]) * mask[..., None]
    elif t.kind == "image":
      x = self.embed(x.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2) + self.pos
      mask = None
    else:
      wave = x * mask
      frames = wave.unfold(1, t.n_fft, t.hop_length) * self.window
      spec = torch.log((torch.fft.rfft(frames).abs() ** 2) @ self.fb + 1e-6)
      nt, nf = t.grid
      spec = spec[:, :nt * t.patch_time]
      x = self.embed(spec[:, None]).permute(0, 2, 3, 1).reshape(x.shape[0], nt * nf, -1)
      starts = torch.arange(nt) * t.patch_time * t.hop_length
      mask = mask[:, starts].repeat_interleave(nf, dim=1)
      x = (x + self.pos) * mask[..., None]
    for blk in self.blocks:
      x = blk(x, mask)
    return self.ln_final(x), mask


class TorchMultimodal(nn.Module):
  def __init__(self, cfg):
    super().__init__()
    assert cfg.fusion.kind == "cross" and cfg.head.kind == "classify"
    self.names = list(cfg.modalities)
    self.towers = nn.ModuleDict({m: Tower(cfg.towers[m], cfg) for m in self.names})
    self.fusion = nn.ModuleList(nn.ModuleDict({m: CrossBlock(cfg) for m in self.names})
                                for _ in range(cfg.fusion.num_layers))
    width = cfg.d_model * len(self.names)
    self.head_ln, self.head = _ln(width), nn.Linear(width, cfg.head.num_classes)

  def forward(self, batch):
    tokens, masks = {}, {}
    for m in self.names:
      mask = batch.get(f"{m}_mask")
      if mask is None:
        mask = torch.ones(batch[m].shape[:2], dtype=torch.bool)
      tokens[m], masks[m] = self.towers[m](batch[m], mask)
    for layer in self.fusion:
      new = {}
      for m in self.names:
        others = [o for o in self.names if o != m] or [m]
        ctx = torch.cat([tokens[o] for o in others], 1)
        ctx_mask = torch.cat([masks[o] if masks[o] is not None else
                              torch.ones(tokens[o].shape[:2], dtype=torch.bool)
                              for o in others], 1)
        new[m] = layer[m](tokens[m], ctx, ctx_mask)
      tokens = new
    pooled = []
    for m in self.names:
      w = (masks[m].float() if masks[m] is not None
           else torch.ones(tokens[m].shape[:2]))[..., None]
      pooled.append((tokens[m] * w).sum(1) / w.sum(1).clamp(min=1.0))
    return self.head(self.head_ln(torch.cat(pooled, -1)))


def to_torch(batch: dict) -> dict:
  out = {}
  for k, v in batch.items():
    v = np.asarray(v)
    out[k] = torch.from_numpy(v.astype(np.int64) if v.dtype == np.int32 else v)
  return out


def load_flax_params(tmodel: TorchMultimodal, params: dict):
  """Copy a Flax parameter tree into the twin (to check that both compute the same)."""
  p = params["params"] if "params" in params else params
  t = lambda a: torch.from_numpy(np.array(a, np.float32))

  def dense(mod, d):
    mod.weight.data, mod.bias.data = t(d["kernel"]).T.contiguous(), t(d["bias"])

  def ln(mod, d):
    mod.weight.data, mod.bias.data = t(d["scale"]), t(d["bias"])

  def attn(mod, d):
    for n in ("query", "key", "value", "out"):
      dense(getattr(mod, n), d[n])

  def block(mod, d):
    for n in ("ln_attn", "ln_query", "ln_context", "ln_mlp"):
      if n in d:
        ln(getattr(mod, n), d[n])
    attn(mod.attn if "attn" in d else mod.cross_attn, d.get("attn", d.get("cross_attn")))
    dense(mod.mlp.fc1, d["mlp"]["fc1"])
    dense(mod.mlp.fc2, d["mlp"]["fc2"])
    if "gate" in d["mlp"]:
      dense(mod.mlp.gate, d["mlp"]["gate"])

  for m, tower in tmodel.towers.items():
    d = p[m]
    if "token_embed" in d:
      tower.embed.weight.data = t(d["token_embed"]["embedding"])
    else:
      tower.embed.weight.data = t(d["patch_embed"]["kernel"]).permute(3, 2, 0, 1).contiguous()
      tower.embed.bias.data = t(d["patch_embed"]["bias"])
    tower.pos.data = t(d["pos_embed"])
    for i, blk in enumerate(tower.blocks):
      block(blk, d[f"block_{i:02d}"])
    ln(tower.ln_final, d["ln_final"])
  for i, layer in enumerate(tmodel.fusion):
    for m, blk in layer.items():
      block(blk, p["fusion"][f"layer_{i:02d}"][m])
  ln(tmodel.head_ln, p["head_ln"])
  dense(tmodel.head, p["head"])
