"""Pretrained encoders as mmjax model modules (`config.model_module`): pure Flax modules on
mmjax's attention kernel, with loaders for the checkpoints users have (Hugging Face
safetensors; big_vision `.npz` for ViT and SigLIP). Each module's `family(args)` is what the harness
loads; its `load(path, abstract)` reads a checkpoint from disk (never downloads) and names
every missing, unexpected or mis-shaped key.

  encoder.py            the transformer block the families share (pre- or post-LN, eps)
  checkpoint_files.py   read safetensors; map a checkpoint's names onto a params tree
  vit.py                ViT (the AugReg/DeiT layout of Hugging Face's ViTModel)
  clip.py               CLIP's two towers (Hugging Face's CLIPModel)
  siglip.py             SigLIP's two towers (Hugging Face's SiglipModel)
  whisper.py            Whisper's audio encoder (Hugging Face's WhisperModel.encoder)
  whisper_features.py   Whisper's log-mel front end, in JAX
  bert.py               BERT's encoder (Hugging Face's BertModel)
  big_vision.py         big_vision / vision_transformer .npz checkpoints (ViT, SigLIP)
  hf_config.py          a Hugging Face config.json -> the family's sizes
  image_processing.py   images resized, cropped and normalized as the reference processors
  text_tokenizer.py     the checkpoint's own tokenizer (tokenizer.json, SentencePiece)
  inputs.py             Family.preprocess for the families; zero-shot class-name prompts
  fetch.py              CLI: download a Hub checkpoint, on request only

experiments/configs/pretrained.py runs them on TFDS datasets by config (zero-shot, probe,
fine-tune, any compression method).
"""
