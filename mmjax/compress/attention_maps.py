"""Cross-modal attention maps, recorded through module hooks, for distillation: the
student's fusion attention (which image and audio tokens the text looks at, and back)
learns the teacher's, as TinyCLIP's affinity mimicking and MiniLM's attention transfer do.

`record_hooks()` makes the forward's fusion intermediates carry
`attention_maps = {"layer_00/text": [b, n_q, n_k], ...}`: every cross-attention's
probabilities, averaged over heads (so a student with fewer heads pairs with its
teacher), padding keys at 0. `pair` matches a student's layers to a teacher's (student
layer i takes teacher layer (i + 1) · L_t / L_s − 1, TinyBERT's uniform mapping), and
`kl` is the mean over the real query tokens of KL(teacher row || student row).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmjax.compress.hooks import Around
from mmjax.compress.token_prune import attention_probs

LAYERS = r"fusion/layer_\d+"


def record_hooks(layers: str = LAYERS, attention: str = "cross_attn",
                 fusion: str = "fusion") -> tuple:
  """Hooks ((pattern, Around), ...) that put the fusion's attention maps in its
  intermediates (the second output of `fusion`)."""
  attn = rf"(?:{layers})/\w+/{attention}"

  def key_of(attention_path):  # fusion/layer_00/text/cross_attn -> layer_00/text
    return "/".join(attention_path.split("/")[-3:-1])

  def record(what):
    def on(call, state):
      out = call()
      call.carry.setdefault(what, {})[key_of(call.path.rsplit("/", 1)[0])] = out
      return out
    return on

  def on_attention(call, state):
    out = call()
    key = key_of(call.path)
    q, k = call.carry["query"].pop(key), call.carry["key"].pop(key)
    call.carry.setdefault("maps", {})[key] = attention_probs(
        q, k, call.module.num_heads, call.kwargs.get("context_mask"),
        call.kwargs.get("logit_bias"))
    return out

  def on_fusion(call, state):
    tokens, inter = call()
    return tokens, {**inter, "attention_maps": call.carry.get("maps", {})}

  return ((f"{attn}/query", Around(record("query"))), (f"{attn}/key", Around(record("key"))),
          (attn, Around(on_attention)), (fusion, Around(on_fusion)))


def maps_of(inter, who: str) -> dict:
  maps = inter.get("fusion", {}).get("attention_maps") if isinstance(inter, dict) else None
  if not maps:
    raise ValueError(f"attention distillation: the {who}'s forward recorded no fusion "
                     "attention maps; it needs a cross fusion (fusion.kind='cross') whose "
                     "layers are fusion/layer_NN/<modality>/cross_attn.")
  return maps


def pair(student: dict, teacher: dict) -> dict:
  """{student key: teacher key}; a ValueError naming both layer lists when they cannot
  be paired (the teacher's layer count is not a multiple of the student's, other
  modalities, or maps of other shapes)."""
  layers = lambda maps: sorted({k.split("/")[0] for k in maps})
  ls, lt = layers(student), layers(teacher)
  why = None
  if len(lt) % len(ls):
    why = (f"the teacher's {len(lt)} layers are not a multiple of the student's "
           f"{len(ls)}")
  out = {}
  for key, m in student.items():
    if why:
      break
    layer, modality = key.split("/")
    i = ls.index(layer)
    tkey = f"{lt[(i + 1) * len(lt) // len(ls) - 1]}/{modality}"
    if tkey not in teacher:
      why = f"the teacher has no {tkey} for the student's {key}"
    elif teacher[tkey].shape != m.shape:
      why = (f"the student's {key} map is {tuple(m.shape)} and the teacher's {tkey} is "
             f"{tuple(teacher[tkey].shape)} (other token counts)")
    out[key] = tkey
  if why:
    raise ValueError(f"attention distillation: the student's fusion layers {ls} cannot be "
                     f"paired with the teacher's {lt}: {why}; give the student a number of "
                     "fusion layers that divides the teacher's, with the same towers and "
                     "token counts.")
  return out


def kl(student_map, teacher_map, query_mask, weights):
  """Mean over real queries and weighted examples of KL(teacher row || student row)."""
  t, s = teacher_map, student_map
  row = jnp.sum(jnp.where(t > 0, t * (jnp.log(jnp.maximum(t, 1e-30))
                                      - jnp.log(jnp.maximum(s, 1e-30))), 0.0), -1)
  q = query_mask.astype(jnp.float32)
  per_example = (row * q).sum(-1) / jnp.maximum(q.sum(-1), 1.0)
  return jnp.sum(per_example * weights) / jnp.maximum(weights.sum(), 1.0)


def loss(student_inter, teacher_inter, weights):
  """The attention-map term: KL averaged over the paired maps."""
  s_maps, t_maps = maps_of(student_inter, "student"), maps_of(teacher_inter, "teacher")
  pairs = pair(s_maps, t_maps)
  terms = []
  for skey, tkey in pairs.items():
    modality = skey.split("/")[1]
    mask = student_inter.get(modality, {}).get("mask")
    if mask is None:
      mask = jnp.ones(s_maps[skey].shape[:2], bool)
    terms.append(kl(s_maps[skey], jax.lax.stop_gradient(t_maps[tkey]), mask, weights))
  return sum(terms) / len(terms)
