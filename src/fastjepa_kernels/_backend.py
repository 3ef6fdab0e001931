"""One rule for every op's ``backend=`` argument: ``auto`` | ``triton`` | the op's PyTorch reference."""
from __future__ import annotations

import os

import torch

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:
    TRITON_AVAILABLE = False

# torch dtype -> Triton's name for it: every dtype a kernel here takes, and the signature strings of
# the ahead-of-time compiles (fastjepa_kernels.aot)
TRITON_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def interpreting() -> bool:
    """Whether Triton's interpreter runs kernels (on CPU tensors): ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def debugging() -> bool:
    """``FASTJEPA_KERNELS_DEBUG=1``: the ops check what they otherwise trust the caller with (packing,
    index ranges, unique indices), with host syncs. Off by default: no cost."""
    return os.environ.get("FASTJEPA_KERNELS_DEBUG", "0") not in ("", "0")


def use_triton(op: str, backend: str, tensors, dtypes=TRITON_DTYPES, reference: str = "reference",
               supported: bool = True, auto_takes_kernel: bool = True) -> bool:
    """True for the Triton path of ``op``. ``auto``: Triton when it is installed, every tensor is on CUDA
    with a dtype in ``dtypes``, ``supported`` holds and ``auto_takes_kernel`` (False for an op whose
    kernel has not yet beaten its reference on a GPU), else the reference. ``triton``: the same
    conditions, each failing one a clear error (CPU tensors only under the interpreter)."""
    backends = (reference, "triton", "auto")
    if backend not in backends:
        raise ValueError(f"{op} backend {backend!r} is unknown; choose one of {backends}")
    if backend == reference:
        return False
    dtypes_ok = all(t.dtype in dtypes for t in tensors)
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return auto_takes_kernel and TRITON_AVAILABLE and dtypes_ok and supported and on_cuda
    if not TRITON_AVAILABLE:
        raise RuntimeError(f"{op} backend 'triton' needs the triton package (pip install triton)")
    if not dtypes_ok:
        raise TypeError(f"{op} backend 'triton' supports {[str(d) for d in dtypes]}, got {[t.dtype for t in tensors]}")
    if not on_cuda and not interpreting():
        raise RuntimeError(f"{op} backend 'triton' on CPU tensors needs TRITON_INTERPRET=1 (Triton's interpreter)")
    return True


__all__ = ["TRITON_AVAILABLE", "TRITON_DTYPES", "debugging", "interpreting", "use_triton"]
