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


def test_predictor_adds_the_mask_token_outside_the_gather(monkeypatch):
    """The predictor's gather never sees the mask-token row (a hot row would serialise the kernel's
    atomics), and the result and every gradient equal the old formulation: a gather from
    ``cat(context rows, mask token)`` by ``pred_src``."""
    import fastjepa.models.predictor as predictor_mod
    from fastjepa.config import MaskConfig
    from fastjepa.masks import MaskSampler
    from fastjepa.models import Predictor

    torch.manual_seed(0)
    pred = Predictor(grid=(4, 4), embed_dim=24, pred_dim=16, depth=1, num_heads=2).double()
    masks = MaskSampler(MaskConfig(min_keep=1), (4, 4))(3, seed=1)
    context = torch.randn(masks.ctx_index.shape[0], 24, dtype=torch.float64, requires_grad=True)
    gathered = []
    real = predictor_mod.gather_tokens
    monkeypatch.setattr(predictor_mod, "gather_tokens", lambda x, i, **k: gathered.append((x.shape[0], i)) or real(x, i, **k))
    out = pred(context, masks)
    (x_rows, index), = gathered
    assert x_rows == context.shape[0] and int(index.max()) < x_rows  # context rows only

    def old_forward(context):
        x = pred.predictor_embed(context)
        table = torch.cat([x, pred.mask_token.to(x.dtype)], dim=0)
        x = table.index_select(0, masks.pred_src) + pred.pos_embed.to(x.dtype).index_select(0, masks.pred_pos)
        x = pred.blocks[0](x, masks.pred_cu_seqlens, masks.pred_max_seqlen)
        return pred.predictor_proj(pred.norm(x.index_select(0, masks.pred_out)))

    up = torch.randn_like(out)
    params = [context, pred.mask_token, pred.predictor_embed.weight]
    new = torch.autograd.grad(out, params, up)
    old = torch.autograd.grad(old_forward(context), params, up)
    torch.testing.assert_close(out, old_forward(context), rtol=1e-12, atol=1e-12)
    for name, a, b in zip(("context", "mask_token", "predictor_embed"), new, old):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    assert new[1].abs().sum() > 0


@pytest.mark.parametrize("in_chans", [3, 1])
def test_patchify_gives_contiguous_patch_rows(in_chans):
    """The encoder's gather reads [B, N, D] rows with unit stride (vectorised): patchify returns a
    contiguous tensor, the same values as the conv's transposed output."""
    from fastjepa.models import VisionTransformer

    torch.manual_seed(0)
    enc = VisionTransformer(img_size=16, patch_size=4, in_chans=in_chans, embed_dim=32, depth=1, num_heads=2)
    images = torch.randn(2, in_chans, 16, 16)
    x = enc.patchify(images)
    assert x.shape == (2, 16, 32) and x.is_contiguous()
    torch.testing.assert_close(x, enc.patch_embed(images).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)
