"""Triton kernels behind sarkern's ops, installed as `sarkern.kernels`.

One kernel family and its launcher per file:
- `token_logprobs`: log-probs (and entropy) from existing logits, forward and backward.
- `linear_logprobs`: log-probs from hidden states and the LM-head weight without materialising the logits: the
  forward (with the optional per-segment reduction), its launch plan, and the logit tile it shares with the backward;
  `linear_logprobs_tiles` holds its tile table and the candidates `make gpu-check` times.
- `linear_logprobs_grad`: the tile of logit gradients and the backward built on it.
- `compile_report`: every configuration above compiled ahead of time for sm_90a and sm_80, without a GPU.
- `_common`: what the launchers share (tiles, occupancy, TMA operands, the device guard, the compile-check spec).

Importing this package needs Triton. On CPU tensors the kernels run only under `TRITON_INTERPRET=1`,
which must be set before this package is first imported.
"""

from .linear_logprobs import linear_logprobs_forward
from .linear_logprobs_grad import linear_logprobs_backward, linear_logprobs_grad_logits
from .token_logprobs import token_logprobs_backward, token_logprobs_forward

__all__ = [
    "linear_logprobs_backward",
    "linear_logprobs_forward",
    "linear_logprobs_grad_logits",
    "token_logprobs_backward",
    "token_logprobs_forward",
]
