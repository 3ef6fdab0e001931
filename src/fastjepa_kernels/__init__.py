"""fastjepa_kernels: packed variable-length ops for ViT training (torch + Triton).

Every op has a plain-PyTorch reference beside its Triton kernel; ``backend="auto"`` takes the kernel for
CUDA tensors when Triton is installed and the reference elsewhere. Never imports ``fastjepa``.
"""
from ._backend import TRITON_AVAILABLE
from .attention import BACKENDS as ATTENTION_BACKENDS
from .attention import varlen_attention, varlen_attention_qkvpacked
from .bias_gelu import bias_gelu
from .ema import ema_
from .gather import gather_tokens, scatter_tokens
from .layer_norm import fused_add_layer_norm
from .target_loss import jepa_target_loss
from .timm_vit import VarlenAttention, forward_packed, pack_tokens, patch_vit

__all__ = [
    "ATTENTION_BACKENDS",
    "TRITON_AVAILABLE",
    "VarlenAttention",
    "bias_gelu",
    "ema_",
    "forward_packed",
    "fused_add_layer_norm",
    "gather_tokens",
    "jepa_target_loss",
    "pack_tokens",
    "patch_vit",
    "scatter_tokens",
    "varlen_attention",
    "varlen_attention_qkvpacked",
]
