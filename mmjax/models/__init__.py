"""Flax linen modules: blocks, one tower per modality, fusion, the composed model."""
from mmjax.models.config import (AudioConfig, FusionConfig, HeadConfig, ImageConfig,
                                 ModelConfig, TextConfig)
from mmjax.models.multimodal import MultimodalModel
from mmjax.models.presets import PRESETS, get_preset
from mmjax.models.random_inputs import random_inputs

__all__ = ["AudioConfig", "FusionConfig", "HeadConfig", "ImageConfig", "ModelConfig",
           "TextConfig", "MultimodalModel", "PRESETS", "get_preset", "random_inputs"]
