"""fastjepa_kernels.timm_vit: the timm drop-in (VarlenAttention, patch_vit, pack_tokens, forward_packed).

- (d, no timm) VarlenAttention's packed forward and gradients vs per-sequence multi-head attention in
  plain float64 torch, with and without qk_norm / scale_norm;
- (a) a timm Attention's state dict loads strictly, padded outputs equal timm's;
- (b) a patched ViT's packed forward of images with different kept-token counts equals each image's
  kept tokens run alone through the unpatched model (blocks + norm), forward and parameter gradients;
- (c) patch_vit leaves the padded forward and the state dict unchanged.

timm imports torchvision at import time (only for names a ViT never uses). Where torchvision cannot be
imported (this CPU torch build) the timm fixture imports timm behind a throwaway torchvision stub.
"""
from __future__ import annotations

import copy
import enum
import importlib.abc
import importlib.machinery
import math
import sys
import types

import pytest
import torch
from torch import nn

from fastjepa_kernels.timm_vit import VarlenAttention, _packed_drop_path, forward_packed, patch_vit

torch.set_num_threads(1)
device = "cuda" if torch.cuda.is_available() else "cpu"


def cu_of(lengths, device="cpu"):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------------------------
# (d) no timm: packed VarlenAttention vs float64 per-sequence attention
# ---------------------------------------------------------------------------------------------------
def naive_mha(module: VarlenAttention, x, lengths):
    """Per sequence, per head, explicit softmax attention in float64 from the module's own weights."""
    p = {n: t.double() for n, t in module.named_parameters()}
    heads, d = module.num_heads, module.head_dim

    def ln(t, prefix):  # nn.LayerNorm over the last dim, eps 1e-5 (the module's norm_layer default)
        t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, unbiased=False, keepdim=True) + 1e-5)
        return t * p[prefix + ".weight"] + p[prefix + ".bias"]

    x = x.double()
    qkv = x @ p["qkv.weight"].T + (p["qkv.bias"] if "qkv.bias" in p else 0)
    q, k, v = qkv.view(-1, 3, heads, d).unbind(1)
    if "q_norm.weight" in p:
        q, k = ln(q, "q_norm"), ln(k, "k_norm")
    out, start = [], 0
    for n in lengths:
        rows = []
        for h in range(heads):
            s = q[start:start + n, h] @ k[start:start + n, h].T / math.sqrt(d)
            w = torch.exp(s - s.max(1, keepdim=True).values)
            rows.append((w / w.sum(1, keepdim=True)) @ v[start:start + n, h])
        out.append(torch.cat(rows, dim=1))
        start += n
    out = torch.cat(out)
    if "norm.weight" in p:
        out = ln(out, "norm")
    return out @ p["proj.weight"].T + p["proj.bias"]


CASES = [  # (dim, heads, lengths, qk_norm, scale_norm)
    (24, 3, [5, 1, 9], False, False),
    (24, 3, [7, 7], True, False),  # equal lengths take the no-padding route of the reference
    (20, 2, [3, 11, 2, 6], True, True),
]


@pytest.mark.parametrize("dim,heads,lengths,qk_norm,scale_norm", CASES)
@pytest.mark.parametrize("backend,dtype", [("sdpa", torch.float64), ("auto", None)])
def test_packed_matches_float64_reference(dim, heads, lengths, qk_norm, scale_norm, backend, dtype):
    if dtype is None:  # the default backend: Triton on CUDA (half precision), SDPA in fp32 on CPU
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dev = "cpu" if dtype == torch.float64 else device
    atol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 5e-2}[dtype]
    torch.manual_seed(0)
    mod = VarlenAttention(dim, heads, qkv_bias=True, qk_norm=qk_norm, scale_norm=scale_norm, backend=backend)
    with torch.no_grad():  # non-trivial norm affines so a skipped norm would show
        for m in (mod.q_norm, mod.k_norm, mod.norm):
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    mod = mod.to(dev, dtype)
    x = torch.randn(sum(lengths), dim, device=dev, dtype=dtype, requires_grad=True)
    out = mod(x, cu_seqlens=cu_of(lengths, dev), max_seqlen=max(lengths))
    assert out.shape == (sum(lengths), dim) and out.dtype == dtype and torch.isfinite(out).all()

    x64 = x.detach().double().cpu().requires_grad_()
    mod64 = copy.deepcopy(mod).double().cpu()
    ref = naive_mha(mod64, x64, lengths)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), atol=atol, rtol=atol)

    g = torch.randn_like(ref)
    out.backward(g.to(dev, dtype))
    ref.backward(g)
    torch.testing.assert_close(x.grad.double().cpu(), x64.grad, atol=atol * 4, rtol=atol * 4)
    # naive_mha reads mod64's parameters, so their grads are the float64 reference gradients
    for (name, p), (_, p64) in zip(mod.named_parameters(), mod64.named_parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad.double().cpu(), p64.grad, atol=atol * 8, rtol=atol * 8, msg=name)


def test_packed_qkv_entry_is_used_when_available(monkeypatch):
    """Without q/k norms the module hands the packed [T, 3, H, d] qkv to varlen_attention_qkvpacked."""
    import fastjepa_kernels.timm_vit as tv

    calls = []

    def fake_qkvpacked(qkv, cu_seqlens, max_seqlen, softmax_scale=None, backend="auto"):
        calls.append((tuple(qkv.shape), max_seqlen, softmax_scale, backend))
        q, k, v = qkv.unbind(1)
        return tv.varlen_attention(q, k, v, cu_seqlens, max_seqlen, softmax_scale, backend=tv._attention_backend(backend))

    torch.manual_seed(3)
    mod = VarlenAttention(16, 2, qkv_bias=True, backend="auto")
    x, cu = torch.randn(9, 16), cu_of([4, 5])
    expected = mod(x, cu_seqlens=cu, max_seqlen=5)
    monkeypatch.setattr(tv, "_varlen_qkvpacked", fake_qkvpacked)
    torch.testing.assert_close(mod(x, cu_seqlens=cu, max_seqlen=5), expected, atol=1e-6, rtol=1e-6)
    assert calls == [((9, 3, 2, 8), 5, 8 ** -0.5, tv._attention_backend("auto"))]
    VarlenAttention(16, 2, qk_norm=True)(x, cu_seqlens=cu, max_seqlen=5)  # q/k norms: separate q, k, v
    assert len(calls) == 1


def test_packed_drop_path_is_per_sequence():
    torch.manual_seed(1)
    lengths = [3, 5, 1, 4, 2, 6]
    seq_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    dp = nn.Module()
    dp.drop_prob, dp.scale_by_keep = 0.5, True
    dp.train()
    out = _packed_drop_path(torch.ones(sum(lengths), 4), dp, seq_ids, len(lengths))
    for chunk in out.split(lengths):
        assert (chunk == chunk[0, 0]).all() and chunk[0, 0].item() in (0.0, 2.0)
    dp.eval()
    assert (_packed_drop_path(torch.ones(3, 4), dp, torch.zeros(3, dtype=torch.long), 1) == 1).all()


def test_packed_rejects_attention_dropout_in_training():
    mod = VarlenAttention(8, 2, attn_drop=0.1).train()
    with pytest.raises(NotImplementedError):
        mod(torch.randn(4, 8), cu_seqlens=cu_of([4]), max_seqlen=4)


# ---------------------------------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------------------------------
class _StubTorchvision(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves any ``torchvision.*`` import with a module whose attributes are inert placeholders."""

    class _Meta(type):
        def __getattr__(cls, name):
            if name.startswith("__"):
                raise AttributeError(name)
            return cls

    Any = _Meta("Any", (), {"__init__": lambda self, *a, **k: None})
    InterpolationMode = enum.Enum(
        "InterpolationMode", [(n, n.lower()) for n in ("NEAREST", "NEAREST_EXACT", "BILINEAR", "BICUBIC", "BOX", "HAMMING", "LANCZOS")]
    )

    def find_spec(self, fullname, path, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        stub = self

        class Module(types.ModuleType):
            def __getattr__(self, name):
                if name.startswith("__"):
                    raise AttributeError(name)
                return stub.InterpolationMode if name == "InterpolationMode" else stub.Any

        return Module(spec.name)

    def exec_module(self, module):
        module.__path__ = []


@pytest.fixture(scope="module")
def timm():
    try:
        import timm as timm_mod
        return timm_mod
    except ImportError as exc:
        if "torchvision" not in str(exc) and "torchvision" not in repr(exc.__cause__) and "nms" not in str(exc):
            pytest.skip(f"timm not importable: {exc}")
    except RuntimeError as exc:  # a torchvision wheel built for another torch: "torchvision::nms does not exist"
        if "torchvision" not in str(exc):
            raise
    # Clean out the half-imported modules, import timm behind the stub, then drop the stub again.
    for name in [n for n in sys.modules if n.split(".")[0] in ("timm", "torchvision")]:
        del sys.modules[name]
    finder = _StubTorchvision()
    sys.meta_path.insert(0, finder)
    try:
        import timm as timm_mod
    except ImportError as exc:
        pytest.skip(f"timm not importable: {exc}")
    finally:
        sys.meta_path.remove(finder)
        for name in [n for n in sys.modules if n.split(".")[0] == "torchvision"]:
            del sys.modules[name]
    return timm_mod


def tiny_vit(timm, **kw):
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=24, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, qkv_bias=True)
    args.update(kw)
    torch.manual_seed(0)
    model = VisionTransformer(**args).eval()
    with torch.no_grad():  # timm initialises cls/reg tokens and LayerScale small; make them matter
        for name, p in model.named_parameters():
            if "token" in name or name.endswith(".gamma") or "pos_embed" in name:
                p.normal_(0, 0.5)
    return model


VITS = {
    "cls": dict(),
    "nocls_qknorm_ls": dict(class_token=False, global_pool="avg", qk_norm=True, init_values=0.5),
    "reg_noembedcls": dict(reg_tokens=2, no_embed_class=True, qk_norm=True),
}


def test_attention_state_dict_and_padded_forward(timm):
    from timm.layers import Attention

    torch.manual_seed(0)
    for kw in (dict(qkv_bias=True), dict(qk_norm=True, norm_layer=nn.LayerNorm, proj_bias=False)):
        ref = Attention(36, num_heads=4, **kw).eval()
        mod = VarlenAttention(36, num_heads=4, **kw).eval()
        assert list(mod.state_dict()) == list(ref.state_dict())
        mod.load_state_dict(ref.state_dict(), strict=True)
        x = torch.randn(3, 10, 36)
        torch.testing.assert_close(mod(x), ref(x), atol=1e-6, rtol=1e-5)
        mask = torch.rand(3, 1, 10, 10) > 0.3
        mask[..., 0] = True  # no fully masked row
        torch.testing.assert_close(mod(x, attn_mask=mask), ref(x, attn_mask=mask), atol=1e-6, rtol=1e-5)
        # from_timm shares the parameters themselves
        shared = VarlenAttention.from_timm(ref)
        assert shared.qkv.weight is ref.qkv.weight and shared.proj.weight is ref.proj.weight
        torch.testing.assert_close(shared(x), ref(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VITS))
def test_patch_vit_keeps_padded_forward(timm, variant):
    model = tiny_vit(timm, **VITS[variant])
    images = torch.randn(2, 3, 24, 24)
    before, keys = model(images), list(model.state_dict())
    sd = copy.deepcopy(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    patch_vit(model)
    assert all(isinstance(b.attn, VarlenAttention) for b in model.blocks)
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())  # an existing optimizer stays valid
    model.load_state_dict(sd, strict=True)
    torch.testing.assert_close(model(images), before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", list(VITS))
@pytest.mark.parametrize("keep_as", ["indices", "mask"])
def test_forward_packed_matches_per_image(timm, variant, keep_as):
    ref_model = tiny_vit(timm, **VITS[variant])
    model = patch_vit(copy.deepcopy(ref_model))
    torch.manual_seed(2)
    images = torch.randn(3, 3, 24, 24)
    n_patches = model.patch_embed.num_patches  # 9
    keep = [torch.randperm(n_patches)[:k].sort().values for k in (4, 9, 1)]
    if keep_as == "mask":
        keep_arg = torch.zeros(3, n_patches, dtype=torch.bool)
        for b, idx in enumerate(keep):
            keep_arg[b, idx] = True
    else:
        keep_arg = keep
    tokens, cu_seqlens, max_seqlen = model.pack_tokens(images, keep_arg)
    prefix = model.num_prefix_tokens
    lengths = [prefix + len(idx) for idx in keep]
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == cu_of(lengths).tolist()
    assert max_seqlen == max(lengths) and tokens.shape == (sum(lengths), model.embed_dim)
    out = model.forward_packed(tokens, cu_seqlens, max_seqlen)
    assert torch.equal(out, forward_packed(model, tokens, cu_seqlens, max_seqlen))

    refs = []
    for b, idx in enumerate(keep):  # each image alone through the unpatched timm model
        x = ref_model._pos_embed(ref_model.patch_embed(images[b:b + 1]))
        x = torch.cat([x[:, :prefix], x[:, prefix + idx]], dim=1)
        refs.append(ref_model.norm(ref_model.blocks(ref_model.norm_pre(x)))[0])
    ref = torch.cat(refs)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    ref_params = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        if ref_params[name].grad is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        torch.testing.assert_close(p.grad, ref_params[name].grad, atol=1e-4, rtol=1e-4, msg=name)


def test_forward_packed_grad_checkpointing_and_timm_model(timm):
    model = patch_vit(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, depth=2))
    model.set_grad_checkpointing(True)
    model.train()
    images = torch.randn(2, 3, 32, 32)
    tokens, cu_seqlens, max_seqlen = model.pack_tokens(images, [torch.tensor([0, 3]), torch.tensor([2, 1, 0])])
    out = model.forward_packed(tokens, cu_seqlens, max_seqlen)
    out.square().mean().backward()
    assert out.shape == (2 + 3 + 2, 192)
    assert model.blocks[0].attn.qkv.weight.grad is not None and torch.isfinite(model.blocks[0].attn.qkv.weight.grad).all()
