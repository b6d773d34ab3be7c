"""Proof, on the model itself, that the scorer's packed shared-prefix forward equals per-sample forwards.

Instead of an allow-list of architectures, :func:`verify_scorer` runs a short probe the first time a scorer scores
(and again whenever the model's config, dtype, device or the scorer's precision settings change): two prefixes with
two completions each, one of the prefixes and one completion longer than the model's smallest sliding window when it
has one. It compares the per-token log-probs of the scorer's packed path (backbone with the shared-prefix attention,
LM head, logit scaling and soft-capping folded into the fused op) with those of plain per-sample forwards
``model(prefix + completion).logits``, in the model's own precision, within a bound derived from that precision
(:func:`probe_tolerance`). A model that does not match is refused with the cause named:

* its attention never reached the shared-prefix attention (it does not dispatch through transformers'
  ``AttentionInterface``),
* its logits are not what the scorer computes from the backbone's last hidden state (an unknown logit transform),
* or the packed forward itself differs (attention, positions, or state that crosses sequences).

Results are cached per model object (weakly) and per fingerprint of what the probe depends on.
"""

from __future__ import annotations

import inspect
import json
import math
import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from .attention import AttentionBackendError, LayoutMissingError
from .model_support import UnsupportedModelError, check_config_traps
from .packing import Pair, build_pass, plan_passes

if TYPE_CHECKING:
    from .scorer import SARScorer

__all__ = ["probe_tolerance", "verify_scorer"]

# model -> {fingerprint: None (verified) or the reason it was refused}
_VERIFIED: weakref.WeakKeyDictionary[nn.Module, dict[str, str | None]] = weakref.WeakKeyDictionary()

# Completion tokens compared per probe sequence (its last ones).
COMPARED_TOKENS = 16

# Unit roundoff of the formats a forward may store its activations in.
_UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def _fingerprint(scorer: SARScorer) -> str:
    configs = [json.dumps(c.to_dict(), sort_keys=True, default=str) for c in scorer.configs()]
    weight = scorer.lm_head.weight
    return json.dumps(
        [
            configs,
            [c._attn_implementation for c in scorer.configs()],
            scorer.attention_backend,
            str(weight.dtype),
            str(weight.device),
            str(scorer.autocast_dtype),
            scorer.forward_context is not None,
            scorer.lm_head_fp32,
        ]
    )


def verify_scorer(scorer: SARScorer) -> None:
    """Run the probe once per model and fingerprint; raise :class:`UnsupportedModelError` naming the cause when the
    packed forward does not reproduce per-sample forwards."""
    check_config_traps(scorer.model)  # cheap, and the config may have changed since the scorer was built
    key = _fingerprint(scorer)
    results = _VERIFIED.setdefault(scorer.model, {})
    if key not in results:
        results[key] = _probe(scorer)
    if results[key] is not None:
        raise UnsupportedModelError(results[key])


def _smallest_window(scorer: SARScorer) -> int | None:
    windows = []
    for config in scorer.configs():
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        window = getattr(config, "sliding_window", None)
        if isinstance(window, int) and not isinstance(window, bool) and window > 0:
            windows.append(window)
    return min(windows, default=None)


def _probe_sequences(scorer: SARScorer) -> tuple[list[torch.Tensor], list[torch.Tensor], list[Pair]]:
    """Two prefixes, two completions each (one of a single token); with a sliding window ``w``, the second prefix
    is longer than ``w`` and its long completion runs ``w + 2`` tokens past it, so the window cuts into both."""
    window = _smallest_window(scorer)
    if window is not None and scorer.max_positions is not None and window + 3 > scorer.max_positions:
        window = None  # a window as long as the positions never cuts anything
    prefix_lengths = [3, 4 if window is None else window + 1]
    completion_lengths = [5, 1, 1, 3 if window is None else window + 2]
    if scorer.max_positions is not None:  # shrink to the model's positions (tiny models)
        room = scorer.max_positions - prefix_lengths[1]
        completion_lengths[3] = max(1, min(completion_lengths[3], room))
    generator = torch.Generator().manual_seed(0)
    draw = lambda n: torch.randint(0, scorer.vocab_size, (n,), generator=generator)  # noqa: E731
    prefixes = [draw(n) for n in prefix_lengths]
    completions = [draw(n) for n in completion_lengths]
    pairs = [Pair(0, 0), Pair(0, 1), Pair(1, 2), Pair(1, 3)]
    return prefixes, completions, pairs


def probe_tolerance(scorer: SARScorer, compute_dtype: torch.dtype, logit_scale: float, max_len: int) -> float:
    """How far two forwards that compute the same function may put a token's log-prob apart, to first order.

    The forward is a chain of ``3 L + 1`` stages (per layer attention, MLP and norm, then the LM head). Each stage
    sums at most ``n`` products (``n``: the widest ``nn.Linear`` input, the head size, the sequence length), in fp32
    (fp64 for a float64 model), off by at most ``n u_acc`` of the stage's scale (Higham, section 3.1), and stores its
    output in the compute dtype, off by ``u_store`` more (0 for fp32: its sums are the rounding already; TF32 matmuls
    round their operands to 2^-11). Measured
    against the logits' scale the errors add along the residual stream; a log-prob ``z_t - logsumexp(z)`` moves by
    at most twice the largest logit error, and the two forwards compared each carry such an error (factor 2 again).
    """
    config = scorer.text_config
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int):  # the longest stack of blocks in the backbone
        layers = max((len(m) for m in scorer.backbone.modules() if isinstance(m, nn.ModuleList)), default=1)
    widest = max_len
    for module in scorer.model.modules():
        if isinstance(module, nn.Linear):
            widest = max(widest, module.in_features)
    for name in ("hidden_size", "intermediate_size", "moe_intermediate_size", "head_dim"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            widest = max(widest, value)
    u_acc = _UNIT_ROUNDOFF[torch.float64] if compute_dtype == torch.float64 else _UNIT_ROUNDOFF[torch.float32]
    u_store = 0.0 if compute_dtype in (torch.float32, torch.float64) else _UNIT_ROUNDOFF.get(compute_dtype, 2.0**-8)
    if compute_dtype == torch.float32 and scorer.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        u_store = 2.0**-11  # TF32 matmuls round their fp32 operands to 10 mantissa bits
    stages = 3 * layers + 1
    return 4 * stages * (widest * u_acc + u_store) * max(1.0, logit_scale)


def _precision(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul of ``dtype`` operands computes in here: the autocast dtype when autocast is on."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


def _reference(scorer: SARScorer, sequences: list[torch.Tensor], compared: list[int]):
    """Log-probs of the last ``compared[i]`` tokens of each sequence from plain per-sample forwards, and the largest
    |logit| seen."""
    logprobs, scale = [], 0.0
    keeps_logits = "logits_to_keep" in inspect.signature(scorer.model.forward).parameters
    for ids, n in zip(sequences, compared):
        kwargs = {"logits_to_keep": n + 1} if keeps_logits else {}  # no full-vocabulary rows we do not compare
        out = scorer.model(input_ids=ids.unsqueeze(0).to(scorer.device), use_cache=False, **kwargs)
        logits = out.logits[0, -(n + 1) : -1].float()  # the rows that predict the compared tokens
        scale = max(scale, float(logits.abs().max()))
        rows = torch.log_softmax(logits, dim=-1)
        logprobs.append(rows.gather(-1, ids[len(ids) - n :].unsqueeze(-1).to(rows.device)).squeeze(-1).cpu())
    return logprobs, scale


def _head_only(scorer: SARScorer, sequences: list[torch.Tensor], compared: list[int]) -> list[torch.Tensor]:
    """Log-probs the scorer's head computes from the backbone's own per-sample forwards (last ``compared[i]``)."""
    out = []
    for ids, n in zip(sequences, compared):
        outputs = scorer.backbone(input_ids=ids.unsqueeze(0).to(scorer.device), use_cache=False)
        hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
        rows = hidden[0, len(ids) - n - 1 : len(ids) - 1]
        out.append(scorer.head_logprobs(rows, ids[len(ids) - n :].to(scorer.device), temperature=1.0).cpu())
    return out


def _worst(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> tuple[float, int, int]:
    worst = (0.0, 0, 0)
    for i, (a, e) in enumerate(zip(actual, expected)):
        diff = (a.double() - e.double()).abs()
        diff = torch.where(torch.isnan(diff), torch.full_like(diff, math.inf), diff)
        j = int(diff.argmax())
        if float(diff[j]) > worst[0]:
            worst = (float(diff[j]), i, j)
    return worst


def _packed(scorer: SARScorer, prefixes, completions, pairs, compared) -> tuple[list[torch.Tensor], list[int]]:
    """The scorer's log-probs of the compared tokens of each pair (the scorer's passes, without a token budget),
    and how many times the shared-prefix attention ran in each pass."""
    packed: list[torch.Tensor] = [torch.empty(0)] * len(pairs)
    calls: list[int] = []
    with scorer.scoring_mode(shared_prefix=True):
        plan = plan_passes(pairs, prefixes, completions, 1 << 62, regime=scorer.rope_regime, feed_last=scorer.feed_last)
        for members in plan:
            pack = build_pass(
                [pairs[j] for j in members], prefixes, completions, scorer.attention_backend, feed_last=scorer.feed_last
            )
            per_token = scorer.pass_logprobs(pack, temperature=1.0).cpu()
            calls.append(pack.layout.calls)
            for s, j in enumerate(members):
                packed[j] = per_token[pack.segment_ids == s][-compared[j] :]
    return packed, calls


def _failure(name: str, err: Exception) -> str:
    """Why a model whose packed forward raised cannot be scored."""
    if isinstance(err, LayoutMissingError):
        return (
            f"{name}'s attention layers do not pass the backbone's keyword arguments on to the attention function, "
            "so the packed layout never reaches sarkern's shared-prefix attention"
        )
    if isinstance(err, NotImplementedError):  # the shared-prefix attention's own refusals (sinks, non-causal)
        return f"{name} needs what sarkern's shared-prefix attention does not reproduce: {err}"
    first_line = str(err).splitlines()[0] if str(err) else ""
    return (
        f"{name}'s forward fails under sarkern's shared-prefix attention ({type(err).__name__}: {first_line}); "
        "its attention does not run through transformers' AttentionInterface the way the packed forward needs"
    )


def _probe(scorer: SARScorer) -> str | None:
    """None when the packed forward reproduces per-sample forwards on the probe; else the reason."""
    name = type(scorer.model).__name__
    prefixes, completions, pairs = _probe_sequences(scorer)
    sequences = [torch.cat([prefixes[p.prefix], completions[p.completion]]) for p in pairs]
    lengths = [len(completions[p.completion]) for p in pairs]
    # The last tokens of each completion (those past the window in the long one); fewer full-vocabulary logit rows.
    compared = [min(n, COMPARED_TOKENS) for n in lengths]
    precisions = [_precision(scorer.device.type, scorer.lm_head.weight.dtype)]  # the scorer's own
    head_scales = [0.0]

    def seen_by_the_head(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        # The model's own forward may run in another precision than the scoring context says (accelerate's mixed
        # precision wraps `model.forward` in autocast): the LM head's input tells which. Its raw output is the scale
        # rounding errors are relative to, before a soft-cap shrinks the logits.
        precisions.append(_precision(out.device.type, args[0].dtype))
        head_scales.append(float(out.detach().abs().max()))

    hook = scorer.lm_head.register_forward_hook(seen_by_the_head)
    try:
        with scorer.scoring_mode(shared_prefix=False):
            reference, scale = _reference(scorer, sequences, compared)
            precisions.append(_precision(scorer.device.type, scorer.lm_head.weight.dtype))
    finally:
        hook.remove()
    scale = max(scale, abs(scorer.logit_transform.multiplier) * max(head_scales))
    compute_dtype = max(precisions, key=lambda dtype: _UNIT_ROUNDOFF.get(dtype, 2.0**-8))  # the coarsest

    try:
        packed, calls = _packed(scorer, prefixes, completions, pairs, compared)
    except (AttentionBackendError, torch.OutOfMemoryError):
        raise  # the environment, not the model: nothing to remember about the model
    except Exception as err:  # noqa: BLE001 - whatever the model's own code does with the packed forward
        return _failure(name, err)
    if not any(calls):
        return (
            f"{name}'s attention layers never called sarkern's shared-prefix attention: they do not dispatch through "
            "transformers' AttentionInterface on config._attn_implementation, so the packed forward would let "
            "sequences attend to each other"
        )
    tol = probe_tolerance(scorer, compute_dtype, scale, max(map(len, sequences)))
    error, i, j = _worst(packed, reference)
    if error <= tol:
        return None

    # Which part differs: the logits (the model's own transformation of its LM head's output), or the packing.
    with scorer.scoring_mode(shared_prefix=False):
        head_error, _, _ = _worst(_head_only(scorer, sequences, compared), reference)
    transform = scorer.logit_transform
    if head_error > tol:
        return (
            f"{name}'s logits are not what SARScorer computes from its backbone's last hidden state (LM head, then "
            f"logit multiplier {transform.multiplier:g} and final soft-cap {transform.softcap} read from the "
            f"config): log-probs differ by {head_error:.3g} (tolerance {tol:.3g}); the model transforms its logits "
            "in a way the scorer does not know"
        )
    layers = getattr(scorer.text_config, "num_hidden_layers", None)
    hint = ""
    if isinstance(layers, int) and min(calls) < layers:
        hint = (
            "; some layers do not attend through it: layers that do not attend (recurrent or state-space mixers) "
            "carry state from one packed sequence into the next"
        )
    token = lengths[i] - compared[i] + j
    where = f"probe sequence {i} (prefix {len(sequences[i]) - lengths[i]} + completion {lengths[i]} tokens)"
    return (
        f"{name}'s packed shared-prefix forward differs from per-sample forwards by {error:.3g} in a token's log-prob "
        f"(tolerance {tol:.3g}, {where}, token {token}); the shared-prefix attention ran {min(calls)} times for "
        f"{layers} layers (attention backend {scorer.attention_backend!r}){hint}. Something in the model (its "
        "attention, its positions, or state shared across the packed row) does not follow the layout"
    )
