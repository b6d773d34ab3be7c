"""sarkern: the Self-Aligned Reward (SAR, arXiv 2509.05489) made nearly free.

- fused log-prob ops (Triton kernels with a chunked PyTorch fallback): `token_logprobs`, `linear_token_logprobs`,
  `sequence_perplexity`;
- the SAR reward (`sar_reward`) and a shared-prefix scorer for Hugging Face causal LMs (`SARScorer`,
  `SelfAlignedReward`);
- a TRL GRPO trainer with SAR (`sarkern.trainer.SARGRPOTrainer`, imported on demand: it needs TRL) and the
  `sarkern train` command.
"""

from .ops import linear_token_logprobs, sequence_perplexity, token_logprobs
from .placeholder import build_placeholder_ids
from .sar import sar_reward, sar_reward_from_nll
from .scorer import SARScorer, SARScores, SelfAlignedReward, UnsupportedModelError

__version__ = "0.1.0"

__all__ = [
    "SARScorer",
    "SARScores",
    "SelfAlignedReward",
    "UnsupportedModelError",
    "build_placeholder_ids",
    "linear_token_logprobs",
    "sar_reward",
    "sar_reward_from_nll",
    "sequence_perplexity",
    "token_logprobs",
]


def __getattr__(name: str):
    # The trainer pulls in TRL; import it only when asked for.
    if name in ("SARGRPOConfig", "SARGRPOTrainer"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'sarkern' has no attribute {name!r}")
