"""What the benchmarks and ``benchmarks/profile_step.py`` share: device description, a trainer from a
config, the practical peaks of a device (square-GEMM rate, copy bandwidth), timing helpers.

A plain module (not the conftest) so that scripts import it too: ``benchmarks/`` is on ``sys.path``
both under pytest (the conftest's folder) and for ``python benchmarks/<script>.py``.
"""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch

# Triton kernels run compiled on a GPU and in Triton's interpreter on CPU tensors elsewhere. The
# interpreter is chosen when a kernel is decorated, so this must precede every fastjepa_kernels import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "src" / "fastjepa" / "configs"
CALLS_PER_SYNC = 10


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def describe(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "device_type": device.type}
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
    else:
        info["device"] = cpu_name()
        info["threads"] = torch.get_num_threads()
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_gemm_tflops(device: torch.device, dtype=torch.float32, n: int = 1024, seconds: float = 0.3) -> float:
    """Achieved TFLOP/s of a square matmul: the practical peak of a device without a datasheet entry."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    synchronize(device)
    return 2 * n**3 * count / (time.perf_counter() - start) / 1e12


def time_call(fn, device: torch.device, seconds: float = 0.3) -> float:
    """Mean seconds per call over about ``seconds`` (side measurements, not the benchmark itself)."""
    fn()
    synchronize(device)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn()
        count += 1
    synchronize(device)
    return (time.perf_counter() - start) / count


_COPY_GBPS: dict = {}


def copy_gbps(device: torch.device, nbytes: int | None = None) -> float:
    """Achieved bandwidth of ``dst.copy_(src)`` in GB/s (bytes read + written): the practical peak of a
    memory-bound kernel. 512 MB on CUDA (far beyond L2), 16 MB on CPU; measured once per device."""
    nbytes = nbytes or (512 << 20 if device.type == "cuda" else 16 << 20)
    key = (str(device), nbytes)
    if key not in _COPY_GBPS:
        src = torch.empty(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        _COPY_GBPS[key] = 2 * nbytes / time_call(lambda: dst.copy_(src), device) / 1e9
    return _COPY_GBPS[key]


def host_to_device_gbps(device: torch.device, nbytes: int = 64 << 20) -> float | None:
    """GB/s of a pageable host -> device copy (how the step's batch reaches the GPU); None on CPU."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 4)
    dst = torch.empty(nbytes // 4, device=device)
    return nbytes / time_call(lambda: dst.copy_(src), device) / 1e9


def per_call_seconds(benchmark, fn, device: torch.device, rounds: int | None = None, stat: str = "median") -> float:
    """Time ``fn`` the way a training step issues it: on CUDA each round launches ``CALLS_PER_SYNC`` calls
    back to back and synchronizes once, so host-side dispatch overlaps GPU work (a sync per call would
    charge every small kernel its launch latency). Returns seconds per call; ``extra_info`` says how."""
    calls = CALLS_PER_SYNC if device.type == "cuda" else 1

    def burst():
        for _ in range(calls):
            out = fn()
        synchronize(device)
        return out

    burst()
    benchmark.pedantic(burst, rounds=rounds or (10 if device.type == "cuda" else 5), iterations=1, warmup_rounds=1)
    benchmark.extra_info["calls_per_sync"] = calls
    return getattr(benchmark.stats.stats, stat) / calls


def build_trainer(config, output_dir, overrides=()):
    """``fastjepa.train.Trainer`` from a config file or preset name, quiet (no progress bar, no
    TensorBoard, no loader workers). The one place benchmarks import the trainer from."""
    from fastjepa.config import load_config
    from fastjepa.train import Trainer

    quiet = ["train.progress=off", "train.tensorboard=false", "data.num_workers=0"]
    return Trainer(load_config(config, quiet + list(overrides)), output_dir)


def fashion_mnist_or_synthetic() -> list[str]:
    """The demo trains on Fashion-MNIST; where it is not installed its step is timed on synthetic images."""
    installed = os.path.isfile("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
    return [] if installed else ["data.dataset=synthetic"]
