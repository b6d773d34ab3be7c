"""What the scorer reads from a model's config: known traps (refused up front, naming the field), how the model turns
its LM head's output into logits (folded into the fused op), and RoPE whose frequencies depend on sequence length.

Everything here is a fast path or a clearer message: whether the packed forward really equals per-sample forwards is
decided on the model itself by :mod:`sarkern.verification`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "LogitTransform",
    "UnsupportedModelError",
    "check_config_traps",
    "config_value",
    "logit_transform",
    "rope_regime",
    "rope_regime_lengths",
    "text_config",
]


class UnsupportedModelError(NotImplementedError):
    """The model (architecture or configuration) cannot be scored exactly by :class:`sarkern.SARScorer`."""


# Families that scale their LM head's output before the softmax: model_type -> (config field, True when the logits
# are divided by it, False when multiplied). The same field name means opposite things in different families
# (Granite divides by `logits_scaling`, HyperCLOVA X multiplies by it), so the family decides, never the name alone.
_LOGIT_SCALES: dict[str, tuple[str, bool]] = {
    **{
        name: ("logits_scaling", True)
        for name in ("granite", "granitemoe", "granitemoeshared", "granitemoehybrid", "granite_swa", "granitemoe_swa")
    },
    "hyperclovax": ("logits_scaling", False),
    **{name: ("logit_scale", False) for name in ("cohere", "cohere2", "cohere2_moe")},
    "falcon_h1": ("lm_head_multiplier", False),
}
_LOGIT_SCALE_FIELDS = ("logits_scaling", "logit_scale", "lm_head_multiplier", "output_multiplier_scale")


@dataclass(frozen=True)
class LogitTransform:
    """``logits = softcap * tanh(multiplier * z / softcap)`` (or ``multiplier * z`` without a cap) on the LM head's
    output ``z``: the model's own logits, before the sampling temperature."""

    multiplier: float = 1.0
    softcap: float | None = None

    def op_options(self, temperature: float) -> dict[str, float]:
        """The same logits divided by ``temperature``, as the fused ops' ``softcap`` (on the raw head output, before
        the temperature) and ``temperature``: ``c tanh(m z / c) / T = (c/m) tanh(z / (c/m)) / (T/m)``, exactly."""
        options = {"temperature": temperature / self.multiplier}
        if self.softcap is not None:
            options["softcap"] = self.softcap / self.multiplier
        return options


def config_value(config: Any, name: str, default: Any = None) -> Any:
    """``config.name``, or ``default`` when the config has no single value for it: absent, or a per-layer attribute
    (Gemma 4's configs raise on a global read of a field that differs between layers)."""
    try:
        return getattr(config, name, default)
    except Exception:  # noqa: BLE001 - transformers' per-layer configs raise their own error types
        return default


def _field(config: Any, name: str) -> Any:
    value = config_value(config, name)
    return None if value is None or isinstance(value, bool) else value


def logit_transform(config: Any) -> LogitTransform:
    """The transformation the model applies to its LM head's output, from its config (see :data:`_LOGIT_SCALES`)."""
    multiplier = 1.0
    known = _LOGIT_SCALES.get(config_value(config, "model_type"))
    if known is not None and _field(config, known[0]) is not None:
        value = float(_field(config, known[0]))
        multiplier = 1.0 / value if known[1] else value
    softcap = _field(config, "final_logit_softcapping")
    return LogitTransform(multiplier, None if softcap is None else float(softcap))


def check_config_traps(model: nn.Module) -> None:
    """Refuse, naming the config field, what is known not to be reproducible before any probe runs."""
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None:
        raise UnsupportedModelError(f"{name} has no Hugging Face config; SARScorer needs a transformers causal LM")
    if config_value(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{name} is an encoder-decoder model (config.is_encoder_decoder=True)")
    config = text_config(config)
    model_type = config_value(config, "model_type")
    for field in _LOGIT_SCALE_FIELDS:
        value = _field(config, field)
        if value is None or value == 1:
            continue
        known = _LOGIT_SCALES.get(model_type)
        if known is None or known[0] != field:
            raise UnsupportedModelError(
                f"{name} (model_type {model_type!r}) sets config.{field}={value!r}, a logit scaling SARScorer does not "
                "know for this family (whether it multiplies or divides the logits, and where)"
            )
        if not (isinstance(value, (int, float)) and value > 0):
            raise UnsupportedModelError(f"{name}: config.{field}={value!r} must be a positive number")
    softcap = _field(config, "final_logit_softcapping")
    if softcap is not None and not (isinstance(softcap, (int, float)) and softcap > 0):
        raise UnsupportedModelError(f"{name}: config.final_logit_softcapping={softcap!r} must be a positive number")
    if config_value(config, "is_causal", True) is False:
        raise UnsupportedModelError(f"{name} is configured as non-causal (config.is_causal=False)")
    if config_value(config, "use_bidirectional_attention", False) is True:
        raise UnsupportedModelError(
            f"{name} attends bidirectionally (config.use_bidirectional_attention=True): it is not a causal LM"
        )


def text_config(config: Any) -> Any:
    """The config of the language model (a multimodal config keeps it in ``text_config``)."""
    get_text_config = getattr(config, "get_text_config", None)
    return get_text_config() if callable(get_text_config) else config


def _rope_parameter_sets(config: Any) -> list[Mapping[str, Any]]:
    """Every RoPE parameter dict of the config (``rope_parameters`` may be nested per layer type)."""
    found = []
    for attr in ("rope_parameters", "rope_scaling"):
        stack = [config_value(config, attr)]
        while stack:
            item = stack.pop()
            if isinstance(item, Mapping):
                if isinstance(item.get("rope_type", item.get("type")), str):
                    found.append(item)
                stack.extend(v for v in item.values() if isinstance(v, Mapping))
    return found


def rope_regime(config: Any) -> Callable[[int], Hashable] | None:
    """For RoPE whose frequencies depend on the sequence length (transformers takes it as the largest position in
    the batch plus one), the regime of a sequence of ``length`` tokens: sequences of one regime see the same
    frequencies when they share a pass whose largest position is that of its longest sequence. ``None`` when the
    RoPE does not depend on length.

    * ``longrope`` (Phi-3/3.5): short factors up to ``original_max_position_embeddings``, long factors beyond.
    * ``dynamic`` NTK: the original frequencies below ``max_position_embeddings``; at or above it the frequencies
      depend on the exact length (and on earlier calls), so each length is its own regime.
    """
    thresholds: list[tuple[str, int]] = []
    for params in _rope_parameter_sets(config):
        rope_type = params.get("rope_type", params.get("type"))
        if rope_type == "longrope":
            original = params.get("original_max_position_embeddings")
            original = original or config_value(config, "original_max_position_embeddings")
            if not isinstance(original, int):
                raise UnsupportedModelError(
                    "longrope RoPE without an integer original_max_position_embeddings in config.rope_parameters"
                )
            thresholds.append(("longrope", original))
        elif "dynamic" in rope_type:
            limit = config_value(config, "max_position_embeddings")
            if not isinstance(limit, int):
                raise UnsupportedModelError(f"RoPE type {rope_type!r} without config.max_position_embeddings")
            thresholds.append(("dynamic", limit))
    if not thresholds:
        return None

    def regime(length: int) -> Hashable:
        key = []
        for kind, threshold in thresholds:
            if kind == "longrope":
                key.append(length > threshold)
            else:
                key.append(-1 if length < threshold else length)
        return tuple(key)

    return regime


def rope_regime_lengths(config: Any) -> list[int]:
    """A sequence length in each RoPE regime past the first (:func:`rope_regime`): what a probe of the packed path
    must also hold so that every regime the passes mix is exercised."""
    lengths = []
    for params in _rope_parameter_sets(config):
        rope_type = params.get("rope_type", params.get("type"))
        if rope_type == "longrope":
            original = params.get("original_max_position_embeddings")
            original = original or config_value(config, "original_max_position_embeddings")
            if isinstance(original, int):
                lengths.append(original + 1)
        elif "dynamic" in rope_type:
            limit = config_value(config, "max_position_embeddings")
            if isinstance(limit, int):
                lengths.append(limit)
    return sorted(set(lengths))
