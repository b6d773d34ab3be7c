"""The ops as `torch.library` custom ops: opcheck, and `torch.compile(fullgraph=True)` against eager."""

import pytest
import torch
from op_helpers import DEVICE

import sarkern


@pytest.fixture(autouse=True)
def torch_backend(monkeypatch):
    monkeypatch.setenv("SARKERN_BACKEND", "torch")


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, 7, 16, generator=g).to(DEVICE)
    weight = (torch.randn(45, 16, generator=g) / 4).to(DEVICE)
    bias = torch.randn(45, generator=g).to(DEVICE)
    targets = torch.randint(0, 45, (2, 7), generator=g).to(DEVICE)
    targets[0, 0] = -100
    segments = torch.tensor([[0] * 7, [1] * 4 + [-1] * 3], device=DEVICE)
    return hidden, weight, bias, targets, segments


def test_opcheck_custom_ops():
    hidden, weight, bias, targets, segments = _inputs()
    h2 = hidden.reshape(-1, 16).requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    b2 = bias.clone().requires_grad_(True)
    flat_t = targets.reshape(-1)
    seg_targets = torch.where(segments.reshape(-1) >= 0, flat_t.clamp(min=0), -100)
    # (softcap, check_inputs): none and checked; capped and unchecked (the sync-free launch).
    for softcap, check_inputs in ((0.0, True), (2.5, False)):
        options = (softcap, check_inputs)
        torch.library.opcheck(torch.ops.sarkern.token_logprobs, (h2 @ w2.T, flat_t, 1.0, -100, True, *options))
        torch.library.opcheck(
            torch.ops.sarkern.linear_token_logprobs, (h2, w2, b2, flat_t, 0.9, -100, True, *options)
        )
        torch.library.opcheck(
            torch.ops.sarkern.segment_logprob_sums,
            (h2, w2, None, seg_targets, segments.reshape(-1), 2, 1.0, *options),
        )


def _loss(hidden, weight, bias, targets, segments):
    logits = hidden @ weight.T + bias
    lp, ent = sarkern.token_logprobs(logits, targets, temperature=0.9, return_entropy=True)
    lin_lp, lin_ent = sarkern.linear_token_logprobs(
        hidden, weight, targets, bias=bias, return_entropy=True, softcap=3.0, check_inputs=False
    )
    ppl = sarkern.sequence_perplexity(hidden, weight, targets.clamp(min=0), segments, 2, bias=bias)
    return lp.sum() + 0.1 * ent.sum() + lin_lp.mean() - 0.2 * lin_ent.mean() + ppl.log().sum()


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    hidden, weight, bias, targets, segments = _inputs(1)
    leaves_eager = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    leaves_comp = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    eager = _loss(*leaves_eager, targets, segments)
    eager.backward()
    compiled_loss = torch.compile(_loss, fullgraph=True)
    out = compiled_loss(*leaves_comp, targets, segments)
    out.backward()
    # The compiled graph may form `hidden @ weight.T + bias` and the sums in another order than eager: a logit
    # of 16 products moves by at most 17 u sum|h w| + u |b| (about 3e-6 here, u = 2^-24), a log-prob by twice that,
    # and the loss sums 14 of them plus rounding of its own; 1e-5 relative covers that several times over (the
    # custom ops themselves run the same code in both).
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(leaves_comp, leaves_eager):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
