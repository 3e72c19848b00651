"""Token merging (ToMe, Bolya et al. 2023): in each block, after attention, the r most
similar pairs of tokens merge into one, so that every later matmul and attention runs on
fewer tokens; no parameter changes, any model made of Flax modules.

    plan = Plan(merge_tokens(r=4, blocks=r"image/block_\\d+", tower="image"))  # mmjax
    plan = Plan(merge_tokens(r=8, blocks=r"block_\\d+", keep_first=1))        # ViT (cls)

Bipartite soft matching: tokens alternate into sets A (even positions) and B (odd);
each A token's edge goes to its most similar B token (cosine of the attention's keys);
the r A tokens with the most similar edges merge into their B tokens. A merged token is
the size-weighted mean of what it stands for, and its size (how many input tokens it
stands for) is the sum; attention then weighs a token of size s as s copies of it
(proportional attention: a log s logit bias). Padding is a token of size 0: it never
weighs in a mean, and merging it first costs nothing.

It is five module hooks (`hooks.py`), with the sizes and keys in the forward's carry:
  <blocks>             the block's key-padding mask becomes size > 0 after merges
  <blocks>/<attention> proportional attention: logit_bias = log(size)
  <blocks>/<keys>      the keys, recorded (the similarity metric)
  <blocks>/<at>        merge (default `post_attn`: between attention and MLP, as ToMe)
  <tower>              (mmjax's towers) the (tokens, intermediates) output gets the
                       merged mask and the sizes, which the fusion and pooling read
Departures from ToMe: the metric is the key projection's output with its heads
concatenated (the hook sees no head count; ToMe averages keys over heads), and the tokens
left keep their input order (ToMe puts the unmerged A tokens before the B tokens), so
protected leading tokens stay first in every block.
"""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from mmjax.compress.hooks import Around, HookError
from mmjax.compress.protocol import Method
from mmjax.kernels.attention import size_bias


def mergeable(n: int, keep_first: int = 0) -> int:
  """How many tokens one merge step can remove from n: the A set less its protected tokens,
  if at least one B token is free to receive them (else none)."""
  free_a = (n + 1) // 2 - (min(keep_first, n) + 1) // 2
  free_b = n // 2 - min(keep_first, n) // 2
  return max(free_a, 0) if free_b > 0 else 0


def bipartite_merge(x, metric, size, r: int, keep_first: int = 0):
  """x [b, n, d], metric [b, n, c], size [b, n] float -> (x [b, n - r, d], size [b, n - r]).

  The tokens left keep their input order (a B token where it was), so the first
  `keep_first` tokens are never merged and stay first, block after block (a class token)."""
  b, n, _ = x.shape
  if r == 0:
    return x, size
  m = metric / jnp.maximum(jnp.linalg.norm(metric, axis=-1, keepdims=True), 1e-6)
  scores = m[:, 0::2] @ jnp.swapaxes(m[:, 1::2], 1, 2)  # [b, na, nb]
  na, nb = scores.shape[1:]
  protected_b = jnp.arange(nb) * 2 + 1 < keep_first
  scores = jnp.where(protected_b[None, None, :], -jnp.inf, scores)
  node_max = scores.max(-1)
  node_idx = scores.argmax(-1)
  node_max = jnp.where(size[:, 0::2] == 0, 2.0, node_max)  # padding merges first
  node_max = jnp.where((jnp.arange(na) * 2 < keep_first)[None], -jnp.inf, node_max)
  order = jnp.argsort(-node_max, axis=-1, stable=True)
  src, unm = order[:, :r], jnp.sort(order[:, r:], axis=-1)
  dst = jnp.take_along_axis(node_idx, src, axis=-1)

  xa, xb = x[:, 0::2], x[:, 1::2]
  sa, sb = size[:, 0::2], size[:, 1::2]
  take = lambda v, i: jnp.take_along_axis(v, i[..., None] if v.ndim == 3 else i, axis=1)
  add = jax.vmap(lambda t, i, u: t.at[i].add(u))
  weighted_b = add(xb * sb[..., None], dst, take(xa * sa[..., None], src))
  new_sb = add(sb, dst, take(sa, src))
  received = add(jnp.zeros_like(sb), dst, jnp.ones(dst.shape, sb.dtype)) > 0
  new_xb = jnp.where((received & (new_sb > 0))[..., None],  # an untouched token, exactly
                     weighted_b / jnp.maximum(new_sb, 1e-30)[..., None], xb)
  out_x = jnp.concatenate([take(xa, unm), new_xb.astype(x.dtype)], axis=1)
  out_size = jnp.concatenate([take(sa, unm), new_sb], axis=1)
  where = jnp.concatenate([2 * unm, jnp.broadcast_to(2 * jnp.arange(nb) + 1, (b, nb))], 1)
  back = jnp.argsort(where, axis=-1)  # to input order
  return take(out_x, back), take(out_size, back)


def merge_tokens(r, blocks: str, *, tower: str | None = None, attention: str = "attn",
                 keys: str | None = "attn/key", at: str | None = "post_attn",
                 keep_first: int = 0, name: str = "tome") -> Method:
  """A hooks-only method merging `r` tokens in every block whose module path `blocks`
  matches (`r` a sequence: r[i] in a tower's i-th block, ToMe's schedules; as in ToMe, a
  block merges at most half its tokens, and r above the tokens it has is an error).
  `attention`: the attention module under a block (None: no proportional attention; it
  must take `logit_bias`), `keys`: the key projection under a block (None:
  the tokens themselves are the metric), `at`: the module under a block whose output is
  merged (None: the block's output), `tower`: modules returning (tokens, intermediates
  with "mask") to update (mmjax's towers), `keep_first`: tokens never merged."""
  per_block = tuple(r) if isinstance(r, (tuple, list)) else None
  if not all(isinstance(v, int) and v >= 0 for v in (per_block or (r,))):
    raise ValueError(f"token merging {name!r}: r={r!r} must be an int >= 0 (tokens merged "
                     "per block) or a sequence of them (one per block).")
  if keep_first < 0:
    raise ValueError(f"token merging {name!r}: keep_first={keep_first} must be >= 0.")
  block_rx = re.compile(blocks)

  def block_of(path):
    parts = path.split("/")
    for i in range(len(parts), 0, -1):
      if block_rx.fullmatch("/".join(parts[:i])):
        return "/".join(parts[:i])
    raise HookError(f"token merging {name!r}: {path} is under no block matching "
                    f"{blocks!r}.")

  def tower_of(path):
    block = block_of(path)
    return block.rsplit("/", 1)[0] if "/" in block else ""

  def on_block(call, state):
    carry, key = call.carry, ("size", tower_of(call.path))
    mask, args, kwargs = call.arg(1, "mask"), call.args, call.kwargs
    if key in carry and mask is not None:  # this block's key padding: what merges left real
      args, kwargs = call.with_arg(1, "mask", carry[key] > 0)
    elif mask is not None:
      carry[key] = mask.astype(jnp.float32)
    out = call(*args, **kwargs)
    return out if at else merge(call.path, out, carry)

  def merge(block, x, carry):
    key = ("size", tower_of(block))
    index = carry.get(("blocks", key[1]), 0)
    carry["blocks", key[1]] = index + 1
    if per_block is not None and index >= len(per_block):
      raise HookError(f"token merging {name!r}: r={per_block} has {len(per_block)} entries "
                      f"but {block} is block {index + 1} matching {blocks!r}; give one r "
                      "per block.")
    k = per_block[index] if per_block is not None else r
    n = x.shape[1]
    if k > n:
      raise HookError(f"token merging {name!r}: r={k} is more than the {n} tokens block "
                      f"{block} has; set r <= {mergeable(n, keep_first)} (a block merges at "
                      f"most half its tokens, less keep_first={keep_first}), or merge in "
                      "fewer blocks.")
    k = min(k, mergeable(n, keep_first))  # as ToMe: a block merges at most half
    size = carry.get(key)
    if size is None:
      size = jnp.ones(x.shape[:2], jnp.float32)
    metric = carry.pop(("metric", block), x) if keys else x
    x, size = bipartite_merge(x, metric, size, k, keep_first)
    carry[key], carry["merged", key[1]] = size, True
    return x

  def on_attention(call, state):
    t = tower_of(call.path)
    if not call.carry.get(("merged", t)):
      return call()
    return call(*call.args, **{**call.kwargs, "logit_bias": size_bias(call.carry["size", t])})

  def on_keys(call, state):
    out = call()
    call.carry["metric", block_of(call.path)] = out
    return out

  def on_merge_point(call, state):
    return merge(block_of(call.path), call(), call.carry)

  def on_tower(call, state):
    out = call()
    t = call.path
    if not call.carry.get(("merged", t)) or not (
        isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict)
        and "mask" in out[1]):
      return out  # only a (tokens, intermediates with "mask") output has a mask to fix
    x, inter = out
    size = call.carry["size", t]
    if not attention:  # no proportional attention: a merged token counts once downstream too
      return x, {**inter, "mask": size > 0}
    return x, {**inter, "mask": size > 0, "size": size}

  hooks = [(blocks, Around(on_block))]
  if attention:
    hooks.append((f"(?:{blocks})/{attention}", Around(on_attention)))
  if keys:
    hooks.append((f"(?:{blocks})/{keys}", Around(on_keys)))
  if at:
    hooks.append((f"(?:{blocks})/{at}", Around(on_merge_point)))
  if tower:
    hooks.append((tower, Around(on_tower)))
  return Method(name, hooks=tuple(hooks))
