"""Reading and writing weights: the atomic writer and weights-only reader (``files``), the training
checkpoint schema (``train_state``), encoders from any checkpoint (``encoder``), and conversion between the
official, fastjepa and timm layouts (``convert``). Depends only on ``fastjepa.config`` and ``fastjepa.models``
(and the optimizer's parameter groups, to write a resumable converted run)."""
from .files import CheckpointError

__all__ = ["CheckpointError"]
