"""Where the training step's time goes: one ``Trainer.train_step`` under ``torch.profiler``, per category.

    python benchmarks/profile_step.py --config vith14 --device cuda --batch 128 --steps 5 --json profile.json
    python benchmarks/profile_step.py --config demo --device cpu --batch 32 --steps 3 --json profile.json

The step is the trainer's own (the config's masks: every context token kept unless ``mask.truncate=true``;
synthetic images, so no data set is needed). After ``--warmup`` steps (compiles, allocator warm-up),
``--steps`` steps are timed without the profiler, then ``--steps`` more under it. Output: a printed table
and a JSON file: ms per step and % of the profiled step per category, the analytic floor of each, the
top operations of each, the device, versions and shapes.

Categories. On a GPU every device kernel is timed; ``idle gaps`` is the profiled wall time minus the
union of the kernels' busy intervals (launch latency, host syncs, Python). On a CPU the ops' self times
are summed (no device stream: ``idle gaps`` is wall time minus that sum, the Python between ops). A
kernel or op goes to the first of:
  1. a phase it runs in: ``target loss`` (the trainer's ``jepa_target_loss`` call and the backward of
     its loss node), ``EMA`` (the ``ema_`` call), ``optimizer`` (torch's ``Optimizer.step`` /
     ``zero_grad`` scopes and the gradient norm);
  2. its own name (``KIND_RULES``): GEMM (mm/addmm/bmm/linear/convolution, cuBLAS/CUTLASS/xmma/gemm
     kernels), attention (SDPA, flash/cuDNN/efficient/FlexAttention kernels, the Triton varlen kernels),
     norm/pointwise/cast (LayerNorm, GELU, adds, multiplies, copies between dtypes, fills, reductions,
     elementwise kernels), gather/scatter (index_select/index_add/scatter/gather, the Triton gather
     kernels), copies (memcpy/memset between or within devices);
  3. the category of the op that encloses or launched it (views, ``t``, autograd wrappers);
  4. ``other``.
Phases are marked by wrapping the two fastjepa functions in ``torch.profiler.record_function`` wherever
a ``fastjepa`` module holds them (the trainer is unchanged).

Analytic floors (what the category would cost at the device's practical peak):
  - GEMM: ``fastjepa.flops.step_flops`` minus the attention FLOPs, over a measured square-GEMM rate
    (bf16 8192^3 on a GPU under bf16 autocast, the training dtype at 1024^3 otherwise);
  - attention: ``4 L D`` FLOPs per token per layer (QK^T and PV; x3 with the backward) from the real
    sequence lengths, over the same rate;
  - bytes over the measured device copy bandwidth (``harness.copy_gbps``) for the memory-bound ones,
    estimated from the shapes (activations ``a`` bytes: 2 under bf16 autocast, else 4; the residual
    stream and LayerNorm outputs ``s`` = 4; width ``W``, MLP width ``M``, per token and block):
      norm/pointwise/cast, forward: two LayerNorms (read + write ``W s``, plus a cast to ``a`` under
      autocast: ``W (s + a)``), two residual adds (read ``W (s + a)``, write ``W s``), GELU (read + write
      ``M a``); the backward counted as twice the forward; plus the autocast weight casts (read 4,
      write 2 bytes per weight per forward, and back for the gradients of the trained weights);
      gather/scatter: each picked row read and written once forward (context tokens at ``D``, predictor
      rows and its output rows at ``P``), and the backward's scatter-add reads the gradient rows and
      zero-fills and writes the destination;
      target loss: the picked target rows (``s``), the predictions and their gradient (``a``) forward,
      the gradient read and written again backward;
      optimizer: fused AdamW reads p, g, m, v and writes p, m, v (28 B per trained fp32 parameter) plus
      the gradient norm's read (4 B);
      EMA: 12 B per target parameter (fp32 target read + write, fp32 online weight read);
      copies: the batch's images and masks over the measured pageable host -> device bandwidth (0 on a
      CPU, where the batch is already in place);
  - idle gaps: 0; other: none.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
import types
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402  (sets TRITON_INTERPRET before any fastjepa_kernels import)

CATEGORIES = ("GEMM", "attention", "norm/pointwise/cast", "gather/scatter", "target loss", "optimizer", "EMA",
              "copies", "idle gaps", "other")
PHASE_SCOPES = {"fastjepa::target_loss": "target loss", "fastjepa::ema": "EMA"}
# the loss node's backward (reference: smooth-L1 / MSE and the fp32 cast of pred; Triton: the custom op)
LOSS_BACKWARD = re.compile(r"SmoothL1LossBackward|MseLossBackward|jepa_target_loss|target_loss", re.I)
OPTIMIZER = re.compile(r"^Optimizer\.|_fused_adamw|_foreach_norm|linalg_vector_norm|multi_tensor_apply.*(adam|norm)"
                       r"|fused_adam|get_total_norm|clip_grad", re.I)
KIND_RULES = (  # (category, pattern) in order; matched against op and kernel names
    ("copies", r"^Memcpy|^Memset|memcpy|memset"),
    ("attention", r"scaled_dot_product|flash|fmha|efficient_attention|cudnn.*(attn|attention|sdpa)|_attention_"
                  r"|attention_fwd|attention_bwd|flex_attention|varlen_attn|softmax"),
    ("GEMM", r"aten::(mm|addmm|bmm|baddbmm|addmv|matmul|linear|_convolution|convolution|mkldnn_convolution"
             r"|cudnn_convolution|convolution_backward|_slow_conv2d)|gemm|xmma|cutlass|cublas|sm\d\d_.*(gemm|conv)"
             r"|nvjet|implicit_convolve|conv2d|triton_tem|(Addmm|Mm|Bmm|Linear|Convolution)Backward"),
    ("gather/scatter", r"index_select|index_add|scatter|gather|aten::index\b|index_put|embedding|indexSelect"
                       r"|indexFunc|index_elementwise"),
    ("norm/pointwise/cast", r"layer_norm|layernorm|gelu|aten::(add|add_|mul|mul_|sub|rsub|div|copy_|to|_to_copy|fill_"
                            r"|zero_|zeros|where|sum|mean|isfinite|cat|stack|clone|neg|abs|clamp|lerp|_foreach_)"
                            r"|elementwise|vectorized|reduce_kernel|triton_(poi|per|red)|CatArrayBatched"
                            r"|AccumulateGrad"),
)
KIND_PATTERNS = [(c, re.compile(p, re.I)) for c, p in KIND_RULES]


def kind_of(name: str) -> str | None:
    for category, pattern in KIND_PATTERNS:
        if pattern.search(name):
            return category
    return None


def category_of(event, launcher=None) -> str:
    """Category of a profiler event (``launcher``: the CPU op that launched a device kernel)."""
    chain = []
    node = launcher if launcher is not None else event.cpu_parent
    while node is not None:
        chain.append(node.name)
        node = node.cpu_parent
    names = [event.name] + chain
    for name in names:  # 1. phases
        if name in PHASE_SCOPES:
            return PHASE_SCOPES[name]
        if name.startswith("autograd::engine::evaluate_function:") and LOSS_BACKWARD.search(name):
            return "target loss"
        if OPTIMIZER.search(name):
            return "optimizer"
    for name in names:  # 2. own name, 3. the enclosing op's
        found = kind_of(name)
        if found:
            return found
    return "other"


# ---- marking the phases ------------------------------------------------------------------------------
@contextmanager
def phase_scopes():
    """Wrap ``jepa_target_loss`` and ``ema_`` in record_function scopes in every fastjepa module that
    holds them (the trainer imports them by name), restored afterwards."""
    import fastjepa_kernels

    originals = {"jepa_target_loss": fastjepa_kernels.jepa_target_loss, "ema_": fastjepa_kernels.ema_}
    scopes = {"jepa_target_loss": "fastjepa::target_loss", "ema_": "fastjepa::ema"}

    def wrapped(name):
        fn, scope = originals[name], scopes[name]

        def call(*args, **kwargs):
            with torch.profiler.record_function(scope):
                return fn(*args, **kwargs)
        return call

    patched = []
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("fastjepa.") or module is None:
            continue
        for name, fn in originals.items():
            if getattr(module, name, None) is fn:
                setattr(module, name, wrapped(name))
                patched.append((module, name, fn))
    if not any(name == "jepa_target_loss" for _, name, _ in patched):
        raise RuntimeError("no fastjepa module calls fastjepa_kernels.jepa_target_loss by name: cannot mark the loss")
    try:
        yield
    finally:
        for module, name, fn in patched:
            setattr(module, name, fn)


# ---- the profile ------------------------------------------------------------------------------------
def union_length(intervals) -> float:
    """Total length covered by ``(start, end)`` intervals."""
    total, current_start, current_end = 0.0, None, None
    for start, end in sorted(intervals):
        if current_end is None or start > current_end:
            if current_end is not None:
                total += current_end - current_start
            current_start, current_end = start, end
        else:
            current_end = max(current_end, end)
    if current_end is not None:
        total += current_end - current_start
    return total


def classify(events, device_type: str):
    """``(us per category, busy us, {category: {name: us}})`` over all profiled steps."""
    from torch.autograd import DeviceType

    per, names = dict.fromkeys(CATEGORIES, 0.0), {c: {} for c in CATEGORIES}
    kernels = [e for e in events if e.device_type == DeviceType.CUDA] if device_type == "cuda" else []
    if kernels:
        # ops (not CUDA runtime calls, whose ids are another counter) by id: a kernel's linked id names
        # the op that launched it, as torch's own post-processing pairs them
        by_id = {e.id: e for e in events if e.device_type == DeviceType.CPU and e.linked_correlation_id == 0}
        intervals = []
        for k in kernels:
            start, end = k.time_range.start, k.time_range.end
            launcher = by_id.get(k.linked_correlation_id)
            category = category_of(k, launcher)
            per[category] += end - start
            names[category][k.name] = names[category].get(k.name, 0.0) + end - start
            intervals.append((start, end))
        busy = union_length(intervals)
    elif device_type == "cuda":  # no device events in this torch's list: the kernels its ops carry
        busy = 0.0
        for e in events:
            for k in getattr(e, "kernels", ()):
                category = category_of(types.SimpleNamespace(name=k.name, cpu_parent=None), e)
                per[category] += k.duration
                names[category][k.name] = names[category].get(k.name, 0.0) + k.duration
                busy += k.duration
    else:
        busy = 0.0
        for e in events:
            if e.device_type != DeviceType.CPU or e.is_async:
                continue
            category = category_of(e)
            per[category] += e.self_cpu_time_total
            names[category][e.name] = names[category].get(e.name, 0.0) + e.self_cpu_time_total
            busy += e.self_cpu_time_total
    return per, busy, names


# ---- analytic floors ---------------------------------------------------------------------------------
def attention_flops(model, masks, batch: int) -> float:
    """QK^T and PV FLOPs of the step: ``4 L^2 W`` per sequence per layer, x3 where there is a backward."""
    enc, pred = model.encoder, model.predictor
    d, p = enc.embed_dim, pred.predictor_embed.out_features
    target = len(enc.blocks) * batch * 4 * enc.num_patches**2 * d
    context = len(enc.blocks) * sum(4 * n * n * d for n in masks.ctx_lens)
    predictor = len(pred.blocks) * sum(4 * n * n * p for n in masks.pred_lens)
    return target + 3 * (context + predictor)


def floor_bytes(trainer, masks, batch: int, images: torch.Tensor) -> dict:
    """Estimated bytes per step of the memory-bound categories (module docstring)."""
    enc, pred = trainer.model.encoder, trainer.model.predictor
    autocast = trainer.cfg.train.precision == "bf16"
    a, s = (2 if autocast else 4), 4
    d, p = enc.embed_dim, pred.predictor_embed.out_features
    mlp_d, mlp_p = enc.blocks[0].mlp.fc1.out_features, pred.blocks[0].mlp.fc1.out_features if len(pred.blocks) else 0
    t_ctx, t_tgt, t_pred = sum(masks.ctx_lens), sum(masks.tgt_lens), sum(masks.pred_lens)
    n_all = batch * enc.num_patches

    def block_fwd(width, hidden):
        norm = 2 * width * s + (width * (s + a) if autocast else 0)
        residual = width * (s + a) + width * s
        return 2 * norm + 2 * residual + 2 * hidden * a

    trained = sum(q.numel() for q in trainer.model.parameters() if q.requires_grad)
    target_params = sum(q.numel() for q in trainer.target.parameters())
    weight_casts = 6 * (target_params + 2 * trained) if autocast else 0  # target: forward only
    pointwise = (len(enc.blocks) * block_fwd(d, mlp_d) * (n_all + 3 * t_ctx)
                 + len(pred.blocks) * block_fwd(p, mlp_p) * 3 * t_pred
                 + 2 * d * s * (n_all + 3 * t_ctx) + 2 * p * s * 3 * t_pred  # final LayerNorms
                 + weight_casts)
    gather_fwd = 2 * a * (t_ctx * d + t_pred * p + t_tgt * p)
    gather_bwd = a * (t_ctx * d + t_pred * p + t_tgt * p) + 2 * s * (n_all * d + (t_ctx + 1) * p + t_pred * p)
    return {
        "norm/pointwise/cast": pointwise,
        "gather/scatter": gather_fwd + gather_bwd,
        "target loss": t_tgt * d * (s + 2 * a) + 2 * t_tgt * d * a,
        "optimizer": 32 * trained,
        "EMA": 12 * target_params,
        "copies": images.numel() * images.element_size() + sum(
            t.numel() * t.element_size() for t in vars(masks).values() if isinstance(t, torch.Tensor)),
    }


# ---- driver -------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="vith14", help="a packaged preset (vith14, demo, ...) or a JSON file")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--batch", type=int, default=128, help="images per step")
    parser.add_argument("--steps", type=int, default=5, help="steps timed, then as many profiled")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles, allocator)")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: 1 on CPU runs)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. mask.truncate=true")
    return parser.parse_args(argv)


def run(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="profile_step_") as out_dir:  # the trainer's output folder
        return _run(args, out_dir)


def _run(args, out_dir: str) -> dict:
    device_type = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("profile_step: --device cuda but no CUDA device is visible")
    if device_type == "cpu":
        torch.set_num_threads(args.threads or 1)
    n_batches = args.warmup + 2 * args.steps
    overrides = [f"train.device={device_type}", f"train.batch_size={args.batch}", "data.dataset=synthetic",
                 f"data.synthetic_size={args.batch * n_batches}", *args.overrides]
    trainer = harness.build_trainer(args.config, out_dir, overrides)
    device = trainer.device
    batches = [trainer.batches[(0, i)] for i in range(n_batches)]  # decoded up front: the step alone runs

    def step(batch):
        trainer.train_step([batch])
        harness.synchronize(device)

    for batch in batches[: args.warmup]:
        step(batch)
    start = time.perf_counter()
    for batch in batches[args.warmup: args.warmup + args.steps]:
        step(batch)
    plain_s = (time.perf_counter() - start) / args.steps

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiled = batches[args.warmup + args.steps:]
    with phase_scopes(), torch.profiler.profile(activities=activities) as prof:
        wall = 0.0
        for batch in profiled:
            start = time.perf_counter()
            step(batch)
            wall += time.perf_counter() - start
    per_us, busy_us, names = classify(prof.events(), device.type)
    wall_us = wall * 1e6
    per_us["idle gaps"] = max(0.0, wall_us - busy_us)
    steps = len(profiled)

    # floors
    masks = profiled[0].masks
    from fastjepa.flops import step_flops

    flops = sum(step_flops(trainer.model, b.masks, args.batch) for b in profiled) / steps
    attn = sum(attention_flops(trainer.model, b.masks, args.batch) for b in profiled) / steps
    bf16 = trainer.cfg.train.precision == "bf16" and device.type == "cuda"
    gemm_dtype = torch.bfloat16 if trainer.cfg.train.precision == "bf16" else torch.float32
    gemm_tflops = harness.measured_gemm_tflops(device, gemm_dtype, n=8192 if bf16 else 1024)
    copy_gbps = harness.copy_gbps(device)
    h2d_gbps = harness.host_to_device_gbps(device)
    nbytes = floor_bytes(trainer, masks, args.batch, profiled[0].images)
    floors = {"GEMM": (flops - attn) / (gemm_tflops * 1e12), "attention": attn / (gemm_tflops * 1e12),
              "idle gaps": 0.0, "other": None}
    for category, value in nbytes.items():
        bandwidth = h2d_gbps if category == "copies" else copy_gbps
        floors[category] = 0.0 if bandwidth is None else value / (bandwidth * 1e9)

    step_ms = wall_us / steps / 1e3
    table = {}
    for category in CATEGORIES:
        ms = per_us[category] / steps / 1e3
        floor = floors[category]
        top = sorted(names[category].items(), key=lambda kv: -kv[1])[:5]
        table[category] = {
            "ms": ms, "pct": 100 * ms / step_ms if step_ms else 0.0,
            "floor_ms": None if floor is None else floor * 1e3,
            "floor_basis": ("flops" if category in ("GEMM", "attention") else
                            "bytes" if category in nbytes else None),
            "flops": (flops - attn) if category == "GEMM" else attn if category == "attention" else None,
            "bytes": nbytes.get(category),
            "top": [{"name": n, "ms": us / steps / 1e3} for n, us in top],
        }
    info = harness.describe(device)
    enc, pred = trainer.model.encoder, trainer.model.predictor
    return {
        **info, "config": args.config, "overrides": list(args.overrides), "batch_size": args.batch, "steps": steps,
        "precision": trainer.cfg.train.precision, "mask_truncate": trainer.cfg.mask.truncate,
        "model": {"embed_dim": enc.embed_dim, "depth": len(enc.blocks), "heads": enc.num_heads,
                  "patch_size": enc.patch_size, "num_patches": enc.num_patches,
                  "pred_dim": pred.predictor_embed.out_features, "pred_depth": len(pred.blocks)},
        "context_tokens_per_image": sum(sum(b.masks.ctx_lens) for b in profiled) / steps / args.batch,
        "target_tokens_per_image": sum(sum(b.masks.tgt_lens) for b in profiled) / steps / args.batch,
        "step_ms": step_ms, "step_ms_unprofiled": plain_s * 1e3, "images_per_s": args.batch / plain_s,
        "busy_ms": busy_us / steps / 1e3, "flops_per_step": flops, "tflops_achieved": flops / plain_s / 1e12,
        "gemm_tflops_measured": gemm_tflops, "gemm_dtype": str(gemm_dtype).replace("torch.", ""),
        "copy_gbps_measured": copy_gbps, "h2d_gbps_measured": h2d_gbps,
        "floor_ms": sum(v["floor_ms"] for v in table.values() if v["floor_ms"] is not None),
        "categories": table,
    }


def print_table(result: dict) -> None:
    print(f"{result['device']} | {result['config']} batch {result['batch_size']} {result['precision']} | "
          f"step {result['step_ms']:.2f} ms profiled, {result['step_ms_unprofiled']:.2f} ms plain "
          f"({result['images_per_s']:.1f} images/s)")
    print(f"{'category':22s} {'ms/step':>10s} {'% step':>8s} {'floor ms':>10s}  top op")
    for category, row in sorted(result["categories"].items(), key=lambda kv: -kv[1]["ms"]):
        floor = "-" if row["floor_ms"] is None else f"{row['floor_ms']:.3f}"
        top = row["top"][0]["name"][:60] if row["top"] else ""
        print(f"{category:22s} {row['ms']:10.3f} {row['pct']:7.1f}% {floor:>10s}  {top}")
    print(f"{'sum':22s} {sum(r['ms'] for r in result['categories'].values()):10.3f} "
          f"{sum(r['pct'] for r in result['categories'].values()):7.1f}% {result['floor_ms']:10.3f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.warmup < 0:
        raise SystemExit("profile_step: --steps and --batch must be >= 1, --warmup >= 0")
    result = run(args)
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
