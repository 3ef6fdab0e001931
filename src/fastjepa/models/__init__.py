"""ViT encoder and predictor for I-JEPA, and the online/target pair a run trains."""
from .ijepa import IJEPA, build_models, compile_blocks
from .predictor import Predictor, build_predictor
from .vit import PRESETS, VisionTransformer, build_encoder

__all__ = ["IJEPA", "PRESETS", "Predictor", "VisionTransformer", "build_encoder", "build_models", "build_predictor",
           "compile_blocks"]
