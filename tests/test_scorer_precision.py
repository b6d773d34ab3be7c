"""SARScorer under autocast: both halves in the caller's precision, equal to a naive forward under the same autocast."""

from __future__ import annotations

import math
from contextlib import nullcontext

import pytest
import torch
from scorer_models import random_ids, tiny_model

from sarkern.scorer import SARScorer

PLACEHOLDER = [4, 40, 41, 5]


def naive_nll(model, prefix, completion, autocast_dtype=None, return_max_logit=False):
    """Mean NLL from one plain forward (``model(ids).logits``) under the given autocast, in float64 afterwards."""
    ids = torch.tensor([list(prefix) + list(completion)])
    autocast = torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with torch.no_grad(), autocast:
        logits = model(input_ids=ids).logits[0]
    logp = torch.log_softmax(logits.double(), -1)[len(prefix) - 1 : len(prefix) - 1 + len(completion)]
    nll = -logp.gather(1, torch.tensor(list(completion))[:, None]).mean().item()
    return (nll, logits.abs().max().item()) if return_max_logit else nll


@pytest.mark.parametrize("how", ["autocast_dtype", "forward_context"])
def test_scorer_follows_the_callers_autocast(how):
    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(0)
    prompts = [random_ids(g, 9), random_ids(g, 5)]
    completions = [random_ids(g, 12), random_ids(g, 7)]
    option = (
        {"autocast_dtype": torch.bfloat16}
        if how == "autocast_dtype"
        else {"forward_context": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}
    )
    scores = SARScorer(model, placeholder_ids=PLACEHOLDER, **option).score(prompts, completions)
    fp32 = SARScorer(model, placeholder_ids=PLACEHOLDER).score(prompts, completions)
    # The naive forward rounds each logit z to bf16 (relative error <= 2^-9), which moves a log-prob by at most
    # 2 * 2^-9 * max|z|; the scorer keeps its logits in fp32 from the same bf16 inputs. An fp32 forward differs more.
    for half, prefixes in (("ppl_cond", prompts), ("ppl_uncond", [PLACEHOLDER] * 2)):
        bf16_gaps, fp32_gaps = [], []
        for i, (prefix, completion) in enumerate(zip(prefixes, completions)):
            reference, max_logit = naive_nll(model, prefix, completion, torch.bfloat16, return_max_logit=True)
            bf16_gaps.append(abs(math.log(getattr(scores, half)[i].item()) - reference))
            assert bf16_gaps[-1] <= 2 * 2.0**-9 * max_logit, (half, i)
            fp32_gaps.append(abs(math.log(getattr(fp32, half)[i].item()) - reference))
            assert abs(math.log(getattr(fp32, half)[i].item()) - naive_nll(model, prefix, completion)) <= 1e-4
        assert max(bf16_gaps) < max(fp32_gaps), half  # the scorer really ran in bf16
    assert next(model.parameters()).dtype == torch.float32  # the model itself is left as it was


def test_precision_options_are_checked():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="autocast_dtype must be a floating-point torch.dtype"):
        SARScorer(model, placeholder_ids=PLACEHOLDER, autocast_dtype=torch.int8)
    with pytest.raises(TypeError, match="forward_context must be a callable"):
        SARScorer(model, placeholder_ids=PLACEHOLDER, forward_context=torch.bfloat16)
