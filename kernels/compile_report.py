"""Every kernel configuration the launchers can choose, compiled ahead of time for GPUs this machine need not have.

    python -m sarkern.kernels.compile_report [--check] [--out FILE.md] [--jobs N]

Each `KernelSpec` of the kernel files (`compile_specs(arch)`) is compiled for sm_90a (H100/H200) and sm_80 (A100)
by Triton's own compiler (ptxas, cuobjdump and nvdisasm ship with Triton; no GPU or driver is needed). From the cubin
it reads registers per thread, stack, shared memory and the SASS, and derives CTAs per SM and the matrix
instructions of the GEMM loop. `--check` exits with status 1 when a configuration spills registers to local memory,
needs more shared memory than the SM has, runs a 16-bit GEMM loop without tensor-core MMA (wgmma, `HGMMA` in
SASS, on sm_90a; `HMMA` on sm_80), reads TMA descriptors without TMA copies (`UTMALDG`), or fits fewer programs per
SM than its tile was chosen for (the launchers size their grids from the compiled kernel itself, at run time).
Triton's interpreter must be off (`TRITON_INTERPRET` unset): it replaces the kernels by Python functions that cannot
be compiled.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Target:
    name: str
    capability: int
    smem_per_sm: int  # bytes usable by CTAs
    smem_per_cta: int  # the largest opt-in per CTA
    mma: str  # the SASS mnemonic of the tensor-core instruction 16-bit GEMM loops must use
    regs_per_sm: int = 65536
    max_threads_per_sm: int = 2048
    max_ctas_per_sm: int = 32
    reserved_smem_per_cta: int = 1024  # the driver keeps 1 KiB per CTA on sm_80 and later


TARGETS = (
    Target("sm_90a", 90, smem_per_sm=228 * 1024, smem_per_cta=227 * 1024, mma="HGMMA"),
    Target("sm_80", 80, smem_per_sm=164 * 1024, smem_per_cta=163 * 1024, mma="HMMA"),
)
MODULES = ("linear_logprobs", "linear_logprobs_grad", "token_logprobs")


@dataclass
class Row:
    target: str
    kernel: str
    warps: int
    stages: int
    registers: int
    stack_bytes: int
    spill_instructions: int
    shared_bytes: int
    ctas_per_sm: int
    limited_by: str
    mma_instructions: int
    tma_loads: int
    exp2_instructions: int
    gemm_dtype: str | None
    problems: list


def _specs(module: str, capability: int):
    import importlib

    return importlib.import_module(f"sarkern.kernels.{module}").compile_specs(capability)


def _tool(name: str) -> str:
    import triton

    try:
        return getattr(triton.knobs.nvidia, name).path
    except AttributeError:  # Triton before knobs: the tools sit beside the backend
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def _signature(spec) -> tuple[dict, dict]:
    """Triton types of the kernel's arguments, and 16-byte divisibility for pointers, strides and the hidden size,
    as Triton specializes them at launch for real shapes."""
    signature, attrs = {}, {}
    unaligned = {p.name for p in spec.kernel.params if p.do_not_specialize_on_alignment}  # as the launch sees them
    for index, arg in enumerate(spec.kernel.arg_names):
        if arg in spec.constexprs:
            signature[arg] = "constexpr"
        elif arg in spec.descriptors:
            element, block = spec.descriptors[arg]
            signature[arg] = f"tensordesc<{element}[{', '.join(map(str, block))}]>"
        elif arg.endswith("_ptr") or arg in spec.pointers:
            signature[arg] = "*" + spec.pointers.get(arg, "fp32")
            if arg not in unaligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif arg in spec.floats:
            signature[arg] = "fp32"
        else:
            signature[arg] = "i32"
            if arg.startswith("stride") or arg == "dim":
                attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


def _occupancy(target: Target, registers: int, shared: int, warps: int) -> tuple[int, str]:
    """CTAs per SM and what limits them, by the launchers' own rule (`_common.occupancy`)."""
    from sarkern.kernels._common import occupancy

    return occupancy(
        registers,
        shared,
        warps,
        regs_per_sm=target.regs_per_sm,
        smem_per_sm=target.smem_per_sm,
        threads_per_sm=target.max_threads_per_sm,
        ctas_per_sm=target.max_ctas_per_sm,
        reserved_smem_per_cta=target.reserved_smem_per_cta,
    )


def compile_one(job: tuple[str, int, int]) -> Row:
    """Compile spec `index` of `module` for the target at `target_index` and read its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, index, target_index = job
    target = TARGETS[target_index]
    spec = _specs(module, target.capability)[index]
    signature, attrs = _signature(spec)
    compiled = triton.compile(
        ASTSource(spec.kernel, signature, spec.constexprs, attrs),
        target=GPUTarget("cuda", target.capability, 32),
        options=dict(num_warps=spec.num_warps, num_stages=spec.num_stages),
    )
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([_tool("cuobjdump"), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([_tool("nvdisasm"), str(cubin)], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+)", usage)
    if match is None:
        raise RuntimeError(f"cuobjdump gave no resource usage for {spec.name}:\n{usage}")
    registers, stack, static_shared = map(int, match.groups())
    shared = static_shared + compiled.metadata.shared
    spills = len(re.findall(r"\b(?:STL|LDL)\b", sass))
    mma = len(re.findall(rf"\b{target.mma}\b", sass))
    ctas, limited_by = _occupancy(target, registers, shared, spec.num_warps)
    problems = []
    if spills:
        problems.append(f"{spills} spill instructions (stack {stack} B)")
    if shared > target.smem_per_cta:
        problems.append(f"shared memory {shared} B > {target.smem_per_cta} B per CTA")
    if spec.gemm_dtype in ("bf16", "fp16") and mma == 0:
        problems.append(f"16-bit GEMM loop without {target.mma}")
    tma = len(re.findall(r"\bUTMALDG\b", sass))
    if spec.descriptors and tma == 0:
        problems.append("descriptor loads compiled without TMA copies (UTMALDG)")
    if spec.ctas_per_sm is not None and ctas < spec.ctas_per_sm:
        problems.append(f"{ctas} CTAs per SM, but the tile is meant to fit {spec.ctas_per_sm}")
    return Row(
        target=target.name,
        kernel=spec.name,
        warps=spec.num_warps,
        stages=spec.num_stages,
        registers=registers,
        stack_bytes=stack,
        spill_instructions=spills,
        shared_bytes=shared,
        ctas_per_sm=ctas,
        limited_by=limited_by,
        mma_instructions=mma,
        tma_loads=tma,
        exp2_instructions=len(re.findall(r"MUFU\.EX2", sass)),
        gemm_dtype=spec.gemm_dtype,
        problems=problems,
    )


def all_jobs() -> list[tuple[str, int, int]]:
    return [
        (module, index, target_index)
        for target_index, target in enumerate(TARGETS)
        for module in MODULES
        for index in range(len(_specs(module, target.capability)))
    ]


def _ptxas_version(capability: int) -> str:
    """The version of the ptxas Triton uses for `capability` (Triton 3.9 uses a newer one from sm_90 on)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(capability).path
    except (ImportError, AttributeError):
        path = _tool("ptxas")
    out = subprocess.run([path, "--version"], capture_output=True, text=True).stdout.strip()
    return out.splitlines()[-1].removeprefix("Build ") if out else "?"


def render(rows: list[Row]) -> str:
    import torch
    import triton

    lines = [
        "# Triton kernels compiled ahead of time (static report)",
        "",
        f"Regenerate with `make static-report` (`python -m sarkern.kernels.compile_report --out {DEFAULT_OUT}`).",
        f"Triton {triton.__version__}, torch {torch.__version__}; "
        + "; ".join(f"{t.name}: ptxas {_ptxas_version(t.capability)}" for t in TARGETS)
        + ".",
        "Every configuration the launchers can choose, in its heaviest and lightest variant; CTAs per SM follow from",
        "registers (allocated per warp in units of 256), shared memory (+1 KiB reserved per CTA) and threads.",
        "`MMA` counts tensor-core instructions in the SASS (HGMMA = wgmma on sm_90a, HMMA on sm_80); `TMA` counts",
        "TMA tile copies (UTMALDG) of the kernels that read their GEMM operands through tensor descriptors; `EX2`",
        "counts MUFU.EX2. A problem is a spill, shared memory over the SM's limit, a 16-bit GEMM without MMA, a",
        "descriptor kernel without TMA copies, or fewer programs per SM than the tile was chosen to fit.",
        "",
    ]
    for target in TARGETS:
        lines += [
            f"## {target.name}",
            "",
            "| kernel | warps | stages | registers | spills | shared KiB | CTAs/SM (limit) | MMA | TMA | EX2 "
            "| problems |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r.target == target.name):
            lines.append(
                f"| `{r.kernel}` | {r.warps} | {r.stages} | {r.registers} | {r.spill_instructions} | "
                f"{r.shared_bytes / 1024:.1f} | {r.ctas_per_sm} ({r.limited_by}) | {r.mma_instructions} | "
                f"{r.tma_loads} | {r.exp2_instructions} | {'; '.join(r.problems) or 'none'} |"
            )
        lines.append("")
    return "\n".join(lines)


DEFAULT_OUT = "benchmarks/results/kernels-static.md"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on spills, shared memory overflow, no MMA")
    parser.add_argument("--out", help="write the markdown report (and a .json beside it) here")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("TRITON_INTERPRET=1 is set: the interpreter's kernels cannot be compiled; unset it")
    jobs = all_jobs()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = list(pool.map(compile_one, jobs))
    report = render(rows)
    if args.out:
        import json

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)
        out.with_suffix(".json").write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    print(report)
    bad = [f"{r.target} {r.kernel}: {'; '.join(r.problems)}" for r in rows if r.problems]
    if bad:
        print("\nproblems:\n" + "\n".join(bad), file=sys.stderr)
    return 1 if args.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
