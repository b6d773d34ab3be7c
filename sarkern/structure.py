"""Structural reasons the packed shared-prefix forward cannot be proven for a model, found without running it.

The packed path replaces the model's attention with sarkern's shared-prefix attention and feeds many sequences in
one row. That is exact only when every layer mixes positions through attention the layout reproduces, and when
nothing else in the model looks across the row. Each check below names something that breaks this; a model with any
of them is scored on the universal path (:mod:`sarkern.universal`), which runs the model's own forward. What these
checks cannot see (an attention layer that ignores part of its arguments, code that reads the row index without a
config flag) is left to the probe of :mod:`sarkern.verification`.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .model_support import config_value, text_config

__all__ = ["packed_path_obstacle"]

# Layer types whose only mixing across positions is attention the shared-prefix layout reproduces.
_ATTENTION_LAYER_TYPES = {"full_attention", "sliding_attention"}

# Attention implementations transformers ships; any other name is a user's function the packed path would replace.
_KNOWN_IMPLEMENTATIONS = {
    None,
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "flex_attention",
}


def _registered_outside_transformers(implementation: str) -> bool:
    from transformers import AttentionInterface

    function = AttentionInterface._global_mapping.get(implementation)
    return function is not None and not getattr(function, "__module__", "").startswith("transformers.")


def _custom_attention(configs: list[Any]) -> str | None:
    for config in configs:
        implementation = config_value(config, "_attn_implementation")
        if not isinstance(implementation, str) and implementation is not None:
            return f"its attention implementation is {implementation!r}, not one name"
        if implementation not in _KNOWN_IMPLEMENTATIONS or _registered_outside_transformers(implementation):
            return (
                f"its attention implementation {implementation!r} is registered outside transformers: the packed "
                "path would replace it with sarkern's shared-prefix attention, and whatever it does differently "
                "(a window, a mask) would be lost"
            )
    return None


def packed_path_obstacle(model: nn.Module, configs: list[Any]) -> str | None:
    """Why the packed path is structurally ruled out for ``model`` (one line), or None."""
    config = text_config(model.config)
    layer_types = config_value(config, "layer_types")
    if isinstance(layer_types, (list, tuple)):
        others = sorted({str(t) for t in layer_types} - _ATTENTION_LAYER_TYPES)
        if others:
            return (
                f"it has layers of type {', '.join(others)} (config.layer_types): recurrent, convolutional, hybrid "
                "or chunked layers carry state or patterns along the row that a packed row would run from one "
                "sequence into the next"
            )
    if getattr(model, "_is_stateful", False):
        return f"{type(model).__name__} is stateful (recurrent state across positions)"
    if config_value(config, "attn_temperature_tuning") is True:
        return (
            "its attention temperature tuning (config.attn_temperature_tuning) computes query scales from the "
            "index of the row in the batch, not from the position ids"
        )
    chunk = config_value(config, "attention_chunk_size")
    if chunk is not None:
        return f"it uses chunked attention (config.attention_chunk_size={chunk}), a pattern applied only by its masks"
    for name, _ in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("sinks", "s_aux"):
            return f"it has attention sinks ({name})"
    return _custom_attention(configs)
