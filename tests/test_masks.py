"""Property tests of the multi-block mask sampler and its packed layout.

References used here, independent of fastjepa.masks:
- the block-size formula of facebookresearch/ijepa ``src/masks/multiblock.py`` re-derived below
  (with the documented fix: clamp to [1, H] instead of the official ``while h >= H: h -= 1``);
- naive per-image / per-block loops for every packed tensor (flat indices, cu_seqlens, predictor
  source/position/output rows).
"""
from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fastjepa.config import MaskConfig
from fastjepa.masks import MaskSampler, PackedMasks, pack_masks

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

OFFICIAL = MaskConfig()  # 4 targets, 0.15-0.2, aspect 0.75-1.5, context 0.85-1.0, min_keep 10


# ---------------------------------------------------------------------------------------------------
# independent references
# ---------------------------------------------------------------------------------------------------
def expected_block_size(u, scale, aspect, height, width):
    """The official ``_sample_block_size`` for one shared uniform ``u`` (fixed clamp to [1, H])."""
    mask_scale = scale[0] + u * (scale[1] - scale[0])
    max_keep = int(height * width * mask_scale)
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    h = int(round(math.sqrt(max_keep * ar)))
    w = int(round(math.sqrt(max_keep / ar)))
    return min(max(h, 1), height), min(max(w, 1), width)


def official_block_size(u, scale, aspect, height, width):
    """The official formula verbatim (with its ``while h >= height`` clamp), for contrast."""
    mask_scale = scale[0] + u * (scale[1] - scale[0])
    max_keep = int(height * width * mask_scale)
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    h = int(round(math.sqrt(max_keep * ar)))
    w = int(round(math.sqrt(max_keep / ar)))
    while h >= height:
        h -= 1
    while w >= width:
        w -= 1
    return h, w


def rect(height, width, top, left, h, w):
    m = np.zeros((height, width), dtype=bool)
    m[top : top + h, left : left + w] = True
    return m


def as_rectangle(local, height, width):
    """(top, left, h, w) when the local patch ids form a full axis-aligned rectangle, else None."""
    local = np.asarray(local)
    if local.size == 0:
        return None
    r, c = np.divmod(local, width)
    top, left = r.min(), c.min()
    h, w = r.max() - top + 1, c.max() - left + 1
    ref = np.flatnonzero(rect(height, width, top, left, h, w))
    if len(local) != len(ref) or not np.array_equal(np.sort(local), ref):
        return None
    return int(top), int(left), int(h), int(w)


class ScriptedRng:
    """A generator whose uniform draws (the block sizes) are scripted; positions come from a real one.
    A budget on position draws turns a sampler that never terminates into a test failure."""

    def __init__(self, uniforms, seed, budget=20_000):
        self.uniforms = list(uniforms)
        self.real = np.random.default_rng(seed)
        self.budget = budget

    def random(self):
        assert self.uniforms, "the sampler drew more than one size per block kind"
        return self.uniforms.pop(0)

    def integers(self, *args, **kwargs):
        self.budget -= 1
        if self.budget < 0:
            raise AssertionError("the sampler is still drawing positions after 20000 tries: it never ends")
        return self.real.integers(*args, **kwargs)


def unpack(pm: PackedMasks, num_targets):
    """Naive per-image views of a PackedMasks (local ids)."""
    n = pm.num_patches
    ctx_cu = pm.ctx_cu_seqlens.tolist()
    tgt_cu = pm.tgt_cu_seqlens.tolist()
    ci = pm.ctx_index.numpy().astype(np.int64)
    ti = pm.tgt_index.numpy().astype(np.int64)
    contexts = [ci[ctx_cu[b] : ctx_cu[b + 1]] - b * n for b in range(len(ctx_cu) - 1)]
    targets = [
        [ti[tgt_cu[b * num_targets + m] : tgt_cu[b * num_targets + m + 1]] - b * n for m in range(num_targets)]
        for b in range(len(ctx_cu) - 1)
    ]
    return contexts, targets


def check_cu(cu: torch.Tensor, lens, total):
    assert cu.dtype == torch.int32 and cu.dim() == 1
    assert cu.shape[0] == len(lens) + 1
    assert int(cu[0]) == 0
    assert np.array_equal(np.diff(cu.numpy().astype(np.int64)), np.asarray(lens, dtype=np.int64))
    assert int(cu[-1]) == total


def check_packed_layout(pm, batch, num_targets, height, width):
    """Counts, dtypes, bounds, segment ownership and the predictor layout against naive loops."""
    n = height * width
    assert pm.num_patches == n
    assert pm.batch_size == batch
    assert len(pm.ctx_lens) == batch
    assert len(pm.tgt_lens) == batch * num_targets
    assert len(pm.pred_lens) == batch * num_targets
    for t in (pm.ctx_index, pm.tgt_index, pm.pred_src, pm.pred_pos, pm.pred_out):
        assert t.dtype == torch.int32 and t.dim() == 1
    t_ctx, t_tgt = pm.ctx_index.numel(), pm.tgt_index.numel()
    check_cu(pm.ctx_cu_seqlens, pm.ctx_lens, t_ctx)
    check_cu(pm.tgt_cu_seqlens, pm.tgt_lens, t_tgt)
    check_cu(pm.pred_cu_seqlens, pm.pred_lens, pm.pred_src.numel())
    assert pm.pred_pos.numel() == pm.pred_src.numel()
    assert pm.pred_out.numel() == t_tgt
    assert pm.ctx_max_seqlen == max(pm.ctx_lens)
    assert pm.pred_max_seqlen == max(pm.pred_lens)

    ci = pm.ctx_index.numpy().astype(np.int64)
    ti = pm.tgt_index.numpy().astype(np.int64)
    src = pm.pred_src.numpy().astype(np.int64)
    pos = pm.pred_pos.numpy().astype(np.int64)
    out = pm.pred_out.numpy().astype(np.int64)
    ctx_cu = pm.ctx_cu_seqlens.numpy().astype(np.int64)
    tgt_cu = pm.tgt_cu_seqlens.numpy().astype(np.int64)
    pred_cu = pm.pred_cu_seqlens.numpy().astype(np.int64)

    for b in range(batch):
        seg = ci[ctx_cu[b] : ctx_cu[b + 1]]
        assert ((seg // n) == b).all(), "a context index belongs to another image"
        assert (seg >= 0).all() and (seg < batch * n).all()
        assert len(np.unique(seg)) == len(seg), "duplicate context token"
        assert (np.diff(seg) > 0).all(), "context indices are documented as sorted"
    for j in range(batch * num_targets):
        b = j // num_targets
        seg = ti[tgt_cu[j] : tgt_cu[j + 1]]
        assert ((seg // n) == b).all(), "a target index belongs to another image"
        assert len(np.unique(seg)) == len(seg)

    # predictor layout, sequence by sequence, against a hand-built one
    for j in range(batch * num_targets):
        b = j // num_targets
        lc, lt = pm.ctx_lens[b], pm.tgt_lens[j]
        assert pm.pred_lens[j] == lc + lt
        rows = slice(pred_cu[j], pred_cu[j + 1])
        s, p = src[rows], pos[rows]
        assert np.array_equal(s[:lc], np.arange(ctx_cu[b], ctx_cu[b + 1])), "context rows in order"
        assert (s[lc:] == t_ctx).all(), "mask-token rows must point at row T_ctx"
        assert (s < t_ctx + 1).all() and (s >= 0).all()
        assert np.array_equal(p[:lc], ci[ctx_cu[b] : ctx_cu[b + 1]] - b * n)
        assert np.array_equal(p[lc:], ti[tgt_cu[j] : tgt_cu[j + 1]] - b * n)
        assert (p >= 0).all() and (p < n).all()
        assert np.array_equal(out[tgt_cu[j] : tgt_cu[j + 1]], np.arange(pred_cu[j] + lc, pred_cu[j + 1]))


# ---------------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------------
GRIDS = st.sampled_from([(3, 3), (4, 4), (5, 9), (9, 5), (7, 7), (8, 8), (6, 11), (14, 14), (16, 16), (12, 16)])


@st.composite
def scale_pair(draw, lo, hi):
    a = draw(st.floats(lo, hi))
    b = draw(st.floats(a, hi))
    return (a, b)


@st.composite
def mask_cfgs(draw):
    return MaskConfig(
        num_targets=draw(st.integers(1, 4)),
        target_scale=draw(scale_pair(0.05, 0.5)),
        target_aspect=draw(scale_pair(0.5, 2.0)),
        context_scale=draw(scale_pair(0.4, 1.0)),
        context_aspect=draw(st.sampled_from([(1.0, 1.0), (0.75, 1.5)])),
        min_keep=draw(st.integers(1, 6)),
        allow_overlap=draw(st.booleans()),
        truncate=draw(st.booleans()),
    )


def make_sampler_or_skip(cfg, grid):
    """The sampler, or (when it refuses) confirm independently that the settings are impossible."""
    h, w = grid
    try:
        sampler = MaskSampler(cfg, grid)
    except ValueError:
        # must be genuinely impossible: min_keep out of range, or some drawable block below min_keep
        smallest = fine_min_area(cfg, grid, points=2049)  # a superset of any coarser dyadic grid of u
        assert cfg.min_keep > h * w or smallest < cfg.min_keep, "sampler refused a feasible config"
        assume(False)
    # accepted: skip configs where some rare draw gives a block below min_keep (that defect has its own
    # xfail test below; here it would make the context loop spin forever)
    assume(fine_min_area(cfg, grid) >= cfg.min_keep)
    return sampler


def block_areas(us, scale, aspect, height, width):
    """expected_block_size's area for an array of u (numpy, same float64 maths, round half to even)."""
    max_keep = np.floor(height * width * (scale[0] + us * (scale[1] - scale[0])))
    ar = aspect[0] + us * (aspect[1] - aspect[0])
    h = np.clip(np.round(np.sqrt(max_keep * ar)), 1, height)
    w = np.clip(np.round(np.sqrt(max_keep / ar)), 1, width)
    return (h * w).astype(np.int64)


def fine_min_area(cfg, grid, points=16385):
    us = np.linspace(0.0, 1.0, points)
    return int(min(block_areas(us, cfg.target_scale, cfg.target_aspect, *grid).min(),
                   block_areas(us, cfg.context_scale, cfg.context_aspect, *grid).min()))


def test_block_areas_vectorised_equals_scalar_formula():
    us = np.linspace(0, 1, 1001)
    for grid, scale, aspect in [((16, 16), (0.15, 0.2), (0.75, 1.5)), ((5, 9), (0.05, 0.5), (0.5, 2.0)),
                                ((9, 7), (0.23, 0.5), (1.1, 2.5)), ((3, 3), (0.4, 1.0), (1.0, 1.0))]:
        ref = [int(np.prod(expected_block_size(u, scale, aspect, *grid))) for u in us]
        assert block_areas(us, scale, aspect, *grid).tolist() == ref


# ---------------------------------------------------------------------------------------------------
# counts, layout, bounds
# ---------------------------------------------------------------------------------------------------
@settings(max_examples=60, **SETTINGS)
@given(cfg=mask_cfgs(), grid=GRIDS, batch=st.integers(1, 6), seed=st.integers(0, 2**31 - 1),
       step=st.integers(0, 10**6))
def test_packed_layout_properties(cfg, grid, batch, seed, step):
    sampler = make_sampler_or_skip(cfg, grid)
    pm = sampler(batch, seed=seed, epoch=1, step=step, rank=0)
    check_packed_layout(pm, batch, cfg.num_targets, *grid)
    contexts, targets = unpack(pm, cfg.num_targets)
    h, w = grid
    sizes = set()
    for b in range(batch):
        assert len(contexts[b]) >= cfg.min_keep
        for t in targets[b]:
            r = as_rectangle(t, h, w)
            assert r is not None, "target block is not a full rectangle"
            top, left, bh, bw = r
            assert top + bh <= h and left + bw <= w
            sizes.add((bh, bw))
    assert len(sizes) == 1, f"target blocks must share one size per batch, got {sizes}"
    if cfg.truncate:
        assert len(set(pm.ctx_lens)) == 1


@settings(max_examples=40, **SETTINGS)
@given(grid=GRIDS, batch=st.integers(1, 5), m=st.integers(1, 4), data=st.data())
def test_pack_masks_arbitrary_sets(grid, batch, m, data):
    """pack_masks on arbitrary (non-rectangular) index sets equals the hand-built layout."""
    n = grid[0] * grid[1]
    ids = st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True).map(lambda v: np.array(sorted(v)))
    contexts = [data.draw(ids) for _ in range(batch)]
    targets = [[data.draw(ids) for _ in range(m)] for _ in range(batch)]
    pm = pack_masks(contexts, targets, n)
    check_packed_layout(pm, batch, m, *grid)
    got_c, got_t = unpack(pm, m)
    for b in range(batch):
        assert np.array_equal(got_c[b], contexts[b])
        for j in range(m):
            assert np.array_equal(got_t[b][j], targets[b][j])


# ---------------------------------------------------------------------------------------------------
# geometry with scripted block sizes
# ---------------------------------------------------------------------------------------------------
def contexts_explained(context, targets, ctx_size, height, width):
    """Set of k such that context == R \\ (T_0 | ... | T_{k-1}) for some placement R of ctx_size."""
    hc, wc = ctx_size
    c = np.zeros(height * width, dtype=bool)
    c[context] = True
    tgt = [np.zeros(height * width, dtype=bool) for _ in targets]
    for t, ids in zip(tgt, targets):
        t[ids] = True
    ks = set()
    for top in range(height - hc + 1):
        for left in range(width - wc + 1):
            region = rect(height, width, top, left, hc, wc).reshape(-1)
            if not (c & ~region).any():  # context must lie in the rectangle
                for k in range(len(targets) + 1):
                    excl = np.zeros_like(region)
                    for t in tgt[:k]:
                        excl |= t
                    if np.array_equal(region & ~excl, c):
                        ks.add(k)
    return ks


@settings(max_examples=40, **SETTINGS)
@given(cfg=mask_cfgs(), grid=GRIDS, batch=st.integers(1, 4), u_t=st.floats(0, 1), u_c=st.floats(0, 1),
       seed=st.integers(0, 2**32 - 1))
def test_sample_geometry_matches_official_semantics(cfg, grid, batch, u_t, u_c, seed):
    sampler = make_sampler_or_skip(cfg.model_copy(update={"truncate": False}), grid)
    h, w = grid
    contexts, targets = sampler.sample(batch, ScriptedRng([u_t, u_c], seed))
    t_size = expected_block_size(u_t, cfg.target_scale, cfg.target_aspect, h, w)
    c_size = expected_block_size(u_c, cfg.context_scale, cfg.context_aspect, h, w)
    for b in range(batch):
        assert len(targets[b]) == cfg.num_targets
        for t in targets[b]:
            r = as_rectangle(t, h, w)
            assert r is not None and r[2:] == t_size
        ctx = np.asarray(contexts[b])
        assert len(ctx) >= cfg.min_keep
        assert ((ctx >= 0) & (ctx < h * w)).all()
        ks = contexts_explained(ctx, targets[b], c_size, h, w)
        assert ks, "context is not (a context-size rectangle) minus a prefix of the target blocks"
        if cfg.allow_overlap:
            assert 0 in ks, "with allow_overlap the context is a plain rectangle"


def test_official_defaults_never_fall_back_on_16x16():
    """With the official scales on 16x16, the context always excludes every target block."""
    sampler = MaskSampler(OFFICIAL, (16, 16))
    for step in range(60):
        pm = sampler(8, seed=123, epoch=0, step=step)
        contexts, targets = unpack(pm, 4)
        for b in range(8):
            ctx = set(contexts[b].tolist())
            assert len(ctx) >= OFFICIAL.min_keep
            for t in targets[b]:
                assert not (ctx & set(t.tolist())), f"context overlaps a target (step {step}, image {b})"


def test_context_lengths_vary_without_truncation():
    """fastjepa keeps every token: over a batch the context sizes differ (the official cut would not)."""
    sampler = MaskSampler(OFFICIAL, (16, 16))
    lens = sampler(32, seed=7).ctx_lens
    assert len(set(lens)) > 1
    assert min(lens) >= OFFICIAL.min_keep


# ---------------------------------------------------------------------------------------------------
# determinism and truncation
# ---------------------------------------------------------------------------------------------------
def _packed_equal(a, b):
    names = ["ctx_index", "ctx_cu_seqlens", "tgt_index", "tgt_cu_seqlens", "pred_src", "pred_pos", "pred_out",
             "pred_cu_seqlens"]
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in names) and a.ctx_lens == b.ctx_lens


@settings(max_examples=25, **SETTINGS)
@given(seed=st.integers(0, 2**31 - 1), epoch=st.integers(0, 300), step=st.integers(0, 10**6),
       rank=st.integers(0, 63))
def test_determinism(seed, epoch, step, rank):
    sampler = MaskSampler(OFFICIAL, (16, 16))
    a = sampler(8, seed=seed, epoch=epoch, step=step, rank=rank)
    b = MaskSampler(OFFICIAL, (16, 16))(8, seed=seed, epoch=epoch, step=step, rank=rank)
    assert _packed_equal(a, b)
    for other in (
        sampler(8, seed=seed, epoch=epoch, step=step + 1, rank=rank),
        sampler(8, seed=seed, epoch=epoch + 1, step=step, rank=rank),
        sampler(8, seed=seed, epoch=epoch, step=step, rank=rank + 1),
        sampler(8, seed=seed + 1, epoch=epoch, step=step, rank=rank),
    ):
        assert not _packed_equal(a, other)


@settings(max_examples=30, **SETTINGS)
@given(cfg=mask_cfgs(), grid=GRIDS, batch=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_truncate_cuts_to_batch_minimum(cfg, grid, batch, seed):
    full_cfg = cfg.model_copy(update={"truncate": False})
    sampler = make_sampler_or_skip(full_cfg, grid)
    full = sampler(batch, seed=seed, step=3)
    cut = MaskSampler(cfg.model_copy(update={"truncate": True}), grid)(batch, seed=seed, step=3)
    keep = min(full.ctx_lens)
    assert cut.ctx_lens == [keep] * batch
    fc, ft = unpack(full, cfg.num_targets)
    cc, ct = unpack(cut, cfg.num_targets)
    for b in range(batch):
        assert np.array_equal(cc[b], fc[b][:keep]), "truncation keeps the first (sorted) tokens"
        for j in range(cfg.num_targets):
            assert np.array_equal(ct[b][j], ft[b][j]), "equal-size target blocks are not cut"
    check_packed_layout(cut, batch, cfg.num_targets, *grid)


# ---------------------------------------------------------------------------------------------------
# the fixed official defects
# ---------------------------------------------------------------------------------------------------
def test_blocks_reach_last_row_and_column():
    """The official ``randint(0, H - h)`` never places a block on the last row/column; here some do."""
    h, w = 16, 16
    sampler = MaskSampler(OFFICIAL, (h, w))
    touch = {"tgt_last_row": False, "tgt_last_col": False, "tgt_first_row": False, "tgt_first_col": False,
             "ctx_last_row": False, "ctx_last_col": False}
    for step in range(40):
        contexts, targets = unpack(sampler(16, seed=1, step=step), 4)
        for b in range(16):
            for t in targets[b]:
                r, c = np.divmod(t, w)
                touch["tgt_last_row"] |= bool((r == h - 1).any())
                touch["tgt_last_col"] |= bool((c == w - 1).any())
                touch["tgt_first_row"] |= bool((r == 0).any())
                touch["tgt_first_col"] |= bool((c == 0).any())
            r, c = np.divmod(contexts[b], w)
            touch["ctx_last_row"] |= bool((r == h - 1).any())
            touch["ctx_last_col"] |= bool((c == w - 1).any())
    assert all(touch.values()), touch


@pytest.mark.parametrize("grid", [(16, 16), (5, 9), (7, 7)])
def test_full_scale_context_block_covers_grid(grid):
    """A context scale of 1.0 (aspect 1) gives an H x W block; the official clamp makes it (H-1)x(W-1)."""
    h, w = grid
    cfg = MaskConfig(num_targets=1, target_scale=(0.1, 0.1), context_scale=(1.0, 1.0), min_keep=1,
                     allow_overlap=True, context_aspect=(h / w, h / w))
    assert expected_block_size(0.5, (1.0, 1.0), (h / w, h / w), h, w) == (h, w)
    sampler = MaskSampler(cfg, grid)
    for step in range(5):
        pm = sampler(3, seed=0, step=step)
        assert pm.ctx_lens == [h * w] * 3
        contexts, _ = unpack(pm, 1)
        for ctx in contexts:
            assert np.array_equal(ctx, np.arange(h * w))
    if grid == (16, 16):
        assert official_block_size(0.5, (1.0, 1.0), (1.0, 1.0), 16, 16) == (15, 15)


def test_full_scale_context_minus_targets():
    """Scale 1.0 context without overlap = the whole grid minus the union of the target blocks."""
    cfg = MaskConfig(context_scale=(1.0, 1.0))
    sampler = MaskSampler(cfg, (16, 16))
    contexts, targets = unpack(sampler(6, seed=5), 4)
    for b in range(6):
        union = set()
        for t in targets[b]:
            union |= set(t.tolist())
        assert set(contexts[b].tolist()) == set(range(256)) - union


def test_block_size_formula_scripted_u():
    """Block sizes follow the official formula for the shared uniform draw, on 16x16 (ViT-H/14)."""
    sampler = MaskSampler(OFFICIAL, (16, 16))
    for u_t, u_c in [(0.0, 0.0), (1.0, 1.0), (0.5, 0.25), (0.999, 0.001), (0.3, 0.7)]:
        _, targets = sampler.sample(2, ScriptedRng([u_t, u_c], 0))
        exp = expected_block_size(u_t, OFFICIAL.target_scale, OFFICIAL.target_aspect, 16, 16)
        for ts in targets:
            for t in ts:
                assert as_rectangle(t, 16, 16)[2:] == exp
    # hand-computed anchors: u=0 -> scale .15, max_keep int(38.4)=38, ar .75 -> h round(5.34)=5, w round(7.12)=7
    assert expected_block_size(0.0, (0.15, 0.2), (0.75, 1.5), 16, 16) == (5, 7)
    # u=1 -> scale .2, max_keep int(51.2)=51, ar 1.5 -> h round(8.75)=9, w round(5.83)=6
    assert expected_block_size(1.0, (0.15, 0.2), (0.75, 1.5), 16, 16) == (9, 6)


# ---------------------------------------------------------------------------------------------------
# impossible settings
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg, grid",
    [
        (MaskConfig(min_keep=10), (3, 3)),  # min_keep > number of patches
        (MaskConfig.model_construct(min_keep=0), (16, 16)),  # the config rejects it; the sampler checks too
        (MaskConfig(), (7, 7)),  # default targets on 7x7 are 2x3 = 6 < min_keep 10
        (MaskConfig.model_construct(num_targets=0), (16, 16)),
        (MaskConfig(min_keep=60), (16, 16)),  # official target blocks hold at most ~54 tokens
    ],
)
def test_impossible_settings_raise_quickly(cfg, grid):
    start = time.perf_counter()
    with pytest.raises(ValueError):
        MaskSampler(cfg, grid)
    assert time.perf_counter() - start < 2.0


def test_default_on_7x7_is_really_impossible():
    """Independent confirmation of the 7x7 case: the smallest drawable target block (u=0: int(49 * .15) = 7
    tokens, ar .75 -> 2x3) is below min_keep."""
    areas = {np.prod(expected_block_size(u, (0.15, 0.2), (0.75, 1.5), 7, 7)) for u in np.linspace(0, 1, 1001)}
    assert min(areas) == 6 < 10
    assert expected_block_size(0.0, (0.15, 0.2), (0.75, 1.5), 7, 7) == (2, 3)


# ---------------------------------------------------------------------------------------------------
# a former defect: the up-front check sampled u on a 257-point grid only (now exact)
# ---------------------------------------------------------------------------------------------------
# 9x7 grid, context scale 0.23-0.5, aspect 1.1-2.5: at every one of the 257 grid points the context block
# holds >= 16 tokens, so MaskSampler accepts min_keep=16, but u in [0.2055, 0.2063] (and three other
# narrow intervals, ~0.4 % of draws together) gives int(63 * 0.2856) = 17 -> ar 1.388 -> 5x3 = 15 tokens.
# The context loop then never reaches min_keep and, with no exclusions left to drop, spins forever.
BAD_CTX = dict(num_targets=1, target_scale=(0.3, 0.3), target_aspect=(1.0, 1.0), context_scale=(0.23, 0.5),
               context_aspect=(1.1, 2.5), min_keep=16)


def test_bad_ctx_reference_numbers():
    """Independent check of the numbers in the comment above (the reference formula, not the sampler)."""
    assert expected_block_size(0.2059, (0.23, 0.5), (1.1, 2.5), 9, 7) == (5, 3)
    assert block_areas(np.linspace(0, 1, 257), (0.23, 0.5), (1.1, 2.5), 9, 7).min() >= 16
    assert expected_block_size(0.0, (0.3, 0.3), (1.0, 1.0), 9, 7) == (4, 4)


@pytest.mark.parametrize("allow_overlap", [True, False])
def test_accepted_config_never_draws_block_below_min_keep(allow_overlap):
    cfg = MaskConfig(**BAD_CTX, allow_overlap=allow_overlap)
    try:
        sampler = MaskSampler(cfg, (9, 7))
    except ValueError:
        return  # fixed by rejecting the config up front
    contexts, targets = sampler.sample(2, ScriptedRng([0.0, 0.2059], seed=0))
    assert all(len(c) >= cfg.min_keep for c in contexts)
