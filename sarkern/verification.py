"""What the scorer has proven about a model: that its LM head is what the scorer computes, and whether (and up to
which row length) its packed shared-prefix forward equals per-sample forwards.

Two checks, each run on the model itself and remembered per model object (weakly) and per fingerprint of what they
depend on (configs, module structure, dtype, device, the scorer's precision options):

* **The head** (:func:`check_head`, every scorer's first call, on every process alike, even one with nothing to
  score, since it runs the model's root forward): the log-probs the scorer computes from the backbone's last hidden
  state (LM head, logit scaling and soft-cap from the config) must match the model's own logits within the rounding
  of one head product. A model that transforms its logits otherwise cannot be scored by either path:
  :class:`UnsupportedModelError`.
* **The packed path** (:func:`prove_packed`): structural checks first (:mod:`sarkern.structure`), then a probe at the
  packing the scorer will really use: several groups in one pass, siblings that both feed rows, the placeholder
  prefix, sequences past the smallest sliding window and in every RoPE regime the passes mix, all of it placed at the
  end of a row as long as the longest pass the scorer is about to build (within ``max_tokens_per_pass``), so that
  code reading the row index shows. The probe compares per-token log-probs of the packed path with per-sample
  forwards of the same sequences; its tolerance is calibrated on the model: the spread between the per-sample
  forwards and the universal path's batched forwards (two computations that must agree) times
  :data:`SPREAD_FACTOR`, and never below the precision's floor (:data:`FLOORS`). Whatever it does not prove is
  scored on the universal path; the reason is kept.
"""

from __future__ import annotations

import inspect
import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .attention import AttentionBackendError
from .model_support import UnsupportedModelError, config_value, rope_regime_lengths
from .packing import Pair, build_pass, plan_passes
from .scoring_model import ScoringModel
from .structure import packed_path_obstacle
from .universal import build_batch, plan_batches

__all__ = ["FLOORS", "SPREAD_FACTOR", "Verdict", "check_head", "prove_packed", "verdict_for"]

# How far the packed path may be from per-sample forwards, in multiples of the spread of two correct computations.
SPREAD_FACTOR = 4.0
# The smallest tolerance per compute precision, in nats per token: far above the rounding of a correct packed
# forward (fp32: 1e-6 to 6e-5 measured at real widths; bf16: 0.01 to 0.18), far below what a layout error moves.
FLOORS = {torch.float64: 2.0**-30, torch.float32: 2.0**-10, torch.float16: 2.0**-6, torch.bfloat16: 2.0**-4}
_TF32_FLOOR = 2.0**-6  # fp32 matmuls with TF32 operands round them to fp16's mantissa

# Unit roundoff of the formats a forward may store its activations in (the head check's bound).
_UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@dataclass
class Verdict:
    """What is known about one model under one fingerprint."""

    structural: str | None  # why the packed path is ruled out without a probe
    head_refusal: str | None = None  # why no path can score it (set by the head check)
    head_checked: bool = False
    packed_failure: str | None = None  # why the probe did not prove the packed path
    proven_rows: int = 0  # the longest packed row the probe proved

    def packed_reason(self) -> str | None:
        """Why the packed path cannot be used (None: usable up to :attr:`proven_rows`)."""
        return self.structural if self.structural is not None else self.packed_failure


_VERDICTS: weakref.WeakKeyDictionary[nn.Module, dict[str, Verdict]] = weakref.WeakKeyDictionary()


def verdict_for(model: ScoringModel) -> Verdict:
    results = _VERDICTS.setdefault(model.model, {})
    key = model.fingerprint()
    if key not in results:
        obstacle = packed_path_obstacle(model.model, model.configs())
        results[key] = Verdict(structural=None if obstacle is None else f"{model.name}: {obstacle}")
    return results[key]


# ------------------------------------------------------------------------------------------------------ precision


def _precision(device_type: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a matmul of ``dtype`` operands computes in here: the autocast dtype when autocast is on."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else dtype


def _coarsest(dtypes: list[torch.dtype]) -> torch.dtype:
    return max(dtypes, key=lambda dtype: _UNIT_ROUNDOFF.get(dtype, 2.0**-8))


def _tf32(model: ScoringModel, dtype: torch.dtype) -> bool:
    return dtype == torch.float32 and model.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32


def floor_for(model: ScoringModel, dtype: torch.dtype) -> float:
    return _TF32_FLOOR if _tf32(model, dtype) else FLOORS.get(dtype, FLOORS[torch.bfloat16])


def _random_ids(generator: torch.Generator, vocab: int, length: int) -> torch.Tensor:
    return torch.randint(0, vocab, (length,), generator=generator)


# ------------------------------------------------------------------------------------------------------ the head


def check_head(model: ScoringModel, verdict: Verdict) -> None:
    """Once per fingerprint: the scorer's head computation against the model's own logits; raise the refusal."""
    if not verdict.head_checked:
        verdict.head_refusal = _head_refusal(model)
        verdict.head_checked = True
    if verdict.head_refusal is not None:
        raise UnsupportedModelError(verdict.head_refusal)


def _head_refusal(model: ScoringModel) -> str | None:
    generator = torch.Generator().manual_seed(0)
    limit = model.max_positions or 1 << 30
    sequences = [_random_ids(generator, model.vocab_size, min(n, limit)) for n in (6, 11)]
    keeps_logits = "logits_to_keep" in inspect.signature(model.model.forward).parameters
    seen: list[tuple[torch.dtype, float]] = []

    def seen_by_the_head(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        # The model's own forward may run in another precision than the scoring context says (accelerate's mixed
        # precision wraps `model.forward` in autocast): the head's input tells which; its raw output is the scale
        # rounding errors are relative to, before a soft-cap shrinks the logits.
        seen.append((_precision(out.device.type, args[0].dtype), float(out.detach().float().abs().max())))

    worst, scale, width = 0.0, 0.0, 1
    hook = model.head.register_forward_hook(seen_by_the_head)
    try:
        with model.scoring_mode(shared_prefix=False):
            for ids in sequences:
                n = len(ids) - 1
                kwargs = {"logits_to_keep": n + 1} if keeps_logits else {}
                # `forward`, not `__call__`: the root's own hooks (FSDP2's root unit) stay out of a call that runs
                # inside sarkern.sharding.gathered_call; the submodules' hooks run as in any scoring forward.
                logits = model.model.forward(input_ids=ids.unsqueeze(0).to(model.device), use_cache=False, **kwargs)
                logits = logits.logits
                logits = logits[0, -(n + 1) : -1].float()
                expected = torch.log_softmax(logits, -1).gather(-1, ids[1:, None].to(logits.device)).squeeze(1)
                hidden = model.per_sample_hidden(ids)[:n]
                width = max(width, hidden.shape[-1])
                actual = model.token_logprobs(hidden, ids[1:], temperature=1.0)
                diff = (actual.double() - expected.double().to(actual.device)).abs()
                worst = max(worst, math.inf if bool(torch.isnan(diff).any()) else float(diff.max()))
                scale = max(scale, float(logits.abs().max()))
    finally:
        hook.remove()
    dtypes = [model.head_weight.dtype] + [dtype for dtype, _ in seen]
    scale = max([scale] + [abs(model.logit_transform.multiplier) * s for _, s in seen])
    dtype = _coarsest(dtypes)
    u_acc = _UNIT_ROUNDOFF[torch.float64] if dtype == torch.float64 else _UNIT_ROUNDOFF[torch.float32]
    u_store = 0.0 if dtype in (torch.float32, torch.float64) else _UNIT_ROUNDOFF.get(dtype, 2.0**-8)
    if _tf32(model, dtype):
        u_store = 2.0**-11
    # One product of `width` terms and one rounding of the logits, on either side of the comparison.
    tolerance = 4 * (width * u_acc + u_store) * max(1.0, scale)
    if worst <= tolerance:
        return None
    transform = model.logit_transform
    return (
        f"{model.name}'s logits are not what SARScorer computes from its backbone's last hidden state (LM head, then "
        f"logit multiplier {transform.multiplier:g} and final soft-cap {transform.softcap} read from the config): "
        f"log-probs differ by {worst:.3g} (tolerance {tolerance:.3g}); the model transforms its logits in a way the "
        "scorer does not know"
    )


# ------------------------------------------------------------------------------------------------ the packed path


@dataclass
class _Probe:
    prefixes: list[torch.Tensor]
    completions: list[torch.Tensor]
    pairs: list[Pair]
    compared: list[int]  # indices into pairs whose tokens are compared (the rest fill the row)


def _smallest_window(model: ScoringModel) -> int | None:
    windows = []
    for config in model.configs():
        window = config_value(
            config.get_text_config() if hasattr(config, "get_text_config") else config, "sliding_window"
        )
        if isinstance(window, int) and not isinstance(window, bool) and window > 0:
            windows.append(window)
    return min(windows, default=None)


def _probe_layout(model: ScoringModel, rows: int, budget: int, placeholder: list[int] | None) -> _Probe:
    """The sequences of the probe (see the module's docstring), filler first so the compared ones end the row."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.vocab_size
    longest = min(budget, model.max_positions or budget)  # no probe sequence exceeds a pass or the positions
    draw = lambda n: _random_ids(generator, vocab, n)  # noqa: E731
    prefixes: list[torch.Tensor] = []
    completions: list[torch.Tensor] = []
    groups: list[tuple[int, list[int]]] = []  # prefix length, completion lengths

    window = _smallest_window(model)
    prefix_a, lengths_a = 4, [6, 7, 1]
    if window is not None and window + 3 <= longest:  # the window cuts into the prefix and into a completion
        prefix_a, lengths_a = window + 1, [6, min(window + 2, longest - window - 1), 1]
    groups.append((prefix_a, lengths_a))
    placeholder_prefix = torch.tensor(placeholder[: max(1, longest - 5)] if placeholder else draw(5).tolist())
    groups.append((len(placeholder_prefix), [5, 4]))
    for length in rope_regime_lengths(model.text_config):  # a sequence in every regime the passes may hold
        if length <= longest:
            groups.append((3, [length - 3]))

    pairs: list[Pair] = []
    compared: list[int] = []
    content = 0
    for g, (prefix_len, lengths) in enumerate(groups):
        prefix = placeholder_prefix if g == 1 else draw(max(1, min(prefix_len, longest - 1)))
        prefixes.append(prefix)
        content += len(prefix)
        for n in lengths:
            n = max(1, min(n, longest - len(prefix)))
            completions.append(draw(n))
            compared.append(len(pairs))
            pairs.append(Pair(len(prefixes) - 1, len(completions) - 1))
            content += n if model.feed_last else n - 1
    # Filler before the compared sequences: prefixes with one-token completions (their rows count, their tokens
    # are not compared), so that the compared sequences sit at the end of a row of `rows` rows.
    fill = min(rows, budget) - content
    filler_pairs: list[Pair] = []
    while fill > 1:
        length = min(fill - (1 if model.feed_last else 0), longest - 1)
        if length < 1:
            break
        prefixes.append(draw(length))
        completions.append(draw(1))
        filler_pairs.append(Pair(len(prefixes) - 1, len(completions) - 1))
        fill -= length + (1 if model.feed_last else 0)
    offset = len(filler_pairs)
    return _Probe(prefixes, completions, filler_pairs + pairs, [offset + j for j in compared])


def _packed_logprobs(model: ScoringModel, probe: _Probe, budget: int) -> tuple[dict[int, torch.Tensor], list[int]]:
    """The packed path's per-token log-probs of each compared pair, and the attention calls of each pass."""
    out: dict[int, torch.Tensor] = {}
    calls: list[int] = []
    wanted = set(probe.compared)
    plan = plan_passes(
        probe.pairs, probe.prefixes, probe.completions, budget, regime=model.rope_regime, feed_last=model.feed_last
    )
    with model.scoring_mode(shared_prefix=True):
        for members in plan:
            pack = build_pass(
                [probe.pairs[j] for j in members],
                probe.prefixes,
                probe.completions,
                model.attention_backend,
                feed_last=model.feed_last,
            )
            per_token = model.token_logprobs(model.packed_hidden(pack), pack.targets, temperature=1.0).cpu()
            calls.append(pack.layout.calls)
            for s, j in enumerate(members):
                if j in wanted:
                    out[j] = per_token[pack.segment_ids == s]
    return out, calls


def _reference_and_universal(model: ScoringModel, probe: _Probe, budget: int):
    """Per-sample forwards of each compared pair, and the same pairs through the universal path's batches."""
    reference: dict[int, torch.Tensor] = {}
    universal: dict[int, torch.Tensor] = {}
    dtypes = [model.head_weight.dtype]
    pairs = [probe.pairs[j] for j in probe.compared]
    with model.scoring_mode(shared_prefix=False):
        if torch.is_autocast_enabled(model.device.type):
            dtypes.append(torch.get_autocast_dtype(model.device.type))
        for j, pair in zip(probe.compared, pairs):
            prefix, completion = probe.prefixes[pair.prefix], probe.completions[pair.completion]
            hidden = model.per_sample_hidden(torch.cat([prefix, completion]))
            dtypes.append(hidden.dtype)
            rows = hidden[len(prefix) - 1 : len(prefix) - 1 + len(completion)]
            reference[j] = model.token_logprobs(rows, completion, temperature=1.0).cpu()
        plan = plan_batches(
            pairs, probe.prefixes, probe.completions, budget, regime=model.rope_regime, feed_last=model.feed_last
        )
        for members in plan:
            batch = build_batch(
                [pairs[k] for k in members], probe.prefixes, probe.completions, feed_last=model.feed_last
            )
            hidden = model.padded_hidden(batch.input_ids, batch.attention_mask, batch.predict_rows)
            per_token = model.token_logprobs(hidden, batch.targets, temperature=1.0).cpu()
            for s, k in enumerate(members):
                universal[probe.compared[k]] = per_token[batch.segment_ids == s]
    return reference, universal, _coarsest(dtypes)


def _worst(actual: dict[int, torch.Tensor], expected: dict[int, torch.Tensor]) -> tuple[float, int]:
    worst = (0.0, -1)
    for j, e in expected.items():
        diff = (actual[j].double() - e.double()).abs()
        value = math.inf if bool(torch.isnan(diff).any()) else float(diff.max())
        if value > worst[0]:
            worst = (value, j)
    return worst


def _failure(name: str, err: Exception) -> str:
    from .attention import LayoutMissingError

    if isinstance(err, LayoutMissingError):
        return (
            f"{name}'s attention layers do not pass the backbone's keyword arguments on to the attention function, "
            "so the packed layout never reaches sarkern's shared-prefix attention"
        )
    if isinstance(err, NotImplementedError):  # the shared-prefix attention's own refusals (sinks, non-causal)
        return f"{name} needs what sarkern's shared-prefix attention does not reproduce: {err}"
    first_line = str(err).splitlines()[0] if str(err) else ""
    return f"{name}'s forward fails under sarkern's shared-prefix attention ({type(err).__name__}: {first_line})"


def prove_packed(model: ScoringModel, verdict: Verdict, rows: int, budget: int, placeholder: list[int] | None) -> None:
    """Probe the packed path at rows of ``rows`` (within ``budget``) unless already proven that far; record the
    outcome in ``verdict``."""
    # A power of two (few re-probes as batches grow) within the budget: a longer pass holds one sequence alone.
    rows = min(budget, 1 << max(6, (rows - 1).bit_length()))
    if verdict.packed_reason() is not None or rows <= verdict.proven_rows:
        return
    probe = _probe_layout(model, rows, budget, placeholder)
    reference, universal, dtype = _reference_and_universal(model, probe, budget)
    try:
        packed, calls = _packed_logprobs(model, probe, budget)
    except (AttentionBackendError, torch.OutOfMemoryError):
        raise  # the environment, not the model: nothing to remember about the model
    except Exception as err:  # noqa: BLE001 - whatever the model's own code does with the packed forward
        verdict.packed_failure = _failure(model.name, err)
        return
    name = model.name
    if not all(calls):
        verdict.packed_failure = (
            f"{name}'s attention layers never called sarkern's shared-prefix attention: they do not dispatch through "
            "transformers' AttentionInterface on config._attn_implementation"
        )
        return
    spread, _ = _worst(universal, reference)
    floor = floor_for(model, dtype)
    tolerance = max(SPREAD_FACTOR * spread, floor)
    error, j = _worst(packed, reference)
    if error <= tolerance:
        verdict.proven_rows = max(verdict.proven_rows, rows)
        return
    pair = probe.pairs[j]
    prefix_len, completion_len = len(probe.prefixes[pair.prefix]), len(probe.completions[pair.completion])
    verdict.packed_failure = (
        f"{name}'s packed shared-prefix forward differs from per-sample forwards by {error:.3g} in a token's "
        f"log-prob (tolerance {tolerance:.3g}: {SPREAD_FACTOR:g} x the spread {spread:.3g} of two correct "
        f"computations, at least {floor:.3g} in {str(dtype).removeprefix('torch.')}; probe sequence of prefix "
        f"{prefix_len} + completion {completion_len} tokens in a {rows}-row pass; the shared-prefix attention ran "
        f"{min(calls)} times per pass)"
    )
