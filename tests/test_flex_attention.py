"""The FlexAttention backend: its block mask against the layout's dense mask, its output against the float64
definition and the SDPA path, soft-capping, backend selection, and the scorer on it against naive forwards.

FlexAttention without ``torch.compile`` runs an unfused reference implementation (it materialises the scores, fine at
these sizes); most tests use it, so that they run in seconds. ``test_compiled_kernel_serves_every_length`` compiles
the real kernel once (CPU, C++ through Inductor) and checks that new lengths do not recompile it.
"""

from __future__ import annotations

import types

import pytest
import torch
from attention_reference import assert_attention_close, dense_layout_mask, dense_reference
from scorer_models import FAMILIES, naive_perplexity, tiny_family_model, tiny_model
from test_scorer import PLACEHOLDER, assert_ppl_close, mixed_batch, tolerance

from sarkern import attention, flex
from sarkern.attention import AttentionSegment, PackedLayout, shared_prefix_attention
from sarkern.scorer import SARScorer

# Two groups: prefix 5 with completions of 7, 0 and 3 rows; prefix 1 with one of 4 rows and a one-row completion.
MIXED = PackedLayout(
    (
        AttentionSegment(0, 5),
        AttentionSegment(5, 7, 0, 5),
        AttentionSegment(12, 0, 0, 5),
        AttentionSegment(12, 3, 0, 5),
        AttentionSegment(15, 1),
        AttentionSegment(16, 4, 15, 1),
        AttentionSegment(20, 1, 15, 1),
    ),
    total_len=21,
)


def long_prefix_layout() -> PackedLayout:
    """A 9-row prefix with completions of 6, 1 and 1 rows, then a 2-row prefix with one of 3 rows (windows shorter
    than the prefix cut into it)."""
    return PackedLayout(
        (
            AttentionSegment(0, 9),
            AttentionSegment(9, 6, 0, 9),
            AttentionSegment(15, 1, 0, 9),
            AttentionSegment(16, 1, 0, 9),
            AttentionSegment(17, 2),
            AttentionSegment(19, 3, 17, 2),
        ),
        total_len=22,
    )


@pytest.fixture
def eager_flex(monkeypatch):
    """Run FlexAttention uncompiled (its unfused reference implementation) for tiny shapes."""
    from torch.nn.attention import flex_attention as flex_module

    monkeypatch.setattr(flex_module, "_warn_once", lambda *a, **k: None)  # "unfused implementation": on purpose here
    monkeypatch.setattr(flex, "flex_kernel", lambda device: flex_module.flex_attention)
    monkeypatch.setattr(flex, "flex_unavailable_reason", lambda device: None)  # the CPU refusal is tested below
    calls = []
    real_forward = flex.flex_forward
    monkeypatch.setattr(flex, "flex_forward", lambda *a, **k: calls.append(1) or real_forward(*a, **k))
    return calls


def block_mask_as_dense(block_mask) -> torch.Tensor:
    """What FlexAttention computes from a block mask, densely: full blocks entirely, partial blocks through the
    mask_mod, nothing elsewhere."""
    length = block_mask.seq_lengths[0]
    block = block_mask.BLOCK_SIZE[0]
    blocks = length // block
    partial = torch.zeros(blocks, blocks, dtype=torch.bool)
    full = torch.zeros(blocks, blocks, dtype=torch.bool)
    for which, counts, indices in (
        (partial, block_mask.kv_num_blocks, block_mask.kv_indices),
        (full, block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
    ):
        for qb in range(blocks):
            which[qb, indices[0, 0, qb, : counts[0, 0, qb]].long()] = True
    assert not (partial & full).any()
    q = torch.arange(length).view(-1, 1)
    k = torch.arange(length).view(1, -1)
    by_mod = block_mask.mask_mod(0, 0, q, k)
    expand = lambda m: m.repeat_interleave(block, 0).repeat_interleave(block, 1)  # noqa: E731
    return expand(full) | (expand(partial) & by_mod), partial, full, by_mod


@pytest.mark.parametrize("block_size", [2, 4, 8, 128])
@pytest.mark.parametrize("window", [None, 1, 3, 7, 50])
@pytest.mark.parametrize("layout", [MIXED, long_prefix_layout()], ids=["mixed", "long-prefix"])
def test_block_mask_equals_the_layout_mask(layout, window, block_size):
    block_mask = flex.build_block_mask(layout.segments, layout.total_len, window, torch.device("cpu"), block_size)
    padded = flex.bucket_length(layout.total_len, block_size)
    assert block_mask.seq_lengths == (padded, padded) and padded % block_size == 0
    dense, partial, full, by_mod = block_mask_as_dense(block_mask)
    t = layout.total_len
    torch.testing.assert_close(dense[:t, :t], dense_layout_mask(layout, window), rtol=0, atol=0)
    # Padding: real rows never see padding keys; padding rows see nothing (their output is discarded).
    assert not dense[:t, t:].any() and not dense[t:].any()
    # Tight: a full block is entirely visible, a partial one partly, any other block not at all.
    visible = dense.view(padded // block_size, block_size, padded // block_size, block_size)
    assert torch.equal(visible.all(3).all(1), full)
    assert torch.equal(visible.any(3).any(1) & ~full, partial)


def test_block_mask_is_built_once_per_layout_and_window():
    layout = long_prefix_layout()
    cpu = torch.device("cpu")
    assert flex.layout_block_mask(layout, cpu, 3) is flex.layout_block_mask(layout, cpu, 3)
    assert flex.layout_block_mask(layout, cpu, None) is not flex.layout_block_mask(layout, cpu, 3)


def random_qkv(layout: PackedLayout, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    t = layout.total_len
    q = torch.randn(1, 4, t, 8, generator=g) * scale
    return q, torch.randn(1, 2, t, 8, generator=g) * scale, torch.randn(1, 2, t, 8, generator=g)


def run_attention(layout: PackedLayout, backend: str, q, k, v, window, **kwargs):
    layout = PackedLayout(layout.segments, layout.total_len, backend=backend)
    out, weights = shared_prefix_attention(
        torch.nn.Module(), q, k, v, None, scaling=0.4, sliding_window=window, sarkern_layout=layout, **kwargs
    )
    assert weights is None
    return out


@pytest.mark.parametrize("window", [None, 1, 3, 50])
@pytest.mark.parametrize("layout", [MIXED, long_prefix_layout()], ids=["mixed", "long-prefix"])
def test_flex_attention_against_the_definition_and_sdpa(layout, window, eager_flex):
    q, k, v = random_qkv(layout, seed=0)
    out = run_attention(layout, "flex", q, k, v, window)
    assert eager_flex, "the flex backend must have run"
    assert out.shape == (1, layout.total_len, 4, 8)
    tol = assert_attention_close(out, q, k, v, layout, 0.4, window)
    sdpa = run_attention(layout, "sdpa", q, k, v, window)
    torch.testing.assert_close(out, sdpa, rtol=0, atol=2 * tol)


@pytest.mark.parametrize("window", [None, 3])
def test_soft_capped_scores(window, eager_flex):
    layout = long_prefix_layout()
    q, k, v = random_qkv(layout, seed=1, scale=2.0)  # scores of several units: a cap of 1.5 changes them a lot
    out = run_attention(layout, "flex", q, k, v, window, softcap=1.5)
    tol = assert_attention_close(out, q, k, v, layout, 0.4, window, softcap=1.5)
    uncapped = dense_reference(q, k, v, layout, 0.4, window)
    assert (out.double() - uncapped).abs().max() > 100 * tol
    sdpa = run_attention(layout, "sdpa", q, k, v, window, softcap=1.5)  # the explicit soft-capped path
    assert_attention_close(sdpa, q, k, v, layout, 0.4, window, softcap=1.5)
    torch.testing.assert_close(out, sdpa, rtol=0, atol=2 * tol)
    with pytest.raises(ValueError, match="softcap must be positive"):
        run_attention(layout, "flex", q, k, v, window, softcap=0.0)


def test_auto_picks_flex_on_cuda_without_flash_attn(monkeypatch):
    layout = PackedLayout((AttentionSegment(0, 3),), total_len=3)
    cuda_bf16 = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda"))
    cuda_fp32 = types.SimpleNamespace(is_cuda=True, dtype=torch.float32, device=torch.device("cuda"))
    cpu = torch.zeros(1)
    monkeypatch.setattr(flex, "flex_unavailable_reason", lambda device: None)
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    assert attention._choose_backend(layout, cuda_bf16) == "flex"
    assert attention._choose_backend(layout, cpu) == "sdpa"  # CPU's default stays the per-segment path
    monkeypatch.setattr(attention, "flash_attn_available", lambda: True)
    assert attention._choose_backend(layout, cuda_bf16) == "flash"  # kept when installed
    assert attention._choose_backend(layout, cuda_fp32) == "flex"  # flash-attn has no fp32 kernels
    monkeypatch.setattr(flex, "flex_unavailable_reason", lambda device: "Triton is not installed")
    monkeypatch.setattr(attention, "flash_attn_available", lambda: False)
    assert attention._choose_backend(layout, cuda_bf16) == "sdpa"
    flex_layout = PackedLayout(layout.segments, 3, backend="flex")
    with pytest.raises(RuntimeError, match="'flex' cannot run: Triton is not installed"):
        attention._choose_backend(flex_layout, cuda_bf16)


def test_compilation_failure_is_reported_by_name(monkeypatch):
    def failing_kernel(device):
        def kernel(*args, **kwargs):
            raise torch._dynamo.exc.TorchDynamoException("no working compiler")

        return kernel

    monkeypatch.setattr(flex, "flex_kernel", failing_kernel)
    monkeypatch.setattr(flex, "flex_unavailable_reason", lambda device: None)  # as on a device flex supports
    q, k, v = random_qkv(MIXED, seed=2)
    with pytest.raises(RuntimeError, match="compiling FlexAttention .* failed on cpu .*attention_backend='sdpa'"):
        run_attention(MIXED, "flex", q, k, v, None)


@pytest.mark.parametrize("arch", ["qwen3", "mistral", "qwen2-sliding", "qwen3-sliding", "gemma3", "gemma2"])
def test_scorer_on_flex_matches_naive_forwards_and_sdpa(arch, eager_flex):
    """Scorer level, on the flex backend (run eagerly, test-only, at tiny shapes): Gemma3's sliding and global layers
    with two RoPE bases, Gemma2's soft-capped attention scores (FlexAttention's score_mod)."""
    assert arch in FAMILIES
    model = tiny_family_model(arch)
    prompts, completions = mixed_batch(seed=11)
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER, attention_backend="flex")
    scorer.verify(rows=256)  # the first-use probe runs on flex too (CPU flex builds dense scores: short rows)
    eager_flex.clear()
    scores = scorer.score(prompts, completions)
    assert len(eager_flex) == model.config.num_hidden_layers  # both halves in one pass: one call per layer
    tol = tolerance(model, prompts, completions)
    assert_ppl_close(scores.ppl_cond, [naive_perplexity(model, p, c) for p, c in zip(prompts, completions)], tol)
    assert_ppl_close(scores.ppl_uncond, [naive_perplexity(model, PLACEHOLDER, c) for c in completions], tol)
    sdpa = SARScorer(model, placeholder_ids=PLACEHOLDER, attention_backend="sdpa").score(prompts, completions)
    assert_ppl_close(scores.ppl_cond, sdpa.ppl_cond, 2 * tol)
    assert_ppl_close(scores.ppl_uncond, sdpa.ppl_uncond, 2 * tol)


def packed_layout(prefix: int, completions: list[int]) -> PackedLayout:
    segments, row = [AttentionSegment(0, prefix)], prefix
    for n in completions:
        segments.append(AttentionSegment(row, n, 0, prefix))
        row += n
    return PackedLayout(tuple(segments), total_len=row, backend="flex")


def test_compiled_flex_is_refused_on_cpu_by_name():
    """Inductor's compiled CPU FlexAttention computed wrong outputs with AVX2 code generation (torch 2.13): the flex
    backend refuses CPU tensors with the reason instead of scoring with it (the compiled kernel is tested on CUDA in
    tests/test_gpu_flex.py)."""
    assert "CUDA only" in flex.flex_unavailable_reason(torch.device("cpu"))
    model = tiny_model("mistral")
    prompts, completions = mixed_batch(seed=12)
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER, attention_backend="flex")
    with pytest.raises(RuntimeError, match="attention backend 'flex' cannot run: compiled FlexAttention on CPU"):
        scorer.score(prompts, completions)
