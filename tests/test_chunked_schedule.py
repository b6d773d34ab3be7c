"""The chunked path's schedule (`chunked._run_tiles`): tiles shared out among threads give the single-thread numbers,
leave the caller's thread count as it was, follow the caller's autograd mode, and report a worker's error."""

from __future__ import annotations

import pytest
import torch

import sarkern
from sarkern import chunked


@pytest.fixture
def many_tiles(monkeypatch):
    monkeypatch.setenv("SARKERN_BACKEND", "torch")
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 16 * 32)
    monkeypatch.setattr(chunked, "MAX_VOCAB_CHUNK", 32)


def _inputs(seed=0, n=96, d=16, v=200):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(v, d, generator=g) * 0.5, torch.randint(0, v, (n,), generator=g)


def _with_threads(n, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def test_shared_tiles_give_the_single_thread_numbers(many_tiles):
    hidden, weight, targets = _inputs()
    logits = hidden @ weight.T

    def run():
        h, w, z = (t.clone().requires_grad_(True) for t in (hidden, weight, logits))
        lp, ent = sarkern.linear_token_logprobs(h, w, targets, return_entropy=True)
        (lp.sum() + ent.sum()).backward()
        zl, ze = sarkern.token_logprobs(z, targets, return_entropy=True)
        (zl.sum() + ze.sum()).backward()
        return lp, ent, zl, ze, h.grad, w.grad, z.grad

    one, four = _with_threads(1, run), _with_threads(4, run)
    # Every tile runs single-threaded either way: forward values and per-tile gradients are bitwise the same; the
    # hidden gradient adds the threads' fp32 partial sums in another order.
    for name, a, b in zip(("logprobs", "entropy", "logits lp", "logits entropy"), one[:4], four[:4]):
        assert torch.equal(a, b), name
    torch.testing.assert_close(four[4], one[4], rtol=1e-5, atol=1e-6)
    assert torch.equal(four[5], one[5]) and torch.equal(four[6], one[6])


def test_caller_thread_count_and_inference_mode_are_kept(many_tiles):
    hidden, weight, targets = _inputs(1)

    def run():
        with torch.inference_mode():
            out = sarkern.linear_token_logprobs(hidden, weight, targets)
            grad = sarkern.token_logprobs(hidden @ weight.T, targets)
        return out, grad, torch.get_num_threads()

    out, from_logits, threads_after = _with_threads(3, run)
    assert threads_after == 3
    ref = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, targets[:, None]).squeeze(1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_logits.double(), ref, atol=1e-5, rtol=0)


def test_a_worker_error_reaches_the_caller():
    def make_worker():
        def work(tile):
            if tile == 5:
                raise ValueError("tile 5")

        return work

    with pytest.raises(ValueError, match="tile 5"):
        _with_threads(2, lambda: chunked._run_tiles(40, make_worker))
    assert _with_threads(2, torch.get_num_threads) == 2


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


def test_sums_across_tiles_run_in_order_on_the_caller_under_deterministic_algorithms(many_tiles, deterministic):
    """Per-thread partial sums (the hidden gradient) depend on which thread took which tile: with deterministic
    algorithms asked for, such a call runs every tile on the caller's thread, in order, and repeats bit for bit."""
    import threading

    seen = []

    def make_worker():
        return lambda tile: seen.append((threading.get_ident(), tile))

    _with_threads(4, lambda: chunked._run_tiles(8, make_worker, sums_per_thread=True))
    assert seen == [(threading.get_ident(), tile) for tile in range(8)]
    hidden, weight, targets = _inputs(2)

    def hidden_grad():
        h = hidden.clone().requires_grad_(True)
        sarkern.linear_token_logprobs(h, weight, targets).sum().backward()
        return h.grad

    first, again = _with_threads(4, hidden_grad), _with_threads(4, hidden_grad)
    assert torch.equal(first, again)
