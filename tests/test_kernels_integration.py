"""The trainer on the Triton kernels equals the trainer on the PyTorch references.

``model.attention_backend=triton`` switches attention, the token gathers, the target loss and the EMA to
the Triton ops (run by Triton's interpreter on CPU, compiled on a GPU); ``sdpa`` keeps every reference
path. Same seed, same masks, fp32: three training steps must give the same losses, gradients' effect
(online weights) and EMA target within fp32 round-off.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
pytest.importorskip("pydantic", reason="the trainer's config needs pydantic (absent on a bare GPU machine)")

from fastjepa.config import load_config  # noqa: E402
from fastjepa.train import Trainer  # noqa: E402


def run(tmp_path, tiny, backend, steps=3):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config(None, tiny + [f"model.attention_backend={backend}", f"train.device={device}",
                                    f"train.max_steps={steps}"])
    trainer = Trainer(cfg, tmp_path / backend)
    batches = [trainer.batches[(0, s)] for s in range(steps)]
    losses = [float(trainer.train_step([b])["loss"]) for b in batches]
    return trainer, losses


def test_triton_step_matches_reference_step(tmp_path, tiny):
    ref, ref_losses = run(tmp_path, tiny, "sdpa")
    tri, tri_losses = run(tmp_path, tiny, "triton")
    assert tri.step_fn.ops_backend == "triton" and ref.step_fn.ops_backend == "reference"
    assert all(b.attn.backend == "triton" for b in tri.model.encoder.blocks)
    torch.testing.assert_close(torch.tensor(tri_losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-6)
    assert ref_losses[0] != ref_losses[-1]  # the weights moved between steps
    for (name, a), b in zip(ref.model.named_parameters(), tri.model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    for (name, a), b in zip(ref.target.named_parameters(), tri.target.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_triton_backend_without_triton_is_a_clear_error(monkeypatch):
    import fastjepa_kernels
    from fastjepa.models.vit import resolve_backend

    monkeypatch.setattr(fastjepa_kernels, "TRITON_AVAILABLE", False)
    with pytest.raises(ValueError, match="model.attention_backend='triton' needs the triton package"):
        resolve_backend("triton")
    assert resolve_backend("auto") == "auto"
