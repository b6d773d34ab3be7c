"""The forward's tile table (`_partial_kernel` in `linear_logprobs.py`): per architecture family and operand width,
the variants that need their own tiles, the candidates `make gpu-check` times, and the environment overrides that
select a candidate. Plain Python: what the launcher, the compile check and the GPU check share."""

from __future__ import annotations

import os

import torch

from ._common import TMA_VARIABLE, Blocks

# Forward tiles per architecture family and operand width, chosen from the ahead-of-time compile report
# (benchmarks/results/kernels-static.md): the largest tiles that compile without register spills.
# 16-bit: a [128, 128] fp32 accumulator over two warpgroups (wgmma m64n128k16 on sm_90; mma.sync on sm_80), 160-250
# registers x 256 threads depending on the variant, TMA or pointer loads and the Triton version (the launcher counts
# programs per SM from the compiled kernel). fp32 operands take IEEE FMA (no tensor cores; tf32 would break
# DESIGN.md's 1e-5), in smaller tiles; sm_80's FMA layout needs 16-wide K steps to stay within 255 registers.
FORWARD_BLOCKS = {
    (90, 16): Blocks(128, 128, 64, num_warps=8, num_stages=3),
    (80, 16): Blocks(128, 128, 32, num_warps=8, num_stages=4),
    (90, 32): Blocks(64, 64, 32, num_warps=4, num_stages=3, ctas_per_sm=2),
    (80, 32): Blocks(64, 64, 16, num_warps=4, num_stages=3, ctas_per_sm=2),
}
# Soft-capping adds a tanh (exp, divide) per logit to the epilogue: with 16-bit operands and pointer loads the
# [128, 128] tile then spills (2 instructions on sm_90a), so capped logits take half as many rows per tile; with TMA
# loads (sm_90) the default tile fits (203 registers).
SOFTCAP_BLOCKS_16 = Blocks(64, 128, 64, num_warps=8, num_stages=3)
# Candidates a GPU run times against the default on sm_90, with TMA loads (compiled and reported too;
# `gpu_candidates`): a 64-wide vocabulary tile with one warpgroup, so that two programs share an SM and one's softmax
# epilogue overlaps the other's loads; and the default tile with a fourth pipeline stage, which fits without spills
# since TMA loads freed ~60 registers (with pointer loads it spills).
# Larger tiles spill even with TMA: [128, 256] (the shape of cuBLAS's tiles) by ~240 instructions, [256, 128] by 2.
FORWARD_CANDIDATES_16 = (
    Blocks(128, 64, 64, num_warps=4, num_stages=4, ctas_per_sm=2),
    Blocks(128, 128, 64, num_warps=8, num_stages=4),
)
# `SARKERN_FORWARD_FLATTEN=1` (a candidate on sm_90, timed by `make gpu-check`): the forward's loops over vocabulary
# tiles and K steps become one software-pipelined loop (`tl.range(flatten=True)`), so the next tile's first loads
# are issued before this tile's softmax epilogue instead of after it.
FLATTEN_VARIABLE = "SARKERN_FORWARD_FLATTEN"
INTERPRETER_BLOCKS = Blocks(16, 32, 16, num_warps=1, num_stages=1)


def forward_blocks(dtype: torch.dtype, arch: int, softcap: bool = False, tma: bool = False) -> Blocks:
    """The forward's tiles for operands of `dtype` on compute capability `arch` (90 for sm_90, 0 interpreted), read
    through TMA descriptors or not. `SARKERN_FORWARD_BLOCKS=N,V,D,warps,stages` overrides them on a GPU, to time a
    candidate (`make gpu-check`)."""
    if arch == 0:
        return INTERPRETER_BLOCKS
    override = _blocks_override()
    if override is not None:
        return override
    width = 32 if dtype == torch.float32 else 16
    if softcap and width == 16 and not tma:
        return SOFTCAP_BLOCKS_16
    return FORWARD_BLOCKS[(90 if arch >= 90 else 80, width)]


def gpu_candidates() -> dict[str, dict[str, str]]:
    """What `make gpu-check` times beside the default on a GPU, as label -> environment to set: each candidate tile,
    and pointer loads in place of TMA descriptors (for the backward's gradient tile too)."""
    out = {
        f"tile {b.block_n}x{b.block_v}x{b.block_d} w{b.num_warps} s{b.num_stages}": {
            "SARKERN_FORWARD_BLOCKS": f"{b.block_n},{b.block_v},{b.block_d},{b.num_warps},{b.num_stages}"
        }
        for b in FORWARD_CANDIDATES_16
    }
    out["flattened tile loop"] = {FLATTEN_VARIABLE: "1"}
    out["pointer loads, no TMA"] = {TMA_VARIABLE: "0"}
    return out


def _blocks_override() -> Blocks | None:
    text = os.environ.get("SARKERN_FORWARD_BLOCKS", "").strip()
    if not text:
        return None
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 5 or any(v <= 0 for v in values) or any(v & (v - 1) for v in values[:4]):
        raise ValueError(
            f"SARKERN_FORWARD_BLOCKS={text!r}: expected BLOCK_N,BLOCK_V,BLOCK_D,num_warps,num_stages, the first four "
            "powers of two and all positive (e.g. 128,64,64,4,4)"
        )
    return Blocks(*values)
