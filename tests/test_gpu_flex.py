"""The flex attention backend compiled for a real GPU (Triton, dynamic sequence length); skipped without CUDA.

On CPU, ``test_flex_attention.py`` covers the block mask, the unfused FlexAttention and Inductor's static C++ kernel;
here the CUDA kernel itself: exact against the float64 definition, and no recompilation across packed lengths.
"""

from __future__ import annotations

import copy

import pytest
import torch
from attention_reference import assert_attention_close
from scorer_models import naive_perplexity, tiny_model
from test_flex_attention import packed_layout
from test_scorer import PLACEHOLDER, assert_ppl_close, mixed_batch, tolerance

from sarkern import attention, flex
from sarkern.attention import shared_prefix_attention
from sarkern.scorer import SARScorer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def run_flex(layout, window, softcap=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = layout.total_len
    q, k = torch.randn(1, 4, t, 16, generator=g), torch.randn(1, 2, t, 16, generator=g)
    v = torch.randn(1, 2, t, 16, generator=g)
    out, _ = shared_prefix_attention(
        torch.nn.Module(),
        q.cuda(),
        k.cuda(),
        v.cuda(),
        None,
        scaling=0.25,
        sliding_window=window,
        softcap=softcap,
        sarkern_layout=layout,
    )
    assert_attention_close(out.cpu(), q, k, v, layout, 0.25, window, softcap=softcap)


def test_compiled_kernel_is_exact_and_serves_every_length():
    reason = flex.flex_unavailable_reason(torch.device("cuda"))
    assert reason is None, reason
    # Warm-up: two buckets (the first shape may be re-specialised once), with and without soft-capping.
    for softcap in (None, 1.5):
        run_flex(packed_layout(40, [60, 1, 70]), None, softcap)  # 171 rows: bucket 256
        run_flex(packed_layout(100, [150, 1, 49]), None, softcap)  # 300 rows: bucket 384
    with torch._dynamo.config.patch(error_on_recompile=True):
        run_flex(packed_layout(100, [90, 1, 20]), None)  # 211 rows: bucket 256 again
        run_flex(packed_layout(9, [500, 1, 3, 387]), 6)  # 900 rows: a new bucket, a window shorter than the prefix
        run_flex(packed_layout(256, [200, 100, 84]), 100, softcap=1.5)  # 640 rows


def test_scorer_on_cuda_uses_flex_without_flash_attn_and_matches_naive_forwards(monkeypatch):
    model = tiny_model("mistral", head_dim=16)  # Triton's dot products need 16 or more per head
    on_gpu = copy.deepcopy(model).cuda()
    calls = []
    real_forward = flex.flex_forward
    monkeypatch.setattr(flex, "flex_forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    prompts, completions = mixed_batch(seed=13)
    scores = SARScorer(on_gpu, placeholder_ids=PLACEHOLDER).score(prompts, completions)  # auto
    assert calls, "auto must pick flex on CUDA when flash-attn is absent"
    tol = tolerance(model, prompts, completions)
    assert_ppl_close(scores.ppl_cond.cpu(), [naive_perplexity(model, p, c) for p, c in zip(prompts, completions)], tol)
    assert_ppl_close(scores.ppl_uncond.cpu(), [naive_perplexity(model, PLACEHOLDER, c) for c in completions], tol)
