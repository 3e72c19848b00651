"""Text as a checkpoint's own tokenizer makes it, read from the checkpoint's files:

  * `tokenizer.json` (Hugging Face's format: CLIP's byte-level BPE, BERT's WordPiece, any
    other) through the `tokenizers` package; its normalizer, pre-tokenizer and
    post-processor (CLIP's start and end tokens, BERT's [CLS] and [SEP]) come from the
    file, the pad token and `do_lower_case` from `tokenizer_config.json` beside it when
    there is one;
  * a SentencePiece `.model` (SigLIP's `spiece.model`, big_vision's vocabularies) through
    `sentencepiece`, with SigLIP's conventions: punctuation removed, spaces collapsed,
    lowercased (unless tokenizer_config.json says `do_lower_case: false`), the end token
    appended, padded with it to the full length.

Every text is truncated and padded to `length` (the end token kept), as the references do
with `padding="max_length", truncation=True`; `encode` returns ids int32 and a mask (True
for real tokens). Tests compare both against the reference tokenizers' golden output.

    tok = text_tokenizer.load("/ckpt/clip-vit-base-patch32")   # a directory or the file
    ids, mask = tok.encode(["a photo of a cat."], length=77)
"""
from __future__ import annotations

import json
import os
import re
import string
import threading

import numpy as np

FILES = ("tokenizer.json", "spiece.model")


class TokenizerFileError(ValueError):
  """A tokenizer file that is missing or cannot be read."""


def find(path: str) -> str:
  """The tokenizer file: `path` itself, or in the directory `path` (or beside the
  checkpoint file `path`): tokenizer.json, spiece.model or a single *.model."""
  if os.path.isfile(path) and (path.endswith(".json") or path.endswith(".model")):
    return path
  folder = path if os.path.isdir(path) else os.path.dirname(path)
  for name in FILES:
    if os.path.isfile(os.path.join(folder or ".", name)):
      return os.path.join(folder or ".", name)
  models = sorted(f for f in os.listdir(folder or ".") if f.endswith(".model")) if (
      os.path.isdir(folder or ".")) else []
  if len(models) == 1:
    return os.path.join(folder, models[0])
  raise TokenizerFileError(
      f"no tokenizer file at {path}: expected tokenizer.json or spiece.model (a SentencePiece "
      f".model) there; copy the checkpoint's tokenizer files beside it, or set "
      "config.model.tokenizer to the file.")


def _config(folder: str) -> dict:
  p = os.path.join(folder, "tokenizer_config.json")
  if not os.path.exists(p):
    return {}
  try:
    with open(p) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise TokenizerFileError(f"{p} cannot be read as JSON ({e}); restore it from the "
                             "checkpoint or delete it.") from None


def _token(v):
  return v.get("content") if isinstance(v, dict) else v


class HFTokenizer:
  """tokenizer.json through the `tokenizers` package."""

  def __init__(self, path: str):
    import tokenizers
    try:
      self.tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust library raises its own exception types
      raise TokenizerFileError(f"{path} is not a readable tokenizer.json ({type(e).__name__}: "
                               f"{str(e)[:120]}); restore it from the checkpoint.") from None
    cfg = _config(os.path.dirname(path))
    self.lower = bool(cfg.get("do_lower_case", False))  # (idempotent where the file does)
    pad = _token(cfg.get("pad_token"))
    if pad is None and self.tok.padding:
      pad = self.tok.padding.get("pad_token")
    self.pad_id = self.tok.token_to_id(pad) if pad is not None else 0
    if self.pad_id is None:
      raise TokenizerFileError(f"{path}: its pad token {pad!r} is not in the vocabulary.")
    self.path, self.vocab_size = path, self.tok.get_vocab_size(with_added_tokens=True)
    self._lock = threading.Lock()  # grain reads in threads; the Rust object is not shared
    self._length = None

  def encode(self, texts, length: int):
    with self._lock:
      if length != self._length:  # configured once per length, not per text
        self.tok.enable_truncation(max_length=length)
        self.tok.enable_padding(length=length, pad_id=self.pad_id)
        self._length = length
      enc = self.tok.encode_batch([t.lower() for t in texts] if self.lower else list(texts))
    return (np.array([e.ids for e in enc], np.int32),
            np.array([e.attention_mask for e in enc], bool))


class SentencePieceTokenizer:
  """A SentencePiece .model with SigLIP's conventions (those of big_vision's SigLIP)."""

  def __init__(self, path: str):
    import sentencepiece as spm
    self.sp = spm.SentencePieceProcessor()
    try:
      ok = self.sp.Load(path)
    except Exception as e:  # noqa: BLE001 (sentencepiece raises OSError or RuntimeError)
      ok, why = False, f"{type(e).__name__}: {str(e)[:120]}"
    else:
      why = "not a SentencePiece model"
    if not ok:
      raise TokenizerFileError(f"{path} is not a readable SentencePiece model ({why}); "
                               "restore it from the checkpoint.")
    cfg = _config(os.path.dirname(path))
    self.lower = bool(cfg.get("do_lower_case", True))
    self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else self.sp.piece_to_id("</s>")
    pad = _token(cfg.get("pad_token"))
    self.pad_id = self.sp.piece_to_id(pad) if pad else self.eos_id
    self.path, self.vocab_size = path, self.sp.get_piece_size()
    self._punct = str.maketrans("", "", string.punctuation)

  def canonical(self, text: str) -> str:
    text = re.sub(r"\s+", " ", text.translate(self._punct)).strip()
    return text.lower() if self.lower else text

  def encode(self, texts, length: int):
    ids = np.full((len(texts), length), self.pad_id, np.int32)
    mask = np.zeros((len(texts), length), bool)
    for i, t in enumerate(texts):
      row = self.sp.encode(self.canonical(t))[:length - 1] + [self.eos_id]
      ids[i, :len(row)], mask[i, :len(row)] = row, True
    return ids, mask


def load(path: str):
  """The tokenizer at `path` (a directory, the checkpoint file beside it, or the file)."""
  if not path or not os.path.exists(path):
    raise TokenizerFileError(f"config.model.tokenizer={path}: no such file or directory; "
                             "give the checkpoint's directory or its tokenizer file.")
  f = find(path)
  return HFTokenizer(f) if f.endswith(".json") else SentencePieceTokenizer(f)
