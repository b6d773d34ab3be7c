"""Per-token log-probs: sarkern against what users would pick instead, side by side at each shape.

Groups: `<family> <mode> <shape>`, family `linear` (from hidden states and the LM head) or `logits` (from existing
logits), mode `forward` (no grad) or `forward_backward`. Each result carries `peak_mib` (memory beyond the inputs)
in its extra info.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, DEVICE, LINEAR_SHAPES, LOGITS_SHAPES, shape_id
from contenders import FAMILIES, Unavailable, make_inputs
from memory import cpu_peak_bytes, cuda_peak_bytes

CASES = [
    pytest.param(family, name, shape, id=f"{family}-{name}-{shape_id(shape)}")
    for family, shapes in (("linear", LINEAR_SHAPES), ("logits", LOGITS_SHAPES))
    for shape in shapes
    for name in FAMILIES[family]
]


@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("family,contender,shape", CASES)
def test_logprobs(benchmark, record_memory, family, contender, shape, mode):
    n, d, v, dtype = shape
    benchmark.group = f"{family} {mode} {shape_id(shape)}"
    benchmark.extra_info.update(family=family, contender=contender, mode=mode, shape=shape_id(shape))
    backward = mode == "forward_backward"
    inputs = make_inputs(family, n, d, v, getattr(torch, dtype), DEVICE, backward)
    try:
        fn = FAMILIES[family][contender](inputs, backward)
    except Unavailable as why:
        pytest.skip(f"{contender}: {why}")
    if CUDA:
        record_memory(cuda_peak_bytes(fn))
        benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize()), rounds=10, warmup_rounds=2)
    else:
        record_memory(cpu_peak_bytes(family, contender, n, d, v, dtype, mode))
        benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
