"""A byte-level tokenizer: nothing to download, every string encodable.

Ids: 0 = padding, 1 = begin, 2 = end, byte b -> b + 3; vocabulary 259. Larger model
vocabularies (the `base` preset's 32000) simply leave the upper ids to other tokenizers.
"""
from __future__ import annotations

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
BYTE_OFFSET = 3
VOCAB_SIZE = 256 + BYTE_OFFSET


def encode(text: str, max_len: int, *, add_bos: bool = True, add_eos: bool = True):
  """One string -> (ids int32 [max_len], mask bool [max_len]); truncates at max_len."""
  if max_len <= 0:
    raise ValueError(f"max_len must be positive, got {max_len}.")
  ids = [b + BYTE_OFFSET for b in text.encode("utf-8")]
  ids = ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])
  ids = ids[:max_len]
  out = np.full((max_len,), PAD_ID, np.int32)
  out[:len(ids)] = ids
  return out, out != PAD_ID


def encode_batch(texts, max_len: int, **kw):
  """Strings -> (ids int32 [n, max_len], mask bool [n, max_len])."""
  pairs = [encode(t, max_len, **kw) for t in texts]
  return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def decode(ids) -> str:
  """Ids -> string, dropping special tokens."""
  data = bytes(int(i) - BYTE_OFFSET for i in np.asarray(ids).ravel() if i >= BYTE_OFFSET)
  return data.decode("utf-8", errors="replace")
