"""What a run measures and how long it may take: the full GPU shapes (bf16, N = 16384 tokens, D = 4096,
V = 151936), or tiny CPU ones."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MiB = 2**20


@dataclass(frozen=True)
class Settings:
    name: str
    device: str
    dtype: str
    linear: tuple[int, int, int]  # N tokens, D hidden, V vocabulary (section 4)
    logits: tuple[int, int]  # N tokens, V vocabulary
    segments: int  # sequence_perplexity: N tokens split into this many segments
    copy_bytes: int  # HBM ceiling: bytes of the copied tensor
    rep_ms: float  # do_bench's time budget per contender (CUDA); CPU: at least 3 rounds within it
    scorer_reps: int  # timed scorer calls per contender (at most; fewer when the budget is short)
    paper_micro_batch: int  # the paper's way scores this many completions per padded forward
    budgets: dict[str, float]  # seconds per section, inside its process
    startup_s: float  # allowed per section process for its start-up (imports, CUDA context), outside its budget
    total_s: float  # the whole run: the budgets and every section process's start-up fit in it
    backends: tuple[str, ...]  # SARKERN_BACKEND values the sarkern contenders run under


FULL = Settings(
    name="full",
    device="cuda",
    dtype="bfloat16",
    linear=(16384, 4096, 151936),
    logits=(16384, 151936),
    segments=8,
    copy_bytes=2 * 2**30,
    rep_ms=600.0,
    scorer_reps=3,
    # The whole batch at once would need 96 x 2304 x 151936 bf16 logits (67 GB) and their fp32 log-softmax.
    paper_micro_batch=8,
    # 400 s in all, and 6 section processes' start-up: 430 s of the 440. The tests: the Triton kernel tests first
    # (up to gpu_tests.KERNEL_TESTS_SHARE of it), then the FlexAttention ones with their cold compiles.
    budgets={
        "environment": 15,
        "tests": 105,
        "ceilings": 20,
        "linear": 95,
        "logits": 30,
        "sequence_perplexity": 15,
        "scorer": 120,
    },
    startup_s=5,
    # 8 minutes less the wheels' and sarkern's install, the first imports and the report.
    total_s=440,
    backends=("auto",),
)
TINY = Settings(
    name="tiny",
    device="cpu",
    dtype="float32",
    linear=(32, 16, 300),  # V not a multiple of the kernels' vocabulary block: the masked tail runs
    logits=(16, 300),
    segments=4,
    copy_bytes=8 * MiB,
    rep_ms=20.0,
    scorer_reps=2,
    paper_micro_batch=2,
    budgets={
        "environment": 15,
        "tests": 50,
        "ceilings": 10,
        "linear": 55,
        "logits": 35,
        "sequence_perplexity": 15,
        "scorer": 35,
    },
    startup_s=4,
    total_s=240,
    backends=("triton", "torch"),
)


def scorer_shape(settings: Settings):
    from bench_scorer import CUDA_SHAPE, ScorerShape

    if settings.name == "full":
        return CUDA_SHAPE  # Qwen3-1.7B-shaped, 16 prompts x 6 completions, prompt 256, completions 2048
    return ScorerShape("tiny", 2, 64, 4, 2, 16, 128, 1000, 2, 2, 8, 8, 16, "float32")


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """The accuracy bounds against float64: per-token log-probs (absolute), per-sequence perplexity (relative).

    Gradients: relative Frobenius error. fp32 keeps 1e-5; bf16 takes the 2e-2 that tests/test_gpu_kernels.py
    allows bf16 gradients (relative to their scale). Rounding alone costs about 2^-9 per rounding of the logit
    gradients and of the outputs, so a bf16 weight gradient accumulated in bf16 over many token chunks shows here
    as an error several times 2^-9: the number is reported, not only the verdict. The scorer compares two results
    of the same dtype, each within the per-token bound of float64, so twice that bound on mean NLLs.
    """
    if dtype == torch.float32:
        return {"logprob_abs": 1e-5, "ppl_rel": 1e-5, "grad_rel": 1e-5, "scorer_nll": 2e-5}
    return {"logprob_abs": 2e-2, "ppl_rel": 1e-3, "grad_rel": 2e-2, "scorer_nll": 4e-2}
