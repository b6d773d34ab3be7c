"""Tiny random models of the families GRPO users train now (transformers >= 5 ships them all), built from configs:
hybrids with linear attention, state-space or convolution layers, attention sinks, chunked attention, per-layer
configs, attention temperature tuning, multi-head latent attention. Each entry names the scoring path the scorer must
take on it and why; README's families table is checked against these entries (``tests/test_scorer_paths.py``)."""

from __future__ import annotations

import torch
from scorer_models import _COMMON, _IDS

# name -> (config class name, model class name, config fields, expected path, what decides it)
ZOO: dict[str, tuple[str, str, dict, str, str]] = {
    "qwen3_5": (
        "Qwen3_5TextConfig", "Qwen3_5ForCausalLM",
        {"head_dim": 8, "layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2,
         "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8},
        "universal", "Gated DeltaNet layers (layer_types)",
    ),
    "qwen3_next": (
        "Qwen3NextConfig", "Qwen3NextForCausalLM",
        {"head_dim": 8, "layer_types": ["linear_attention", "full_attention"], "linear_num_key_heads": 2,
         "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 8, "num_experts": 4,
         "num_experts_per_tok": 2, "moe_intermediate_size": 16, "shared_expert_intermediate_size": 16},
        "universal", "Gated DeltaNet layers (layer_types)",
    ),
    "lfm2": (
        "Lfm2Config", "Lfm2ForCausalLM", {"layer_types": ["conv", "full_attention"], "block_ff_dim": 64},
        "universal", "short convolutions (layer_types)",
    ),
    "falcon_h1": (
        "FalconH1Config", "FalconH1ForCausalLM",
        {"head_dim": 8, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8, "mamba_d_state": 8,
         "mamba_n_groups": 1, "mamba_chunk_size": 8},
        "universal", "parallel Mamba2 + attention (layer_types: hybrid)",
    ),
    "granitemoehybrid": (
        "GraniteMoeHybridConfig", "GraniteMoeHybridForCausalLM",
        {"layer_types": ["mamba", "attention"], "num_local_experts": 4, "num_experts_per_tok": 2,
         "mamba_d_state": 8, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_chunk_size": 8,
         "shared_intermediate_size": 32},
        "universal", "Mamba2 layers (layer_types)",
    ),
    "nemotron_h": (
        "NemotronHConfig", "NemotronHForCausalLM",
        {"head_dim": 8, "hybrid_override_pattern": "M*", "mamba_num_heads": 4, "mamba_head_dim": 8,
         "ssm_state_size": 8, "n_groups": 1, "chunk_size": 8},
        "universal", "Mamba2 layers (layer_types)",
    ),
    "kimi_linear": (
        "KimiLinearConfig", "KimiLinearForCausalLM",
        {"layer_types": ["linear_attention", "full_attention"], "linear_num_heads": 2, "linear_head_dim": 8,
         "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8,
         "num_key_value_heads": 4, "num_local_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16},
        "universal", "Kimi delta attention layers (layer_types)",
    ),
    "gpt_oss": (
        "GptOssConfig", "GptOssForCausalLM",
        {"head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6,
         "layer_types": ["sliding_attention", "full_attention"]},
        "universal", "attention sinks (parameters named sinks)",
    ),
    "llama4_chunked": (
        "Llama4TextConfig", "Llama4ForCausalLM",
        {"head_dim": 8, "intermediate_size_mlp": 64, "num_local_experts": 2, "num_experts_per_tok": 1,
         "attention_chunk_size": 5, "attn_temperature_tuning": False, "no_rope_layers": [1, 1]},
        "universal", "chunked attention (layer_types: chunked_attention)",
    ),
    "llama4_temperature": (
        "Llama4TextConfig", "Llama4ForCausalLM",
        {"head_dim": 8, "intermediate_size_mlp": 64, "num_local_experts": 2, "num_experts_per_tok": 1,
         "attention_chunk_size": 8192, "attn_temperature_tuning": True, "floor_scale": 4, "no_rope_layers": [0, 0]},
        "universal", "query scales from the row index (attn_temperature_tuning)",
    ),
    "gemma4": (
        "Gemma4TextConfig", "Gemma4ForCausalLM",
        {"head_dim": 8, "sliding_window": 6, "vocab_size_per_layer_input": 112, "hidden_size_per_layer_input": 8},
        "packed", "per-layer config; the probe proves the packed path",
    ),
    "deepseek_v3": (
        "DeepseekV3Config", "DeepseekV3ForCausalLM",
        {"num_key_value_heads": 4, "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
         "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1, "kv_lora_rank": 16, "q_lora_rank": 16,
         "qk_rope_head_dim": 4, "qk_nope_head_dim": 4, "v_head_dim": 8, "head_dim": 4},
        "packed", "multi-head latent attention; the probe proves the packed path",
    ),
}  # fmt: skip


# Entries whose config older transformers releases cannot run (their own forward fails): the first release that can.
# (llama4_temperature: both layers NoPE, so full attention; the chunk size, longer than any test sequence, is there
# because Llama 4 builds its chunked mask whatever the layers, and transformers 5.17 refuses one without a size.)
MIN_TRANSFORMERS = {"llama4_temperature": "5.0"}  # 4.x's Llama 4 builds chunked masks with no chunk size


def zoo_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised fp32 model of zoo family ``name``, in eval mode."""
    import transformers as tf

    config_name, model_name, fields, _, _ = ZOO[name]
    from packaging.version import Version

    too_old = Version(tf.__version__) < Version(MIN_TRANSFORMERS.get(name, "0"))
    if not hasattr(tf, model_name) or too_old:  # setup.py admits transformers releases from before the family
        import pytest

        pytest.skip(f"transformers {tf.__version__} cannot run this {model_name} config")
    config = getattr(tf, config_name)(**{**_COMMON, **_IDS, **fields, **overrides})
    torch.manual_seed(seed)
    return getattr(tf, model_name)(config).float().eval()
