"""Compile the OECL loss kernels for a GPU target without that GPU.

``triton.compile`` with a ``GPUTarget`` runs the whole NVIDIA pipeline down to a cubin
(Triton's wheel ships ptxas), so the shared memory one block needs and the instructions the
products use can be read off for any compute capability on a machine with no GPU at all;
with ``--registers`` the wheel's ptxas also reports each kernel's registers per thread and
spill bytes (its ``-v`` log, the same run a launch makes). Each kernel is compiled with
exactly the launch configuration :func:`launch_config` picks for that target, so a
configuration that passes here is the one a real launch would use.

    python -m kernels.targets                 # table for sm_80, sm_86, sm_89, sm_90
    python -m kernels.targets --cc 89 --json  # machine-readable
    python -m kernels.targets --registers --precisions fp32-tf32 bf16 --d 128

Must run where triton is *not* in interpreter mode (TRITON_INTERPRET unset).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch

# Opt-in shared memory per block (cudaDevAttrMaxSharedMemoryPerBlockOptin) by compute
# capability, from NVIDIA's CUDA programming guide: A100 / Jetson Orin, RTX 30xx / A10,
# RTX 40xx / L4, H100 / H200.
SMEM_PER_BLOCK = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TARGETS = tuple(SMEM_PER_BLOCK)
FEATURE_DIMS = (64, 128, 256, 512)
# fp32 is compiled both ways it can run: exact products ("ieee", torch's default matmul
# precision) and TF32 (what an fp32 run on a GPU uses when TF32 is allowed).
PRECISIONS = ("fp32-ieee", "fp32-tf32", "bf16", "fp16")
_DTYPE = {"fp32-ieee": torch.float32, "fp32-tf32": torch.float32,
          "bf16": torch.bfloat16, "fp16": torch.float16}
_TRITON_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
KERNELS = ("row_norm", "fwd", "bwd", "oe_grad")


@dataclass(frozen=True)
class Job:
    kernel: str
    precision: str
    d: int
    cc: int
    block_m: int
    block_n: int
    warps: int
    stages: int


@dataclass
class Compiled:
    kernel: str
    precision: str
    d: int
    cc: int
    smem_limit: int
    shared: int
    estimate: int | None
    wgmma: bool
    mma_sync: bool
    config: dict
    compiled_for_cc: int
    # From ptxas -v (None unless registers were asked for): registers per thread, and the
    # bytes each thread stores to / loads from local memory because registers ran out.
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None


class Build(NamedTuple):
    shared: int
    wgmma: bool
    mma_sync: bool
    registers: int | None
    spill_stores: int | None
    spill_loads: int | None


def _family(cc: int) -> int:
    # sm_80, sm_86 and sm_89 share Triton's Ampere lowering (mma.sync, cp.async); sm_90 has
    # its own (wgmma, TMA). One compile per family and configuration stands for each member.
    return 90 if cc >= 90 else 80


def jobs_for(cc: int, precision: str, d: int) -> list[Job]:
    """The kernels a launch on target ``cc`` would compile for these inputs, with their
    configuration."""
    from . import ntxent_oe_triton as K
    from .tiles import launch_config

    dtype = _DTYPE[precision]
    d_pad = K._d_pad(d)
    cfg = launch_config(d_pad, dtype, capability=divmod(cc, 10),
                        smem_per_block=SMEM_PER_BLOCK[cc])
    return [
        Job("row_norm", precision, d, cc, cfg.bwd_m, 0, 4, 1),
        Job("fwd", precision, d, cc, cfg.fwd_m, cfg.fwd_n, cfg.warps_fwd, cfg.stages_fwd),
        Job("bwd", precision, d, cc, cfg.bwd_m, cfg.bwd_n, cfg.warps_bwd, cfg.stages_bwd),
        Job("oe_grad", precision, d, cc, 32, 0, 4, 1),
    ]


def _source(job: Job):
    from triton.compiler import ASTSource

    from . import ntxent_oe_triton as K

    dtype = _DTYPE[job.precision]
    t = _TRITON_TY[dtype]
    d_pad = K._d_pad(job.d)
    if job.kernel == "row_norm":
        sig = {"z_ptr": f"*{t}", "u_ptr": f"*{t}", "norm_ptr": "*fp32", "n_rows": "i32",
               "d": "i32", "eps": "fp32"}
        const = {"WRITE_U": True, "BLOCK_R": job.block_m, "D_PAD": d_pad}
        return ASTSource(K._row_norm_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const)
    if job.kernel == "oe_grad":
        sig = {"z_ptr": f"*{t}", "norm_ptr": "*fp32", "grad_ptr": "*fp32", "dz_ptr": f"*{t}",
               "m_rows": "i32", "d": "i32", "coef": "fp32"}
        const = {"BLOCK_R": job.block_m, "D_PAD": d_pad}
        return ASTSource(K._oe_grad_kernel, {**sig, **dict.fromkeys(const, "constexpr")}, const)
    precision = {"fp32-ieee": "ieee", "fp32-tf32": "tf32"}.get(job.precision)
    const = {"UPCAST": False, "PRECISION": precision, "BLOCK_M": job.block_m,
             "BLOCK_N": job.block_n, "D_PAD": d_pad}
    if job.kernel == "fwd":
        sig = {"u_ptr": f"*{t}", "lse_ptr": "*fp32", "row_loss_ptr": "*fp32", "n": "i32",
               "d": "i32", "inv_temp": "fp32"}
        fn = K._ntxent_fwd_kernel
    else:
        sig = {"u_ptr": f"*{t}", "norm_ptr": "*fp32", "lse_ptr": "*fp32", "grad_ptr": "*fp32",
               "dz_ptr": f"*{t}", "n": "i32", "d": "i32", "inv_temp": "fp32", "eps": "fp32"}
        fn = K._ntxent_bwd_kernel
    return ASTSource(fn, {**sig, **dict.fromkeys(const, "constexpr")}, const)


def _compile(job: Job, cubin: bool = False, registers: bool = False) -> Build:
    """One kernel compiled for ``job.cc``: shared bytes, tensor-core instructions, and with
    ``registers`` the ptxas -v figures.

    The shared memory is fixed when Triton allocates it while lowering to LLVM IR, and the
    tensor-core instructions are in the PTX, so by default the pipeline stops after PTX:
    ptxas (the cubin) is most of the time of a compile and changes neither.
    ``registers`` runs Triton's own cubin stage (its ptxas, its flags) and reads the log it
    prints when asked to; ``cubin=True`` runs the whole ``triton.compile``, ptxas included.
    """
    import triton
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", job.cc, 32)
    options = {"num_warps": job.warps, "num_stages": job.stages}
    ptx, log = None, None
    if not cubin:
        lowered = _lower(_source(job), target, options, "cubin" if registers else "ptx")
        if lowered is not None:
            shared, ptx, log = lowered
    if ptx is None:
        if registers:
            raise RuntimeError(f"triton {triton.__version__}: its compile stages differ from "
                               "the ones --registers drives; run without --registers")
        kernel = triton.compile(_source(job), target=target, options=options)
        shared, ptx = int(kernel.metadata.shared), kernel.asm["ptx"]
    regs = stores = loads = None
    if log is not None:
        regs, stores, loads = parse_ptxas_log(log)
    return Build(shared, bool(re.search(r"\bwgmma\.", ptx)),
                 bool(re.search(r"\bmma\.sync\.", ptx)), regs, stores, loads)


def parse_ptxas_log(log: str) -> tuple[int, int, int]:
    """(registers per thread, spill store bytes, spill load bytes) from a ``ptxas -v`` log of
    one kernel."""
    used = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if used is None or spill is None:
        raise RuntimeError(f"ptxas -v log without register or spill figures: {log[:300]!r}")
    return int(used.group(1)), int(spill.group(1)), int(spill.group(2))


@contextlib.contextmanager
def _ptxas_log_captured():
    """Triton prints ptxas's -v log (to stdout) when ``knobs.nvidia.dump_ptxas_log`` is set."""
    from triton import knobs

    before = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield buf
    finally:
        knobs.nvidia.dump_ptxas_log = before


def _lower(src, target, options: dict, last: str) -> tuple[int, str, str | None] | None:
    """Triton's compile pipeline up to stage ``last`` ("ptx" or "cubin"): (shared bytes, PTX,
    ptxas -v log when the cubin was built), or None where this Triton's internals differ
    from the layout relied on here (then the caller runs the whole triton.compile). Going
    through the stages directly also bypasses Triton's cache, so ptxas always runs."""
    try:
        from triton._C.libtriton import ir
        from triton.compiler.compiler import make_backend

        backend = make_backend(target)
        opts = backend.parse_options(dict(options, **src.parse_options()))
        stages: dict = {}
        backend.add_stages(stages, opts, src.language)
        context = ir.context()
        ir.load_dialects(context)
        backend.load_dialects(context)
        module = src.make_ir(target, opts, backend.get_codegen_implementation(opts),
                             backend.get_module_map(), context)
    except (ImportError, AttributeError, TypeError):
        return None
    if last not in stages or "ptx" not in stages:
        return None
    metadata: dict = {"target": target, **opts.__dict__}
    ptx = None
    for ext, stage in stages.items():
        if ext == "cubin":
            with _ptxas_log_captured() as buf:
                stage(module, metadata)
            return int(metadata["shared"]), ptx, buf.getvalue()
        module = stage(module, metadata)
        if ext == "ptx":
            ptx = module
            if last == "ptx":
                return int(metadata["shared"]), ptx, None
    return None


def _estimate(job: Job) -> int | None:
    from . import ntxent_oe_triton as K
    from .tiles import bwd_smem_bytes, fwd_smem_bytes

    elem = torch.finfo(_DTYPE[job.precision]).bits // 8
    d_pad = K._d_pad(job.d)
    if job.kernel == "fwd":
        return fwd_smem_bytes(job.block_m, job.block_n, d_pad, elem, job.stages)
    if job.kernel == "bwd":
        return bwd_smem_bytes(job.block_m, job.block_n, d_pad, elem, job.stages)
    return None


def compile_all(targets=TARGETS, precisions=PRECISIONS, dims=FEATURE_DIMS,
                workers: int | None = None, cubin: bool = False,
                registers: bool = False) -> list[Compiled]:
    """Compile every kernel for every (target, precision, d); identical jobs of one family
    are compiled once (with ``registers``, once per target: ptxas allocates registers for
    the exact SM). ``workers`` processes compile in parallel (default: one per core);
    ``cubin`` runs the whole triton.compile, ``registers`` ptxas -v (see :func:`_compile`)."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("offline compiles need TRITON_INTERPRET unset (the interpreter "
                           "replaces triton's compiler)")
    jobs = [j for cc in targets for p in precisions for d in dims for j in jobs_for(cc, p, d)]
    key = functools.partial(_key, per_target=registers)
    unique: dict[tuple, Job] = {}
    for j in jobs:
        unique.setdefault(key(j), j)
    workers = workers or os.cpu_count() or 1
    todo = list(unique.values())
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = pool.map(functools.partial(_compile, cubin=cubin, registers=registers),
                               todo)
            done = dict(zip([key(j) for j in todo], results, strict=True))
    else:
        done = {key(j): _compile(j, cubin, registers) for j in todo}
    out = []
    for j in jobs:
        b = done[key(j)]
        config = {"block_m": j.block_m, "block_n": j.block_n, "num_warps": j.warps,
                  "num_stages": j.stages}
        out.append(Compiled(j.kernel, j.precision, j.d, j.cc, SMEM_PER_BLOCK[j.cc], b.shared,
                            _estimate(j), b.wgmma, b.mma_sync, config, unique[key(j)].cc,
                            b.registers, b.spill_stores, b.spill_loads))
    return out


def _key(j: Job, per_target: bool = False) -> tuple:
    return (j.kernel, j.precision, j.d, j.cc if per_target else _family(j.cc), j.block_m,
            j.block_n, j.warps, j.stages)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cc", type=int, nargs="+", choices=TARGETS, default=list(TARGETS))
    p.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    p.add_argument("--d", type=int, nargs="+", default=list(FEATURE_DIMS))
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--cubin", action="store_true",
                   help="run ptxas as well (slower; same shared memory and PTX)")
    p.add_argument("--registers", action="store_true",
                   help="also report registers and spill bytes per kernel (ptxas -v; slower)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead")
    p.add_argument("--out", default=None,
                   help="also write the JSON list to this file (with the triton version)")
    args = p.parse_args(argv)
    rows = compile_all(args.cc, args.precisions, args.d, args.workers, args.cubin,
                       args.registers)
    if args.out:
        import triton

        from oecl_runtime.atomic import write_json

        write_json(args.out, {"triton": triton.__version__, "kernels": [asdict(r) for r in rows]})
    if args.json:
        print(json.dumps([asdict(r) for r in rows]))
        return 0
    regs_head = " registers | spill stores / loads B |" if args.registers else ""
    print("| sm | precision | d | kernel | tiles (m x n, warps, stages) | shared B | limit B "
          f"| tensor cores |{regs_head}\n|---|---|---|---|---|---|---|---|"
          + ("---|---|" if args.registers else ""))
    for r in rows:
        c = r.config
        tc = "wgmma" if r.wgmma else "mma.sync" if r.mma_sync else "-"
        regs = (f" {r.registers} | {r.spill_stores} / {r.spill_loads} |"
                if args.registers else "")
        print(f"| {r.cc} | {r.precision} | {r.d} | {r.kernel} | {c['block_m']} x "
              f"{c['block_n']}, {c['num_warps']}, {c['num_stages']} | {r.shared} | "
              f"{r.smem_limit} | {tc} |{regs}")
    over = [r for r in rows if r.shared > r.smem_limit]
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
