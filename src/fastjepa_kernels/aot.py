"""Ahead-of-time compilation of every kernel configuration, for a GPU this machine need not have.

``python -m fastjepa_kernels.aot [--arch 80 90] [--json]`` compiles, for each target architecture,
every (kernel, configuration, dtype, head dim) the launchers can pick (and every attention
configuration the benchmarks A/B), and reports the shared memory each uses and whether the code uses
Hopper's ``wgmma`` instructions. It needs no GPU (``triton.compile`` with a ``GPUTarget``), so CI
proves on a CPU machine that the kernels compile for Ampere and Hopper and fit the chip.

Each kernel module lists its variants in ``aot_specs() -> list[AotSpec]``. Run this without
``TRITON_INTERPRET`` (the interpreter replaces ``@triton.jit`` functions with Python ones).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys

from ._backend import interpreting

# shared memory per block, bytes (CUDA programming guide, "Technical Specifications per Compute Capability")
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
KERNEL_MODULES = ("attention", "gather", "target_loss", "ema", "layer_norm", "bias_gelu")


@dataclasses.dataclass(frozen=True)
class AotSpec:
    """One compilable variant: ``signature`` maps every argument to a Triton type (``*bf16``, ``i32``,
    ``fp32``, ``constexpr``); ``constexprs`` gives the constexpr values."""

    name: str
    fn: object  # a triton JITFunction
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 3
    wants_wgmma: bool = False  # a tensor-core kernel that should use wgmma on sm_90


@dataclasses.dataclass
class AotResult:
    name: str
    arch: int
    shared_bytes: int
    shared_limit: int
    uses_wgmma: bool
    wants_wgmma: bool
    num_warps: int
    num_stages: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return (self.error is None and self.shared_bytes <= self.shared_limit
                and (self.uses_wgmma or not (self.wants_wgmma and self.arch >= 90)))


def collect_specs(modules=KERNEL_MODULES) -> list[AotSpec]:
    specs = []
    for name in modules:
        module = importlib.import_module(f"{__package__}.{name}")
        if hasattr(module, "aot_specs"):
            specs.extend(module.aot_specs())
    return specs


def compile_spec(spec: AotSpec, arch: int) -> AotResult:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    result = AotResult(spec.name, arch, 0, SHARED_MEMORY_LIMIT.get(arch, 99 * 1024), False,
                       spec.wants_wgmma, spec.num_warps, spec.num_stages)
    try:
        # At run time the JIT marks every pointer argument that is 16-byte aligned (any fresh torch
        # tensor) with tt.divisibility=16, which enables cp.async pipelining and vector loads; compile
        # the same way, or shared memory is under-reported (d=80 forward: 18 KB instead of ~70 KB).
        # Parameters marked do_not_specialize get no such attribute at run time either.
        params = {p.name: p for p in spec.fn.params}
        attrs = {(i,): [["tt.divisibility", 16]] for i, (name, ty) in enumerate(spec.signature.items())
                 if str(ty).startswith("*") and not (name in params and params[name].do_not_specialize)}
        source = ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs, attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as err:  # report every failing variant, not just the first
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"
        return result
    result.shared_bytes = int(compiled.metadata.shared)
    result.uses_wgmma = "wgmma" in compiled.asm.get("ptx", "")
    return result


_SPECS_CACHE: list[AotSpec] | None = None


def _compile_indexed(job) -> AotResult:
    """Process-pool worker: specs are rebuilt per process (JIT functions do not pickle)."""
    global _SPECS_CACHE
    if _SPECS_CACHE is None:
        _SPECS_CACHE = collect_specs()
    index, arch = job
    return compile_spec(_SPECS_CACHE[index], arch)


def compile_all(archs=(80, 90), only: str | None = None, jobs: int = 1) -> list[AotResult]:
    """Compile every collected variant (name containing ``only``) for every arch, ``jobs`` processes."""
    if interpreting():
        raise RuntimeError("fastjepa_kernels.aot: unset TRITON_INTERPRET (the interpreter cannot compile kernels)")
    specs = collect_specs()
    work = [(i, arch) for arch in archs for i, s in enumerate(specs) if only is None or only in s.name]
    if jobs <= 1:
        return [compile_spec(specs[i], arch) for i, arch in work]
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_indexed, work))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (80, 90)")
    parser.add_argument("--only", default=None, help="compile only variants whose name contains this")
    parser.add_argument("--json", action="store_true", help="print one JSON object per variant")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    args = parser.parse_args(argv)
    results = compile_all(args.arch, args.only, args.jobs)
    for r in results:
        if args.json:
            print(json.dumps({**dataclasses.asdict(r), "ok": r.ok}))
        else:
            status = "ok" if r.ok else "FAIL"
            print(f"{status:4} sm_{r.arch} {r.name:60} shared {r.shared_bytes / 1024:6.1f}/{r.shared_limit // 1024} KB "
                  f"wgmma={'yes' if r.uses_wgmma else 'no'}{'  ' + r.error if r.error else ''}")
    failed = [r for r in results if not r.ok]
    print(f"{len(results) - len(failed)}/{len(results)} variants compiled within limits", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
