"""fastjepa_kernels: packed variable-length ops for ViT training.

Standalone (torch only for now; the Triton kernels replace these reference paths behind the same
functions). Never imports ``fastjepa``.
"""
from .attention import varlen_attention, BACKENDS as ATTENTION_BACKENDS
from .ema import ema_
from .gather import gather_tokens, scatter_tokens
from .target_loss import jepa_target_loss

__all__ = [
    "ATTENTION_BACKENDS",
    "ema_",
    "gather_tokens",
    "jepa_target_loss",
    "scatter_tokens",
    "varlen_attention",
]
