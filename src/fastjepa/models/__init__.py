"""ViT encoder and predictor for I-JEPA."""
from .predictor import Predictor, build_predictor
from .vit import PRESETS, VisionTransformer, build_encoder

__all__ = ["PRESETS", "Predictor", "VisionTransformer", "build_encoder", "build_predictor"]
