"""Cross-modal token pruning: the tokens of one modality's attention queries (the text)
say which tokens of the others (image, audio) the answer needs; after fusion layer k,
only the top fraction of those stay for the layers after it and the pooling (FastV,
SparseVLM and VisionZip do this with a language model's attention over visual tokens).

    plan = Plan(prune_tokens(keep=0.3, queries="text", prune=("image", "audio")))

Importance of a context token j: the attention probability the query modality's tokens
give it in layer k's cross-attention (softmax(q kᵀ/√d_h), over every context token,
padding masked), averaged over heads and over the real query tokens. Each pruned
modality keeps ceil(keep · n) tokens, a count fixed at trace time (jit sees static
shapes), in their input order. Padding has importance 0, so it goes first.

Module hooks on mmjax's cross fusion (`fusion.kind = "cross"`: in each layer every
modality attends to the others' tokens, concatenated in sorted order), with the tokens'
masks (and sizes, after token merging) carried to the later layers and to the pooling:
  <layers>[k]/<queries>/<attention>          the context mask, the module's head count
  <layers>[k]/<queries>/<attention>/query|key the projections, recorded
  <layers>[k]                                after the layer: keep the top tokens
  <layers>[>k]                               the kept tokens' masks and attention biases
  fusion                                     the fused tokens' masks (and sizes) for pooling

Tower mode (`prune_tower_tokens`): the pruning moves before the fusion, to block k of the
image and audio towers, so the towers' later blocks run on the kept tokens too (most of
the FLOPs a pruned token costs). There is no text attention over image tokens inside a
tower, so the ranking borrows the fusion's: the text tower's output as queries and block
k's tokens as keys, through fusion layer `layer`'s query and key projections (with their
LayerNorms); the softmax runs over one tower's tokens. The text tower runs first (mmjax's
MultimodalModel orders it so); the root hook reads the parameters off the model.
  ""                       (the root) the parameters and the head width, recorded
  <queries>                the text tower's output tokens and mask, recorded
  <tower>/block_NN [k]     after the block: rank its tokens, keep the top ones
  <tower>/block_NN [>k]    the kept tokens' key-padding mask
  <tower>                  the tower's output mask, of the kept tokens
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from mmjax.compress.hooks import Around, HookError
from mmjax.compress.protocol import Method


def attention_probs(q, k, heads: int, context_mask=None, logit_bias=None):
  """q [b, nq, heads·d_h], k [b, nk, heads·d_h] -> [b, nq, nk]: softmax(q kᵀ/√d_h) with
  the attention's mask and bias, averaged over heads (masked keys get 0)."""
  b, nq, inner = q.shape
  hd = inner // heads
  qh = q.reshape(b, nq, heads, hd)
  kh = k.reshape(b, k.shape[1], heads, hd)
  logits = jnp.einsum("bqhd,bkhd->bhqk", qh, kh).astype(jnp.float32) / math.sqrt(hd)
  if logit_bias is not None:
    logits = logits + logit_bias[:, None, None, :]
  if context_mask is not None:
    logits = jnp.where(context_mask[:, None, None, :], logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.where(jnp.isnan(probs), 0.0, probs).mean(axis=1)


def importance(q, k, heads: int, query_mask=None, context_mask=None, logit_bias=None):
  """-> [b, nk]: the attention probability each key gets (`attention_probs`), averaged
  over the real queries."""
  probs = attention_probs(q, k, heads, context_mask, logit_bias)
  b, nq = q.shape[:2]
  w = (jnp.ones((b, nq)) if query_mask is None else query_mask.astype(jnp.float32))
  return (probs * w[..., None]).sum(1) / jnp.maximum(w.sum(1), 1.0)[:, None]


def top_tokens(scores, count: int):
  """[b, n] -> [b, count] int: the indices of the `count` highest scores, ascending (the
  kept tokens in their input order)."""
  return jnp.sort(jax.lax.top_k(scores, count)[1], axis=-1)


def kept_count(n: int, keep: float) -> int:
  return max(1, math.ceil(keep * n - 1e-9))


def _gather(x, idx):
  return jnp.take_along_axis(x, idx[..., None] if x.ndim == 3 else idx, axis=1)


def _checked(keep, queries, prune, name) -> tuple:
  """The settings both modes share, validated; -> `prune` as a tuple."""
  if not (isinstance(keep, (int, float)) and 0 < keep <= 1):
    raise ValueError(f"cross-modal pruning {name!r}: keep={keep!r} must be in (0, 1] (the "
                     "fraction of each pruned modality's tokens kept).")
  prune = tuple(prune)
  if not prune or queries in prune:
    raise ValueError(f"cross-modal pruning {name!r}: prune={list(prune)} must name "
                     f"modalities other than the queries' {queries!r}.")
  return prune


def prune_tokens(keep: float, *, queries: str = "text", prune=("image", "audio"),
                 layer: int = 0, layers: str = r"fusion/layer_(\d+)",
                 attention: str = "cross_attn", fusion: str = "fusion",
                 name: str = "xprune") -> Method:
  """A hooks-only method: after fusion layer `layer`, each modality of `prune` keeps the
  fraction `keep` of its tokens that the `queries` modality's attention rates highest."""
  prune = _checked(keep, queries, prune, name)
  layer_rx = re.compile(layers)
  at = layers.replace(r"(\d+)", f"{layer:02d}")

  def index_of(path):
    m = layer_rx.fullmatch(path)
    return int(m.group(1)) if m else None

  def on_attention(call, state):
    call.carry["context_mask"] = call.kwargs.get("context_mask")
    call.carry["logit_bias"] = call.kwargs.get("logit_bias")
    call.carry["heads"] = call.module.num_heads
    return call()

  def record(what):
    def on(call, state):
      out = call()
      call.carry[what] = out
      return out
    return on

  def on_layer(call, state):
    i = index_of(call.path)
    carry = call.carry
    if i is None or i < layer:
      return call()
    if i > layer:  # the kept tokens' masks and biases
      tokens, masks, *rest = call.args
      masks = {m: (_gather(v, carry["kept"][m]) if m in carry["kept"] else v)
               for m, v in masks.items()}
      rest = [None if r is None else {m: (_gather(v, carry["kept"][m]) if m in carry["kept"]
                                          else v) for m, v in r.items()} for r in rest]
      return call(tokens, masks, *rest, **call.kwargs)
    tokens, masks = call.args[0], call.args[1]
    missing = [m for m in (queries,) + prune if m not in tokens]
    if missing:
      raise HookError(f"cross-modal pruning {name!r}: the model has no modality "
                      f"{missing[0]!r} (its modalities: {sorted(tokens)}); prune "
                      "modalities it has, with queries from another.")
    out = call()
    others = [m for m in sorted(tokens) if m != queries]  # the queries' context, in order
    score = importance(carry.pop("query"), carry.pop("key"), carry["heads"],
                       masks[queries], carry["context_mask"], carry["logit_bias"])
    kept, start = {}, 0
    for m in others:
      n = tokens[m].shape[1]
      if m in prune:
        kept[m] = top_tokens(score[:, start:start + n], kept_count(n, keep))
      start += n
    carry["kept"] = kept
    return {m: (_gather(v, kept[m]) if m in kept else v) for m, v in out.items()}

  def on_fusion(call, state):
    out = call()
    kept = call.carry.get("kept")
    if kept is None:
      return out
    tokens, inter = out
    masks, sizes = call.arg(1, "masks"), call.arg(2, "sizes")
    pruned = {"masks": {m: _gather(masks[m], kept[m]) for m in kept}}
    if sizes is not None:
      pruned["sizes"] = {m: _gather(sizes[m], kept[m]) for m in kept}
    return tokens, {**inter, **pruned}

  base = f"{at}/{queries}/{attention}"
  return Method(name, hooks=(
      (base, Around(on_attention)),
      (f"{base}/query", Around(record("query"))),
      (f"{base}/key", Around(record("key"))),
      (layers, Around(on_layer)),
      (fusion, Around(on_fusion)),
  ))


def _layer_norm(p, x, eps: float = 1e-6):
  """flax.linen.LayerNorm's forward, in float32, from its parameters."""
  x = x.astype(jnp.float32)
  mu = x.mean(-1, keepdims=True)
  y = (x - mu) * jax.lax.rsqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps)
  return y * p["scale"] + p["bias"]


def _dense(p, x):
  return x @ p["kernel"].astype(jnp.float32) + p["bias"].astype(jnp.float32)


def prune_tower_tokens(keep: float, block: int, *, queries: str = "text",
                       prune=("image", "audio"), layer: int = 0, fusion: str = "fusion",
                       attention: str = "cross_attn", name: str = "xprune") -> Method:
  """A hooks-only method: in each tower of `prune`, after its block `block`, keep the
  fraction `keep` of its tokens that the `queries` tower's output rates highest through
  fusion layer `layer`'s cross-attention projections (the module docstring's tower mode)."""
  prune = _checked(keep, queries, prune, name)
  if not (isinstance(block, int) and block >= 0):
    raise ValueError(f"cross-modal pruning {name!r}: block={block!r} must be a tower block "
                     "index >= 0.")
  towers = "|".join(re.escape(m) for m in prune)
  block_rx = re.compile(rf"({towers})/block_(\d+)")

  def on_root(call, state):
    cfg = getattr(call.module, "cfg", None)
    if cfg is None or not hasattr(cfg, "num_heads"):
      raise HookError(f"cross-modal pruning {name!r} at a tower block reads the head width "
                      "off mmjax's MultimodalModel config; this model has none (prune in "
                      "the fusion instead, or pass a model with .cfg.num_heads).")
    call.carry["params"] = call.module.variables["params"]
    call.carry["head_dim"] = cfg.head_dim or cfg.d_model // cfg.num_heads
    return call()

  def on_queries(call, state):
    out = call()
    call.carry["queries"] = (out[0], out[1]["mask"])
    return out

  def scores(carry, x, mask):
    if "queries" not in carry:
      raise HookError(f"cross-modal pruning {name!r}: the {queries!r} tower must run before "
                      f"the pruned towers {list(prune)} (its output ranks their tokens).")
    try:
      p = carry["params"][fusion][f"layer_{layer:02d}"][queries]
      attn = p[attention]
      q_tokens, q_mask = carry["queries"]
      q = _dense(attn["query"], _layer_norm(p["ln_query"], q_tokens))
      k = _dense(attn["key"], _layer_norm(p["ln_context"], x))
    except KeyError as e:
      raise HookError(f"cross-modal pruning {name!r}: no parameters {fusion}/layer_"
                      f"{layer:02d}/{queries}/{{ln_query,ln_context,{attention}/query,key}} "
                      f"(missing {e}); rank with a cross fusion layer the model has.") from None
    return importance(q, k, q.shape[-1] // carry["head_dim"], q_mask, mask)

  def on_block(call, state):
    m, i = block_rx.fullmatch(call.path).groups()
    i, carry = int(i), call.carry
    if i < block:
      return call()
    mask = call.arg(1, "mask")
    if i > block:  # the kept tokens' padding
      if mask is None or ("kept", m) not in carry:
        return call()
      args, kwargs = call.with_arg(1, "mask", _gather(mask, carry["kept", m]))
      return call(*args, **kwargs)
    x = call()
    score = jax.lax.stop_gradient(scores(carry, x, mask))
    kept = top_tokens(score, kept_count(x.shape[1], keep))
    carry["kept", m] = kept
    return _gather(x, kept)

  def on_tower(call, state):
    out = call()
    kept = call.carry.get(("kept", call.path))
    if kept is None:
      raise HookError(f"cross-modal pruning {name!r}: tower {call.path!r} has no block "
                      f"{block} (block_{block:02d}); choose a block every pruned tower has.")
    x, inter = out
    return x, {**inter, "mask": _gather(inter["mask"], kept)}

  return Method(name, hooks=(
      ("", Around(on_root)),
      (re.escape(queries), Around(on_queries)),
      (rf"(?:{towers})/block_\d+", Around(on_block)),
      (rf"(?:{towers})", Around(on_tower)),
  ))
