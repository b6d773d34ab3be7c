"""The chunked PyTorch path: the ops' numbers without Triton, in bounded memory.

Logits exist only one tile of `[tokens, vocab]` at a time (at most `TILE_ELEMENTS` fp32 values), and the tiles of
a token chunk are merged with an online log-sum-exp, exactly as the Triton kernels do it. Everything is computed in
fp32 whatever the input dtype.
"""

from __future__ import annotations

import torch

# 4 Mi fp32 values = 16 MiB per logits tile; a few such temporaries bound the extra memory of every op.
TILE_ELEMENTS = 1 << 22
# Wide vocabulary tiles keep the online merge rare; a [128, 32768] fp32 tile is 16 MiB.
MAX_VOCAB_CHUNK = 32768


def tile_shape(n_tokens: int, vocab: int, tile_elements: int = TILE_ELEMENTS) -> tuple[int, int]:
    """(token chunk, vocabulary chunk) with at most `tile_elements` values per tile."""
    vocab_chunk = max(1, min(vocab, MAX_VOCAB_CHUNK))
    token_chunk = max(1, min(n_tokens, tile_elements // vocab_chunk))
    return token_chunk, vocab_chunk


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
) -> torch.Tensor:
    """d loss / d logits for the scaled logits `x = logits / T` of columns [col_offset, col_offset + x.shape[1]).

    Overwrites `x` (it becomes the result), so a tile costs no extra memory; 1/T is folded into the per-token
    gradients rather than applied to the tile.
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
    return grad.masked_fill_(~valid.unsqueeze(-1), 0.0)


# ----------------------------------------------------------------------------------------------- from logits


def token_logprobs_forward(
    logits: torch.Tensor, targets: torch.Tensor, temperature: float, ignore_index: int, return_entropy: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    targets = targets.reshape(-1)
    n_rows = rows.shape[0]
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty_like(logprobs) if return_entropy else logprobs.new_empty(0)
    step = tile_shape(n_rows, vocab, TILE_ELEMENTS)[0] if vocab <= MAX_VOCAB_CHUNK else max(1, TILE_ELEMENTS // vocab)
    for start in range(0, n_rows, step):
        end = min(start + step, n_rows)
        x = rows[start:end].float() / temperature
        chunk_targets = targets[start:end]
        valid = chunk_targets != ignore_index
        # log_softmax forms (x - max) - log sum: exact at any logit magnitude, unlike x - logsumexp(x).
        log_p = torch.log_softmax(x, dim=-1)
        picked = log_p.gather(1, chunk_targets.masked_fill(~valid, 0).long().unsqueeze(1)).squeeze(1)
        lse[start:end] = torch.logsumexp(x, dim=-1)
        logprobs[start:end] = torch.where(valid, picked, 0.0)
        if return_entropy:
            p = log_p.exp()
            ent = -torch.where(p > 0, p * log_p, torch.zeros_like(p)).sum(-1)
            entropy[start:end] = torch.where(valid, ent, 0.0)
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
) -> torch.Tensor:
    vocab = logits.shape[-1]
    rows = logits.reshape(-1, vocab)
    targets = targets.reshape(-1)
    grad_logprobs = grad_logprobs.reshape(-1).float()
    grad_entropy = grad_entropy.reshape(-1).float() if grad_entropy is not None else None
    grad_rows = torch.empty(rows.shape, dtype=logits.dtype, device=logits.device)
    step = max(1, TILE_ELEMENTS // max(vocab, 1))
    for start in range(0, rows.shape[0], step):
        end = min(start + step, rows.shape[0])
        chunk_targets = targets[start:end]
        grad_rows[start:end] = _grad_logits(
            rows[start:end].float() / temperature,
            lse[start:end],
            entropy[start:end] if grad_entropy is not None else None,
            chunk_targets.long(),
            chunk_targets != ignore_index,
            grad_logprobs[start:end],
            grad_entropy[start:end] if grad_entropy is not None else None,
            temperature,
        )
    return grad_rows.reshape(logits.shape)


# ------------------------------------------------------------------------------------- from hidden and weight


def _logits_tile(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float):
    """fp32 (hidden @ weight.T + bias) / T, scaling the small operands instead of the [tokens, vocab] tile."""
    h = hidden.float()
    if temperature != 1.0:
        h = h * (1.0 / temperature)
    w = weight.float()
    if bias is None:
        return h @ w.T
    return torch.addmm(bias.float() * (1.0 / temperature), h, w.T)


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
) -> tuple[torch.Tensor, ...]:
    """Same contract as `sarkern.kernels.linear_logprobs_forward`."""
    n_tokens = hidden.shape[0]
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logprobs = torch.empty(n_tokens, **f32)
    lse = torch.empty(n_tokens, **f32)
    entropy = torch.empty(n_tokens, **f32) if return_entropy else logprobs.new_empty(0)
    token_chunk, vocab_chunk = tile_shape(n_tokens, vocab)
    valid = targets != ignore_index
    safe_targets = targets.masked_fill(~valid, 0).long()
    for n0 in range(0, n_tokens, token_chunk):
        n1 = min(n0 + token_chunk, n_tokens)
        h = hidden[n0:n1]
        chunk_targets = safe_targets[n0:n1]
        # Running (max, log of the sum of exp(x - max)) rather than one lse: the log-prob is then formed as
        # (x - max) - log sum, exact at any logit magnitude, as in the Triton kernels.
        run_max = torch.full((n1 - n0,), float("-inf"), **f32)
        run_log_sum = torch.full((n1 - n0,), float("-inf"), **f32)
        run_entropy = torch.zeros(n1 - n0, **f32)
        target_x = torch.zeros(n1 - n0, **f32)
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            x = _logits_tile(h, weight[v0:v1], bias[v0:v1] if bias is not None else None, temperature)
            tile_max = x.amax(dim=-1)
            tile_shift = torch.where(tile_max > float("-inf"), tile_max, 0.0)
            x.sub_(tile_shift.unsqueeze(1))
            in_tile = (chunk_targets >= v0) & (chunk_targets < v1)
            picked = x.gather(1, (chunk_targets - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
            target_x += torch.where(in_tile, picked + tile_shift, 0.0)
            if return_entropy:
                e = x.exp()
                tile_sum = e.sum(dim=-1)
                # Entropy of the tile alone: log s - sum e (x - max) / s, with 0 * -inf counted as 0.
                t = torch.where(e > 0, e * x, 0.0).sum(dim=-1)
                tile_entropy = tile_sum.log() - t / tile_sum
            else:
                tile_sum = x.exp_().sum(dim=-1)  # in place: the tile is not needed afterwards
            tile_log_sum = tile_sum.log()
            new_max = torch.maximum(run_max, tile_max)
            shift = torch.where(new_max > float("-inf"), new_max, 0.0)
            log_w_old = run_max - shift + run_log_sum
            log_w_new = tile_max - shift + tile_log_sum
            new_log_sum = torch.logaddexp(log_w_old, log_w_new)
            if return_entropy:
                # Entropy of a union of tiles: H = sum_k w_k (H_k - log w_k), w_k = share of tile k in the sum.
                log_w_old, log_w_new = log_w_old - new_log_sum, log_w_new - new_log_sum
                # `!= -inf` rather than `> -inf`: a NaN (from a NaN logit) must reach the entropy, never read as 0.
                run_entropy = torch.where(log_w_old != float("-inf"), log_w_old.exp() * (run_entropy - log_w_old), 0.0)
                run_entropy += torch.where(
                    log_w_new != float("-inf"), log_w_new.exp() * (tile_entropy - log_w_new), 0.0
                )
            run_max, run_log_sum = new_max, new_log_sum
        run_shift = torch.where(run_max > float("-inf"), run_max, 0.0)
        chunk_valid = valid[n0:n1]
        lse[n0:n1] = run_shift + run_log_sum
        logprobs[n0:n1] = torch.where(chunk_valid, (target_x - run_shift) - run_log_sum, 0.0)
        if return_entropy:
            entropy[n0:n1] = torch.where(chunk_valid, run_entropy, 0.0)

    segment_sums = torch.zeros(num_segments if segment_ids is not None else 0, **f32)
    segment_counts = torch.zeros_like(segment_sums)
    if segment_ids is not None:
        counted = (segment_ids >= 0) & valid
        index = segment_ids[counted].long()
        segment_sums.index_add_(0, index, logprobs[counted])
        segment_counts.index_add_(0, index, torch.ones_like(logprobs[counted]))
    return logprobs, entropy, lse, segment_sums, segment_counts


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
) -> torch.Tensor:
    """Same contract as `sarkern.kernels.linear_logprobs_grad_logits`: the tile of logit gradients, copied into
    `out` when one of another dtype is given, else the fp32 result itself (saving a copy)."""
    x = _logits_tile(hidden, weight, bias, temperature)
    grad = _grad_logits(
        x, lse, entropy, targets.long(), targets != ignore_index, grad_logprobs, grad_entropy, temperature, col_offset
    )
    return grad if out is None or out.dtype == torch.float32 else out.copy_(grad)
