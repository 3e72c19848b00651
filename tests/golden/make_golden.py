"""Writes the golden files the pretrained-family tests compare against: each family built
in its reference implementation (Hugging Face transformers, PyTorch) from a small config
with random weights (every tensor perturbed, so LayerNorms and biases are not 1 and 0),
saved as the safetensors a user would have, with inputs and the reference's outputs.

Needs the golden extra (torch, transformers); CI never runs it, the tests read its files:

  python -m venv /tmp/golden && /tmp/golden/bin/pip install -e '.[golden]'
  /tmp/golden/bin/python tests/golden/make_golden.py [--only=vit]

Output, per family, under tests/golden/<family>/: model.safetensors, config.json,
io.npz (inputs and outputs, float32), and versions.json (what made them).
"""
import argparse
import json
import os

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _perturb(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn(p.shape, generator=g))
  return model.eval()


def _save(name, model, io):
  import transformers
  from safetensors.torch import save_file
  out = os.path.join(HERE, name)
  os.makedirs(out, exist_ok=True)
  save_file({k: v.contiguous() for k, v in model.state_dict().items()},
            os.path.join(out, "model.safetensors"))
  model.config.to_json_file(os.path.join(out, "config.json"))
  np.savez(os.path.join(out, "io.npz"),
           **{k: np.asarray(v.detach().numpy() if torch.is_tensor(v) else v, np.float32)
              for k, v in io.items()})
  with open(os.path.join(out, "versions.json"), "w") as f:
    json.dump({"torch": torch.__version__, "transformers": transformers.__version__}, f)
  print(f"{name}: {sum(p.numel() for p in model.parameters()):,} parameters -> {out}")


def vit():
  from transformers import ViTConfig, ViTForImageClassification
  torch.manual_seed(0)
  cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, image_size=32, patch_size=8, num_channels=3,
                  num_labels=5, hidden_act="gelu", layer_norm_eps=1e-12,
                  attn_implementation="eager")
  model = _perturb(ViTForImageClassification(cfg), 1)
  pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
  with torch.no_grad():
    out = model(pixel_values=pixels, output_hidden_states=True)
  io = {"pixel_values": pixels, "logits": out.logits,
        "hidden_states": torch.stack(out.hidden_states)}  # embeddings, then each block
  _save("vit", model, io)
  from transformers import ViTImageProcessor
  _preprocessing("vit", ViTImageProcessor(size={"height": 32, "width": 32}), None)


def clip():
  from transformers import CLIPConfig, CLIPModel
  torch.manual_seed(0)
  tok = clip_tokenizer()
  vocab, bos, eos = len(tok), tok.bos_token_id, tok.eos_token_id
  text = dict(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=16, hidden_act="quick_gelu",
              layer_norm_eps=1e-5, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, image_size=32, patch_size=8, num_channels=3,
                hidden_act="quick_gelu", layer_norm_eps=1e-5)
  cfg = CLIPConfig(text_config=text, vision_config=vision, projection_dim=16,
                   attn_implementation="eager")
  model = _perturb(CLIPModel(cfg), 3)
  g = torch.Generator().manual_seed(4)
  pixels = torch.randn(3, 3, 32, 32, generator=g)
  lengths = [16, 9, 4]  # bos, tokens, eos, then padding
  ids = torch.zeros(3, 16, dtype=torch.long)
  mask = torch.zeros(3, 16, dtype=torch.long)
  for i, n in enumerate(lengths):
    ids[i, :n] = torch.randint(1, bos, (n,), generator=g)
    ids[i, 0], ids[i, n - 1] = bos, eos
    mask[i, :n] = 1
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels,
                output_hidden_states=True)
  io = {"pixel_values": pixels, "input_ids": ids, "attention_mask": mask,
        "image_embeds": out.image_embeds, "text_embeds": out.text_embeds,
        "logits_per_image": out.logits_per_image,
        "text_hidden": out.text_model_output.last_hidden_state,
        "vision_hidden": torch.stack(out.vision_model_output.hidden_states)}
  _save("clip", model, io)
  tok.save_pretrained(os.path.join(HERE, "clip"))
  _preprocessing("clip", _clip_image_processor(), tok)


def siglip():
  from transformers import SiglipConfig, SiglipModel
  torch.manual_seed(0)
  tok = siglip_tokenizer()
  text = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=16, layer_norm_eps=1e-6,
              hidden_act="gelu_pytorch_tanh")
  vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, image_size=32, patch_size=8, num_channels=3,
                layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")
  cfg = SiglipConfig(text_config=text, vision_config=vision, attn_implementation="eager")
  model = _perturb(SiglipModel(cfg), 5)
  g = torch.Generator().manual_seed(6)
  pixels = torch.randn(3, 3, 32, 32, generator=g)
  ids = torch.randint(0, len(tok), (3, 16), generator=g)  # SigLIP: fixed length, no mask
  blocks = []  # each image block's output, caught by hooks (hidden_states is None here)
  for layer in model.vision_model.encoder.layers:
    layer.register_forward_hook(
        lambda m, a, o: blocks.append(o[0] if isinstance(o, tuple) else o))
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels)
  io = {"pixel_values": pixels, "input_ids": ids, "image_embeds": out.image_embeds,
        "text_embeds": out.text_embeds, "logits_per_image": out.logits_per_image,
        "text_hidden": out.text_model_output.last_hidden_state,
        "vision_blocks": torch.stack(blocks)}
  _save("siglip", model, io)
  tok.save_pretrained(os.path.join(HERE, "siglip"))
  from transformers import SiglipImageProcessor
  _preprocessing("siglip", SiglipImageProcessor(size={"height": 32, "width": 32}), tok)


def whisper():
  from transformers import WhisperConfig, WhisperModel
  torch.manual_seed(0)
  cfg = WhisperConfig(vocab_size=99, num_mel_bins=8, d_model=32, encoder_layers=2,
                      encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1,
                      decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=8,
                      max_target_positions=8, activation_function="gelu", pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                      attn_implementation="eager")
  model = _perturb(WhisperModel(cfg), 7)
  features = torch.randn(3, 8, 16, generator=torch.Generator().manual_seed(8))  # [b, mels, frames]
  with torch.no_grad():
    out = model.encoder(input_features=features, output_hidden_states=True)
  io = {"input_features": features, "last_hidden_state": out.last_hidden_state,
        "hidden_states": torch.stack(out.hidden_states)}  # embeddings, blocks, final (normed)
  _save("whisper", model, io)


def bert():
  from transformers import BertConfig, BertForSequenceClassification
  torch.manual_seed(0)
  tok = bert_tokenizer()
  cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=16, type_vocab_size=2,
                   num_labels=3, hidden_act="gelu", layer_norm_eps=1e-12,
                   attn_implementation="eager")
  model = _perturb(BertForSequenceClassification(cfg), 9)
  g = torch.Generator().manual_seed(10)
  ids = torch.randint(1, len(tok), (3, 16), generator=g)
  mask = torch.zeros(3, 16, dtype=torch.long)
  types = torch.zeros(3, 16, dtype=torch.long)
  for i, (n, first) in enumerate([(16, 9), (11, 6), (5, 5)]):  # [CLS] a [SEP] b [SEP], padded
    mask[i, :n] = 1
    types[i, first:n] = 1
    ids[i, n:] = 0
  with torch.no_grad():
    out = model(input_ids=ids, attention_mask=mask, token_type_ids=types,
                output_hidden_states=True)
  io = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types,
        "logits": out.logits, "hidden_states": torch.stack(out.hidden_states)}
  _save("bert", model, io)
  tok.save_pretrained(os.path.join(HERE, "bert"))
  _preprocessing("bert", None, tok)


# ------------------------------------------------ preprocessing: images and tokenizers

TEXTS = ["a photo of a cat.", "A Photo of the DOG!!", "",
         "an airplane, flying over the sea at night with many lights and clouds and birds",
         "hello   world, it's   a dog's   life"]
CORPUS = ("a photo of a cat. a photo of the dog. an airplane flying over the sea at night. "
          "many lights and clouds and birds. hello world. a small red car on the road. "
          "the ship the truck the horse the frog the deer the bird.").split(". ")


def _images():
  g = np.random.default_rng(12)  # sizes that resize up, down, square and not
  return [g.integers(0, 256, size=s, dtype=np.uint8)
          for s in ((40, 56, 3), (32, 32, 3), (61, 45, 3), (20, 24, 3))]


def _preprocessing(name, processor, tok):
  """The reference's preprocessing of raw inputs, beside the model: the image processor's
  pixel_values (channels last) and the tokenizer's ids and masks, padded to 16."""
  out, io = os.path.join(HERE, name), {}
  if processor is not None:
    processor.save_pretrained(out)
    for i, img in enumerate(_images()):
      io[f"image_{i}"] = img
      io[f"pixels_{i}"] = processor(img, return_tensors="np")["pixel_values"][0].transpose(
          1, 2, 0).astype(np.float32)
  if tok is not None:
    enc = tok(TEXTS, padding="max_length", max_length=16, truncation=True, return_tensors="np")
    io["input_ids"] = enc["input_ids"].astype(np.int32)
    io["attention_mask"] = enc["attention_mask"].astype(np.int32)
    with open(os.path.join(out, "texts.json"), "w") as f:
      json.dump(TEXTS, f)
  np.savez(os.path.join(out, "preprocess.npz"), **io)
  print(f"{name}: preprocessing {sorted(io)}")


def _clip_image_processor():
  from transformers import CLIPImageProcessor
  return CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def clip_tokenizer():
  """A byte-level BPE in CLIP's format: the 256 byte symbols, each also word-final, a few
  merges, and CLIP's two special tokens (its tokenizer.json made by transformers)."""
  import tempfile
  from transformers import CLIPTokenizerFast
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
  chars = list(bytes_to_unicode().values())
  merges = ["p h", "ph o", "pho t", "phot o</w>", "c a", "ca t</w>", "d o",
            "do g</w>", "t h", "th e</w>", "o f</w>", "i n", "a n</w>"]
  vocab = chars + [c + "</w>" for c in chars]
  for m in merges:
    vocab.append(m.replace(" ", ""))
  vocab += ["<|startoftext|>", "<|endoftext|>"]
  d = tempfile.mkdtemp()
  with open(os.path.join(d, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(vocab)}, f)
  with open(os.path.join(d, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
  return CLIPTokenizerFast(os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt"),
                           pad_token="<|endoftext|>", model_max_length=16)


def siglip_tokenizer():
  """A SentencePiece unigram model trained on a few sentences, with T5's special ids (pad
  0, eos 1, unk 2), read by SigLIP's own tokenizer class."""
  import tempfile
  import sentencepiece as spm
  from transformers import SiglipTokenizer
  d = tempfile.mkdtemp()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(CORPUS * 4), model_prefix=os.path.join(d, "spiece"),
      vocab_size=60, model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      hard_vocab_limit=False, minloglevel=2)
  return SiglipTokenizer(os.path.join(d, "spiece.model"), model_max_length=16)


def bert_tokenizer():
  """A WordPiece vocabulary of a few dozen words and pieces (uncased)."""
  import tempfile
  from transformers import BertTokenizerFast
  words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", ",", "!", "'", "s", "a", "an",
           "photo", "of", "the", "cat", "dog", "air", "##plane", "fly", "##ing", "over", "sea",
           "at", "night", "with", "many", "light", "##s", "and", "cloud", "bird", "hello",
           "world", "it", "life", "##y"]
  d = tempfile.mkdtemp()
  with open(os.path.join(d, "vocab.txt"), "w") as f:
    f.write("\n".join(words) + "\n")
  return BertTokenizerFast(os.path.join(d, "vocab.txt"), do_lower_case=True,
                           model_max_length=16)


def whisper_features():
  """Whisper's log-mel front end (WhisperFeatureExtractor, 80 bins), on chunks of 1 s
  instead of 30 (the same computation, 100 frames instead of 3000)."""
  from transformers import WhisperFeatureExtractor
  fe = WhisperFeatureExtractor(feature_size=80, chunk_length=1)
  g = np.random.default_rng(11)
  waves = [0.1 * g.normal(size=n).astype(np.float32) for n in (16000, 9000, 2500)]
  waves[1][:3000] *= 8.0  # a loud part: the dynamic-range clamp acts
  feats = fe(waves, sampling_rate=16000, return_tensors="np", padding="max_length")
  padded = np.zeros((3, 16000), np.float32)
  for i, w in enumerate(waves):
    padded[i, :len(w)] = w
  out = os.path.join(HERE, "whisper_features")
  os.makedirs(out, exist_ok=True)
  np.savez(os.path.join(out, "io.npz"), waveform=padded,
           lengths=np.array([len(w) for w in waves]),
           input_features=feats["input_features"].astype(np.float32))
  import transformers
  with open(os.path.join(out, "versions.json"), "w") as f:
    json.dump({"transformers": transformers.__version__, "numpy": np.__version__}, f)
  print(f"whisper_features: {feats['input_features'].shape} -> {out}")


def hf_config_defaults():
  """What transformers' config classes default to, for the keys mmjax.pretrained.hf_config
  reads (a checkpoint's config.json leaves out what equals them)."""
  import transformers as t
  from mmjax.pretrained.hf_config import DEFAULTS
  classes = {"vit": t.ViTConfig, "clip_text": t.CLIPTextConfig,
             "clip_vision": t.CLIPVisionConfig, "clip": t.CLIPConfig,
             "siglip_text": t.SiglipTextConfig, "siglip_vision": t.SiglipVisionConfig,
             "whisper": t.WhisperConfig, "bert": t.BertConfig}
  out = {kind: {k: getattr(cls(), k) for k in DEFAULTS[kind]} for kind, cls in classes.items()}
  out["transformers"] = t.__version__
  with open(os.path.join(HERE, "hf_config_defaults.json"), "w") as f:
    json.dump(out, f, indent=1, sort_keys=True)
  print(f"hf_config_defaults: {len(classes)} config classes")


FAMILIES = {"vit": vit, "clip": clip, "siglip": siglip, "whisper": whisper, "bert": bert,
            "whisper_features": whisper_features, "hf_config_defaults": hf_config_defaults}

if __name__ == "__main__":
  parser = argparse.ArgumentParser()
  parser.add_argument("--only", choices=sorted(FAMILIES), default=None)
  flags = parser.parse_args()
  for name, make in FAMILIES.items():
    if flags.only in (None, name):
      make()
