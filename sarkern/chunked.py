"""The chunked PyTorch path: the ops' numbers without Triton, in bounded memory.

Logits exist only one tile of `[tokens, vocab]` at a time (one per thread), and the vocabulary blocks' partial log-
sum-exps are merged afterwards, as the Triton kernels merge their splits. Everything is computed in fp32 whatever
the input dtype.

Schedule (`_run_tiles`): the tiles of a call are shared out among the torch threads, each thread taking the next
tile when it finishes one and running it single-threaded (GEMM and passes), into its own tile buffer. Splitting
every op of every tile across the threads instead (torch's default) makes hundreds to thousands of OpenMP regions
per call, each ending in a barrier: a thread that another process preempts stalls every region, and the waiting
threads spin, taking the CPU away from it (issue 23: 0.8x-6.3x naive time from run to run on a shared 2-core
machine; see kernels/PERFORMANCE.md, CPU path). One region per call with tiles handed out as threads free up has no
barrier but the last tile.

Tile shapes come from how the GEMM and the passes over a tile use the cache (`tile_shape`): each GEMM call reads a
block of hidden rows and a block of the LM head; its output tile should stay in the core's L2 cache for the passes
that follow (max, exp, sum), and both blocks should be large enough that the BLAS library's packing of each operand
is reused many times. A tile of a few hundred tokens by about a thousand vocabulary rows does both; a skinny tile of
a hundred tokens by the whole vocabulary (what a fixed element budget gives) streams the whole LM head from memory
for every token chunk and runs 1.3x slower than one full GEMM plus `log_softmax`.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

# Override of the tile budget (fp32 values per `[tokens, vocab]` tile); None = sized from the L2 cache. Tests set
# small values to force many tiles.
TILE_ELEMENTS: int | None = None
# Widest vocabulary block of a tile.
MAX_VOCAB_CHUNK = 32768
# Each GEMM operand block should feed at least this many rows of the other (BLAS packing amortised).
MIN_GEMM_ROWS = 256
# L2 size assumed where the OS does not report one (per core; x86 server cores have 0.5-2 MiB).
_DEFAULT_L2_BYTES = 1 << 20


@functools.cache
def _l2_cache_bytes() -> int:
    """Per-core L2 size from sysfs (Linux), else a typical server core's."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() != "2":
                continue
            size = (index / "size").read_text().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
            return int(size.rstrip("KM")) * scale
        except (OSError, ValueError):
            break
    return _DEFAULT_L2_BYTES


def tile_budget() -> int:
    """fp32 values per tile: a tile is one thread's at a time (`_run_tiles`), so its own core's L2 cache holds it,
    within [256 Ki, 1 Mi]."""
    if TILE_ELEMENTS is not None:
        return max(1, TILE_ELEMENTS)
    return min(1 << 20, max(1 << 18, _l2_cache_bytes() // 4))


def tile_shape(n_tokens: int, vocab: int, tile_elements: int | None = None) -> tuple[int, int]:
    """(token chunk, vocabulary chunk) of a `[tokens, vocab]` tile of at most `tile_elements` values.

    Tokens are the power of two nearest below sqrt(budget / 2), so that a tile is about twice as wide as it is tall
    (both GEMM operands reused: a few hundred rows each at the default budget), fewer when there are fewer tokens, in
    which case the vocabulary block widens to keep the tile at its budget.
    """
    budget = tile_budget() if tile_elements is None else max(1, tile_elements)
    rows = 1 << max(0, int(math.log2(max(1.0, math.sqrt(budget / 2)))))
    token_chunk = max(1, min(n_tokens, rows))
    vocab_chunk = max(1, min(vocab, MAX_VOCAB_CHUNK, budget // token_chunk))
    return token_chunk, vocab_chunk


# --------------------------------------------------------------------------------------------------- schedule


@functools.cache
def _per_thread_thread_counts() -> bool:
    """Whether torch's intra-op thread count is per calling thread (OpenMP: `torch.set_num_threads` sets the calling
    thread's count), so that the workers of `_run_tiles` can run single-threaded without changing anyone else's.
    torch's native thread pool has one count per process, fixed once parallel work has started."""
    return "parallel backend: OpenMP" in torch.__config__.parallel_info()


_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    # A forked child has the pool object but none of its threads.
    global _pool, _pool_size
    _pool, _pool_size = None, 0


os.register_at_fork(after_in_child=_forget_pool)


def _worker_pool(size: int) -> ThreadPoolExecutor:
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < size:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool, _pool_size = ThreadPoolExecutor(size, thread_name_prefix="sarkern-chunked"), size
        return _pool


def _run_tiles(
    n_tiles: int, make_worker: Callable[[], Callable[[int], None]], *, sums_per_thread: bool = False
) -> None:
    """Run tiles 0 .. n_tiles - 1, shared out among `torch.get_num_threads()` threads (the caller's included).

    Each thread builds its own `work = make_worker()` (its tile buffers and accumulators), then takes the next tile
    whenever it finishes one, and runs it with one intra-op thread: one parallel region per call, balanced however
    the OS shares the cores out, instead of one per op of each tile (see the module's docstring). Tiles write
    disjoint parts of the results, or (`sums_per_thread`) add into per-thread accumulators, whose last bits then
    depend on which thread took which tile: under `torch.use_deterministic_algorithms(True)` such a call runs its
    tiles in order on the caller's thread, with torch's own threading in each op, bitwise reproducible.
    """
    threads = torch.get_num_threads()
    reproducible = sums_per_thread and torch.are_deterministic_algorithms_enabled()
    workers = min(threads, n_tiles) if _per_thread_thread_counts() and not reproducible else 1
    if workers <= 1:
        work = make_worker()
        for tile in range(n_tiles):
            work(tile)
        return
    next_tile = itertools.count()
    lock = threading.Lock()
    failed = threading.Event()

    def take() -> int:
        with lock:
            return next(next_tile)

    # Autograd's modes are per thread: the workers compute under the caller's inference mode, never recording
    # autograd (the ops' own autograd formulas are the backward).
    inference = torch.is_inference_mode_enabled()

    def loop() -> None:
        torch.set_num_threads(1)
        try:
            with torch.inference_mode() if inference else torch.no_grad():
                work = None
                while (tile := take()) < n_tiles and not failed.is_set():
                    work = work or make_worker()
                    work(tile)
        except BaseException:
            failed.set()
            raise

    futures = [_worker_pool(workers - 1).submit(loop) for _ in range(workers - 1)]
    try:
        loop()
    finally:
        torch.set_num_threads(threads)  # the caller's count (and torch's process-wide default) as it was
        errors = [f.exception() for f in futures]
    for error in errors:
        if error is not None:
            raise error


def _row_blocks(tensor: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, 2-D view) blocks covering `tensor [..., V]` row by row, without copying strided inputs such as
    `logits[:, :-1]` (which `reshape` would copy whole)."""
    if tensor.dim() < 2:
        yield 0, tensor.view(1, -1)
        return
    try:
        yield 0, tensor.view(-1, tensor.shape[-1])
        return
    except RuntimeError:
        pass
    rows_per_item = math.prod(tensor.shape[1:-1])
    for i in range(tensor.shape[0]):
        for start, block in _row_blocks(tensor[i]):
            yield i * rows_per_item + start, block


def _grad_logits(
    x: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    targets: torch.Tensor,
    valid: torch.Tensor,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    col_offset: int = 0,
    slope: torch.Tensor | None = None,
) -> torch.Tensor:
    """d loss / d logits for the scaled logits `x = logits / T` of columns [col_offset, col_offset + x.shape[1]).

    Overwrites `x` (it becomes the result), so a tile costs no extra memory; 1/T is folded into the per-token
    gradients rather than applied to the tile. With soft-capping, `x = cap tanh(logits / cap) / T`, and the result
    is multiplied by `slope`, the cap's slope tile (`_softcap_slope`).
    """
    g = (torch.where(valid, grad_logprobs, 0.0) / temperature).unsqueeze(-1)
    log_p = x.sub_(lse.unsqueeze(-1))
    if grad_entropy is None:
        grad = log_p.exp_().mul_(-g)
    else:
        p = log_p.exp()
        ge = (torch.where(valid, grad_entropy, 0.0) / temperature).unsqueeze(-1)
        # d entropy / dx = -p (log p + H); 0 * -inf counts as 0 where p vanishes.
        grad = torch.where(p > 0, p * (log_p + entropy.unsqueeze(-1)), 0.0).mul_(-ge)
        grad -= g * p
    cols = targets - col_offset
    rows = (valid & (cols >= 0) & (cols < x.shape[-1])).nonzero().squeeze(-1)
    grad[rows, cols[rows]] += g[rows, 0]
    # Ignored rows contribute nothing, also when all their logits are -inf (lse = -inf makes p NaN there).
    ignored = (~valid).nonzero().squeeze(-1)
    if ignored.numel():
        grad.index_fill_(0, ignored, 0.0)
    return grad.mul_(slope) if slope is not None else grad


def _softcap_slope(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """d (cap tanh(logits / cap)) / d logits = sech^2(logits / cap), from the logits before capping: 1 - tanh^2 of
    the capped fp32 value keeps no correct digit where tanh rounds to +-1 (0 from |logit| = 9 cap on)."""
    return (logits / softcap).cosh_().reciprocal_().square_()  # cosh overflows to inf only where sech^2 underflows


def _cap_and_scale_(x: torch.Tensor, softcap: float, temperature: float) -> torch.Tensor:
    """In place: `x = softcap * tanh(x / softcap) / T` (`softcap` 0: no capping), as the reference applies it."""
    if softcap:
        x.div_(softcap).tanh_().mul_(softcap)
    return x.div_(temperature) if temperature != 1.0 else x


# ----------------------------------------------------------------------------------------------- from logits


def _row_chunks(logits: torch.Tensor, step: int) -> list[tuple[slice, torch.Tensor]]:
    """(rows of the flattened logits, 2-D view) of at most `step` rows each, covering `logits [..., V]`."""
    return [
        (slice(first + start, first + start + block[start : start + step].shape[0]), block[start : start + step])
        for first, block in _row_blocks(logits)
        for start in range(0, block.shape[0], step)
    ]


def token_logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One read of the logits, in row chunks that stay in the cache: a max pass (which also finds where the max
    is), then `log_softmax` into a thread's reused buffer, from which the target's log-prob, log s = -log p(argmax),
    and the entropy are read. No exponential is computed twice and nothing tile-sized is allocated per chunk."""
    vocab = logits.shape[-1]
    targets = targets.reshape(-1)
    n_rows = targets.shape[0]
    f32 = dict(dtype=torch.float32, device=logits.device)
    logprobs = torch.empty(n_rows, **f32)
    lse = torch.empty(n_rows, **f32)
    entropy = torch.empty(n_rows, **f32) if return_entropy else logprobs.new_empty(0)
    valid = targets != ignore_index
    outside = valid & ((targets < 0) | (targets >= vocab))  # only when the caller skipped the id check
    safe_targets = targets.masked_fill(~valid | outside, 0).long().unsqueeze(1)
    step = max(1, min(n_rows, tile_budget() // vocab))
    transformed = logits.dtype != torch.float32 or temperature != 1.0 or softcap
    chunks = _row_chunks(logits, step)

    def make_worker():
        scaled = torch.empty((step, vocab), **f32) if transformed else None
        log_p = torch.empty((step, vocab), **f32)

        def work(chunk: int) -> None:
            rows, x = chunks[chunk]
            if scaled is not None:
                # Upcast first, then cap and divide, as the reference does (never 16-bit arithmetic).
                x = _cap_and_scale_(scaled[: x.shape[0]].copy_(x), softcap, temperature)
            out = log_p[: x.shape[0]]
            row_max, argmax = x.max(dim=-1, keepdim=True)
            # log_softmax forms (x - max) - log s: exact at any logit magnitude, unlike x - logsumexp(x).
            torch.ops.aten._log_softmax.out(x, -1, False, out=out)
            logprobs[rows] = out.gather(1, safe_targets[rows]).squeeze(1)
            # At the argmax, (x - max) is exactly 0, so log p there is exactly -log s.
            lse[rows] = (row_max - out.gather(1, argmax)).squeeze(1)
            if return_entropy:
                # -sum p log p, with p log p = 0 where p = 0 (and NaN kept where the logits hold NaN).
                entropy[rows] = torch.special.entr(out.exp_()).sum(-1)

        return work

    _run_tiles(len(chunks), make_worker)
    logprobs.masked_fill_(~valid, 0.0).masked_fill_(outside, float("nan"))
    if return_entropy:
        entropy.masked_fill_(~valid, 0.0)
    return logprobs, entropy, lse


def token_logprobs_backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    softcap: float = 0.0,
) -> torch.Tensor:
    """The logit gradient, row chunk by row chunk; an fp32 chunk is computed where it is stored (no copy)."""
    vocab = logits.shape[-1]
    targets = targets.reshape(-1)
    grad_logprobs = grad_logprobs.reshape(-1).float()
    grad_entropy = grad_entropy.reshape(-1).float() if grad_entropy is not None else None
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    grad_rows = grad.view(-1, vocab)
    step = max(1, tile_budget() // vocab)
    chunks = _row_chunks(logits, step)
    in_place = grad.dtype == torch.float32

    def make_worker():
        scratch = None if in_place else torch.empty((step, vocab), dtype=torch.float32, device=logits.device)

        def work(chunk: int) -> None:
            rows, x = chunks[chunk]
            dest = grad_rows[rows]
            x = (dest if in_place else scratch[: x.shape[0]]).copy_(x)
            chunk_targets = targets[rows]
            slope = _softcap_slope(x, softcap) if softcap else None  # from the raw logits, before capping
            result = _grad_logits(
                _cap_and_scale_(x, softcap, temperature),
                lse[rows],
                entropy[rows] if grad_entropy is not None else None,
                chunk_targets.long(),
                chunk_targets != ignore_index,
                grad_logprobs[rows],
                grad_entropy[rows] if grad_entropy is not None else None,
                temperature,
                slope=slope,
            )
            if result.data_ptr() != dest.data_ptr():
                dest.copy_(result)

        return work

    _run_tiles(len(chunks), make_worker)
    return grad


# ------------------------------------------------------------------------------------- from hidden and weight


def _logits_tile(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    temperature: float,
    out: torch.Tensor | None = None,
    softcap: float = 0.0,
) -> torch.Tensor:
    """fp32 (hidden @ weight.T + bias) / T, scaling the small operands instead of the [tokens, vocab] tile; with
    `softcap`, the tile is capped, then divided."""
    if softcap:
        logits = _logits_tile(hidden, weight, bias, 1.0, out)
        return _cap_and_scale_(logits, softcap, temperature)
    h = hidden.float()
    if temperature != 1.0:
        h = h * (1.0 / temperature)
    w = weight.float()
    if bias is None:
        return torch.mm(h, w.T, out=out)
    return torch.addmm(bias.float() * (1.0 / temperature), h, w.T, out=out)


def _tile_buffer(token_chunk: int, vocab_chunk: int, device) -> torch.Tensor:
    """Flat fp32 storage for one tile, viewed contiguously at each tile's own shape (edge tiles are smaller)."""
    return torch.empty(token_chunk * vocab_chunk, dtype=torch.float32, device=device)


# Block statistics (max, sum, entropy per token and vocabulary block) kept for at most this many bytes: more tokens
# are done in groups, one `_run_tiles` each.
STATS_BYTES = 16 << 20


def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    segment_ids: torch.Tensor | None = None,
    num_segments: int = 0,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, ...]:
    """Same contract as `sarkern.kernels.linear_logprobs_forward`.

    Per tile: one GEMM into the thread's reused buffer, the target logits read from it, then max, exp and sum in
    place. Each vocabulary block b leaves, per token, its max M_b, its sum S_b of exp(x - M_b) and, for the entropy,
    its E_b = sum of -e log e; once every tile of a group of tokens is done, the blocks are merged, as the Triton
    kernels merge their splits.
    """
    n_tokens = hidden.shape[0]
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logprobs = torch.empty(n_tokens, **f32)
    lse = torch.empty(n_tokens, **f32)
    entropy = torch.empty(n_tokens, **f32) if return_entropy else logprobs.new_empty(0)
    token_chunk, vocab_chunk = tile_shape(n_tokens, vocab)
    n_blocks = -(-vocab // vocab_chunk)
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0).long()
    n_stats = 3 if return_entropy else 2
    group = max(1, STATS_BYTES // (4 * n_stats * n_blocks * token_chunk)) * token_chunk
    for g0 in range(0, n_tokens, group):
        g1 = min(g0 + group, n_tokens)
        _linear_forward_group(
            hidden[g0:g1], weight, bias, safe_targets[g0:g1], valid[g0:g1], temperature, softcap,
            token_chunk, vocab_chunk, logprobs[g0:g1], lse[g0:g1], entropy[g0:g1] if return_entropy else None,
        )  # fmt: skip

    segment_sums = torch.zeros(num_segments if segment_ids is not None else 0, **f32)
    segment_counts = torch.zeros_like(segment_sums)
    if segment_ids is not None:
        # Ids past the last segment are dropped, as the kernels drop them (callers may skip the id check).
        counted = (segment_ids >= 0) & (segment_ids < num_segments) & valid
        index = segment_ids[counted].long()
        segment_sums.index_add_(0, index, logprobs[counted])
        segment_counts.index_add_(0, index, torch.ones_like(logprobs[counted]))
    return logprobs, entropy, lse, segment_sums, segment_counts


def _linear_forward_group(
    hidden, weight, bias, targets, valid, temperature, softcap, token_chunk, vocab_chunk, logprobs, lse, entropy
) -> None:
    """`linear_logprobs_forward` for a group of tokens, into the group's slices of the results."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    n_blocks = -(-vocab // vocab_chunk)
    block_max = torch.empty((n_blocks, n_tokens), **f32)
    block_sum = torch.empty_like(block_max)
    block_entropy = torch.empty_like(block_max) if entropy is not None else None
    # Each token's target lies in one block: the one tile that holds it writes its logit.
    target_x = torch.zeros(n_tokens, **f32)

    def make_worker():
        buffer = _tile_buffer(token_chunk, vocab_chunk, hidden.device)

        def work(tile: int) -> None:
            chunk, b = divmod(tile, n_blocks)
            n0, n1 = chunk * token_chunk, min((chunk + 1) * token_chunk, n_tokens)
            v0, v1 = b * vocab_chunk, min((b + 1) * vocab_chunk, vocab)
            x = _logits_tile(
                hidden[n0:n1],
                weight[v0:v1],
                bias[v0:v1] if bias is not None else None,
                temperature,
                out=buffer[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0),
                softcap=softcap,
            )
            # The target logit comes from the same fp32 tile as the log-sum-exp.
            local = targets[n0:n1] - v0
            hits = ((local >= 0) & (local < v1 - v0)).nonzero().squeeze(1)
            target_x[n0 + hits] = x[hits, local[hits]]
            tile_max = torch.amax(x, dim=1, out=block_max[b, n0:n1])
            # A block of -inf logits has max -inf; shift it by 0 so that exp gives 0, not NaN.
            x.sub_(tile_max.masked_fill(tile_max == float("-inf"), 0.0).unsqueeze(1)).exp_()
            torch.sum(x, dim=1, out=block_sum[b, n0:n1])
            if block_entropy is not None:
                torch.sum(torch.special.entr(x, out=x), dim=1, out=block_entropy[b, n0:n1])

        return work

    _run_tiles(-(-n_tokens // token_chunk) * n_blocks, make_worker)
    run_max = block_max.amax(dim=0)
    shift = run_max.masked_fill(run_max == float("-inf"), 0.0)
    scale = (block_max - shift).exp_()  # exp(M_b - max): 0 for an all -inf block
    total = (scale * block_sum).sum(dim=0)
    log_total = total.log()
    lse.copy_(shift + log_total)
    logprobs.copy_(torch.where(valid, (target_x - shift) - log_total, 0.0))
    # A target id outside the vocabulary (the caller skipped the id check) gives NaN, as in the kernels.
    logprobs.masked_fill_(valid & ((targets < 0) | (targets >= vocab)), float("nan"))
    if block_entropy is not None:
        # H = log s + sum_b exp(M_b - max) (E_b - S_b (M_b - max)) / s; a block with weight 0 adds 0.
        gap = torch.where(scale > 0, block_max - shift, 0.0)
        spread = (scale * (block_entropy - block_sum * gap)).sum(dim=0)
        entropy.copy_(torch.where(valid, log_total + spread / total, 0.0))


def linear_logprobs_grad_logits(
    out: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    col_offset: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Same contract as `sarkern.kernels.linear_logprobs_grad_logits`: the tile of logit gradients, computed in
    `out` when it is fp32 (and contiguous), copied into it when it has another dtype."""
    fp32_out = out if out is not None and out.dtype == torch.float32 else None
    x = _logits_tile(hidden, weight, bias, 1.0 if softcap else temperature, out=fp32_out)
    slope = _softcap_slope(x, softcap) if softcap else None
    x = _cap_and_scale_(x, softcap, temperature) if softcap else x
    valid = targets != ignore_index
    grad = _grad_logits(
        x, lse, entropy, targets.long(), valid, grad_logprobs, grad_entropy, temperature, col_offset, slope
    )
    return grad if out is None or out.dtype == torch.float32 else out.copy_(grad)


def linear_logprobs_backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of hidden, weight and bias (empty when not needed), from logits recomputed one tile at a time.

    A thread takes a whole vocabulary block at a time: that block of the LM head (and its fp32 gradient accumulator)
    stays in cache while every token chunk passes over it, and is finished once; the hidden-state gradient
    accumulates in fp32 over the blocks, in one accumulator per thread, summed at the end. Each tile of logit
    gradients feeds two GEMM updates; products and accumulators are fp32 whatever the input dtype, so a 16-bit
    gradient is rounded once, at the end.
    """
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    token_chunk, vocab_chunk = tile_shape(n_tokens, vocab)
    grad_hidden = torch.zeros_like(hidden) if needs_hidden_grad else hidden.new_empty(0)
    hidden_acc = grad_hidden if hidden.dtype == torch.float32 else torch.zeros(grad_hidden.shape, **f32)
    grad_weight = torch.empty_like(weight) if needs_weight_grad else weight.new_empty(0)
    grad_bias = torch.zeros(vocab, **f32) if needs_bias_grad else None
    grad_logprobs = grad_logprobs.float()
    grad_entropy = grad_entropy.float() if grad_entropy is not None else None
    hidden_f32 = hidden if hidden.dtype == torch.float32 else None
    # The first thread to start accumulates into hidden_acc itself; the others into their own, added at the end.
    hidden_accs: list[torch.Tensor] = []
    accs_lock = threading.Lock()

    def make_worker():
        buffer = _tile_buffer(token_chunk, vocab_chunk, hidden.device)
        with accs_lock:
            mine = hidden_acc if not hidden_accs else torch.zeros(hidden_acc.shape, **f32)
            hidden_accs.append(mine)
        # 16-bit operands are upcast once per tile into reused buffers.
        h_buf = torch.empty((token_chunk, dim), **f32) if hidden_f32 is None else None
        w_buf = torch.empty((vocab_chunk, dim), **f32) if weight.dtype != torch.float32 else None
        weight_acc = (
            torch.empty((vocab_chunk, dim), **f32) if needs_weight_grad and weight.dtype != torch.float32 else None
        )

        def work(block: int) -> None:
            v0, v1 = block * vocab_chunk, min((block + 1) * vocab_chunk, vocab)
            w = weight[v0:v1] if w_buf is None else w_buf[: v1 - v0].copy_(weight[v0:v1])
            if not needs_weight_grad:
                acc = None
            elif weight_acc is None:
                acc = grad_weight[v0:v1].zero_()
            else:
                acc = weight_acc[: v1 - v0].zero_()
            for n0 in range(0, n_tokens, token_chunk):
                n1 = min(n0 + token_chunk, n_tokens)
                h = hidden[n0:n1] if h_buf is None else h_buf[: n1 - n0].copy_(hidden[n0:n1])
                grad_tile = linear_logprobs_grad_logits(
                    buffer[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0),
                    h,
                    w,
                    bias[v0:v1] if bias is not None else None,
                    targets[n0:n1],
                    lse[n0:n1],
                    entropy[n0:n1] if entropy is not None else None,
                    grad_logprobs[n0:n1],
                    grad_entropy[n0:n1] if grad_entropy is not None else None,
                    temperature,
                    ignore_index,
                    col_offset=v0,
                    softcap=softcap,
                )
                if needs_hidden_grad:
                    mine[n0:n1].addmm_(grad_tile, w)
                if acc is not None:
                    acc.addmm_(grad_tile.T, h)
                if grad_bias is not None:
                    grad_bias[v0:v1] += grad_tile.sum(0)
            if weight_acc is not None:
                grad_weight[v0:v1] = acc

        return work

    _run_tiles(-(-vocab // vocab_chunk), make_worker, sums_per_thread=needs_hidden_grad)
    if needs_hidden_grad:
        for other in hidden_accs[1:]:
            hidden_acc += other
        if hidden_acc is not grad_hidden:
            grad_hidden.copy_(hidden_acc)
    grad_bias = grad_bias.to(hidden.dtype) if grad_bias is not None else hidden.new_empty(0)
    return grad_hidden, grad_weight, grad_bias
