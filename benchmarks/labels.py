"""What each benchmark contender is, in words, and which contender each group's ratios are taken against.

The rendered tables (`run.py`) name contenders by these labels and describe each in one line, so a reader needs
no source to know what was measured.
"""

from __future__ import annotations

# contender key -> (label, what it computes)
CONTENDERS: dict[str, tuple[str, str]] = {
    "sarkern": (
        "sarkern",
        "sarkern's op or scorer (Triton kernels on CUDA, the chunked PyTorch path on CPU)",
    ),
    "naive": (
        "naive PyTorch",
        "full fp32 logits `[N, V]`, then `log_softmax` and `gather`: what most RL code does",
    ),
    "trl_chunked": (
        "TRL `ChunkedLogProbFunction`",
        "TRL's fused LM-head log-prob (behind `add_fused_lm_head`) at its default chunk size",
    ),
    "trl_selective": (
        "TRL `selective_log_softmax`",
        "TRL's log-prob of the chosen tokens from existing logits (logsumexp per row, then gather)",
    ),
    "torch_linear_ce": (
        "torch `linear_cross_entropy`",
        "`torch.nn.functional.linear_cross_entropy(reduction='none')`, torch's chunked fused LM head + loss",
    ),
    "liger": (
        "Liger-Kernel FLCE",
        "Liger-Kernel's fused linear cross entropy, `reduction='none'` (Triton, CUDA only)",
    ),
    "liger_scaled": (
        "Liger-Kernel fused scaled CE",
        "Liger-Kernel's fused scaled cross entropy, per-token NLL (its SM90 CuTe DSL kernel; Hopper only)",
    ),
    "cce": (
        "Cut Cross-Entropy",
        "Apple's Cut Cross-Entropy `linear_cross_entropy`, `reduction='none'` (Triton, CUDA only)",
    ),
    "paper": (
        "paper's way",
        "the official code's scoring: two padded forwards (prompt and placeholder) with full logits, then "
        "`log_softmax`",
    ),
    "sarkern-universal": (
        "sarkern, universal path",
        "`SARScorer(scoring_path='universal')`: right-padded, length-bucketed batches through the model's own "
        "forward (each prefix recomputed per completion), then the fused op on the hidden states",
    ),
    "sarkern-uncond": (
        "sarkern, conditioned half reused",
        "`SARScorer` given the trainer's conditioned log-probs: only the placeholder half runs",
    ),
    "sarkern-flex": (
        "sarkern, FlexAttention",
        "`SARScorer(attention_backend='flex')`: one compiled FlexAttention call per layer over the packed row's "
        "block mask",
    ),
    "sarkern-sdpa": (
        "sarkern, per-segment SDPA",
        "`SARScorer(attention_backend='sdpa')`: one SDPA call per segment and layer (the CPU path)",
    ),
    "sarkern-flash": (
        "sarkern, flash-attn varlen",
        "`SARScorer(attention_backend='flash')`: one flash-attn varlen call per layer, prefix keys gathered per "
        "completion",
    ),
    "grpo_without_sar": (
        "GRPO without SAR",
        "the same `SARGRPOTrainer` step with correctness as the only reward (no scoring pass)",
    ),
}

# Benchmark family -> the contender its ratios are taken against (DESIGN.md section 4's baselines).
BASELINES = {
    "linear": "naive",
    "logits": "naive",
    "sar-scoring": "paper",
    "grpo-step": "grpo_without_sar",
}


def label(contender: str) -> str:
    return CONTENDERS.get(contender, (contender, ""))[0]


def description(contender: str) -> str:
    return CONTENDERS.get(contender, ("", "(no description)"))[1]
