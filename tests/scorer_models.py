"""Tiny models, tokenizers and naive references for the scorer tests (no downloads: everything is built from configs).

The models use a large initialisation scale so that their next-token distributions are far from uniform and depend
strongly on context: a scorer that attended to the wrong keys, used the wrong positions or the wrong hidden state
would be off by far more than the tests' tolerance (``test_scorer.py`` checks that this is so).

The naive references run a float64 copy of the model, so they are exact up to float64 rounding; what the fp32
scorer may differ by is bounded by ``fp32_nll_tolerance``, derived from fp32 rounding, never from one machine's run.
"""

from __future__ import annotations

import copy
import math
import string
import weakref
from collections.abc import Sequence

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB = len(SPECIAL_TOKENS) + len(string.printable)
MODEL_VOCAB = 112  # a few rows more than the tokenizer, as real checkpoints have
MAX_POSITIONS = 256
SLIDING_WINDOW = 6

CHATML_TEMPLATE = (
    "{%- for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + (m['content'] if m['content'] is string else "
    "m['content'] | map(attribute='text') | join('')) + '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{%- endif %}"
)

_COMMON = {
    "vocab_size": MODEL_VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MAX_POSITIONS,
    "initializer_range": 0.3,
    "tie_word_embeddings": False,
}

# name -> (config class, model class, extra config fields). Sliding variants use a window shorter than the test
# sequences, so that it changes the result.
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"head_dim": 8}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": SLIDING_WINDOW}),
    # Sliding window on the second layer only (max_window_layers=1): full and sliding layers in one model.
    "qwen2-sliding": (
        Qwen2Config,
        Qwen2ForCausalLM,
        {"use_sliding_window": True, "sliding_window": SLIDING_WINDOW, "max_window_layers": 1},
    ),
    "qwen3-sliding": (
        Qwen3Config,
        Qwen3ForCausalLM,
        {"head_dim": 8, "use_sliding_window": True, "sliding_window": SLIDING_WINDOW, "max_window_layers": 0},
    ),
}


def tiny_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised fp32 causal LM of architecture ``arch`` (a key of ``ARCHITECTURES``), in eval mode."""
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    config = config_cls(**{**_COMMON, **extra, **overrides})
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    if (arch.endswith("-sliding") or arch == "mistral") and "sliding_window" not in overrides:
        layer_types = getattr(config, "layer_types", None)
        assert config.sliding_window == SLIDING_WINDOW, config
        assert layer_types is None or "sliding_attention" in layer_types, layer_types
    return model


# Every decoder family the scorer is tested on, as tiny random models (name -> config class, model class, config
# fields). `tiny_family_model` builds them; the families' own quirks are made to bite at these sizes: windows shorter
# than the test sequences, several RoPE bases, caps small enough to change the scores.
_IDS = {"pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 3}


def _family_specs() -> dict[str, tuple[type, type, dict]]:
    import transformers as tf

    def _tf(name: str) -> type | None:  # None: a family this transformers release does not have
        return getattr(tf, name, None)

    moe = {"head_dim": 8, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
    return {
        "qwen3-yarn": (
            Qwen3Config,
            Qwen3ForCausalLM,
            {
                "head_dim": 8,
                "rope_parameters": {
                    "rope_type": "yarn",
                    "factor": 4.0,
                    "original_max_position_embeddings": 64,
                    "rope_theta": 10000.0,
                },
            },
        ),
        "qwen3_moe": (_tf("Qwen3MoeConfig"), _tf("Qwen3MoeForCausalLM"), moe),
        "olmo2": (_tf("Olmo2Config"), _tf("Olmo2ForCausalLM"), {}),
        # NoPE on every second layer, the RoPE layers sliding.
        "smollm3": (
            _tf("SmolLM3Config"),
            _tf("SmolLM3ForCausalLM"),
            {"no_rope_layer_interval": 2, "use_sliding_window": True, "sliding_window": SLIDING_WINDOW},
        ),
        # Sliding and global layers, two RoPE bases, linear scaling on the global layers.
        "gemma3": (
            _tf("Gemma3TextConfig"),
            _tf("Gemma3ForCausalLM"),
            {
                "head_dim": 8,
                "sliding_window": SLIDING_WINDOW,
                "layer_types": ["sliding_attention", "full_attention"],
                "rope_parameters": {
                    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                    "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                },
            },
        ),
        # Final-logit and attention soft-capping, with caps that bite at these scales.
        "gemma2": (
            _tf("Gemma2Config"),
            _tf("Gemma2ForCausalLM"),
            {
                "head_dim": 8,
                "sliding_window": SLIDING_WINDOW,
                "final_logit_softcapping": 2.0,
                "attn_logit_softcapping": 1.0,
                # transformers 5.17 builds Gemma2 with sdpa, which drops the attention soft-cap (the probe then
                # rightly sends it to the universal path); eager is the attention the config defines.
                "attn_implementation": "eager",
            },
        ),
        # Long factors beyond 24 positions: the test batches hold sequences on both sides.
        "phi3-longrope": (
            _tf("Phi3Config"),
            _tf("Phi3ForCausalLM"),
            {
                "original_max_position_embeddings": LONGROPE_ORIGINAL,
                "rope_parameters": {
                    "rope_type": "longrope",
                    "short_factor": [1.0, 1.5, 2.0, 2.5],
                    "long_factor": [3.0, 5.0, 7.0, 9.0],
                    "original_max_position_embeddings": LONGROPE_ORIGINAL,
                    "rope_theta": 10000.0,
                },
            },
        ),
        "llama-dynamic": (
            LlamaConfig,
            LlamaForCausalLM,
            {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}},
        ),
        "granite": (_tf("GraniteConfig"), _tf("GraniteForCausalLM"), {"logits_scaling": 4.0}),  # divides the logits
        "hyperclovax": (_tf("HyperCLOVAXConfig"), _tf("HyperCLOVAXForCausalLM"), {"logits_scaling": 3.0}),  # multiplies
        "cohere": (
            _tf("CohereConfig"),
            _tf("CohereForCausalLM"),
            {"logit_scale": 3.0},
        ),  # parallel blocks, logits scaled
        "mixtral": (
            _tf("MixtralConfig"),
            _tf("MixtralForCausalLM"),
            {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": SLIDING_WINDOW},
        ),
        "qwen2_moe": (
            _tf("Qwen2MoeConfig"),
            _tf("Qwen2MoeForCausalLM"),
            {**moe, "shared_expert_intermediate_size": 16},
        ),
        "gemma": (_tf("GemmaConfig"), _tf("GemmaForCausalLM"), {"head_dim": 8}),
        "phi": (_tf("PhiConfig"), _tf("PhiForCausalLM"), {}),  # partial rotary, LayerNorm, parallel blocks
        "glm4": (_tf("Glm4Config"), _tf("Glm4ForCausalLM"), {"head_dim": 8}),
        "olmo3": (_tf("Olmo3Config"), _tf("Olmo3ForCausalLM"), {"sliding_window": SLIDING_WINDOW}),
    }


LONGROPE_ORIGINAL = 24
FAMILIES = [*ARCHITECTURES, "qwen3-yarn", "qwen3_moe", "olmo2", "smollm3", "gpt2", "gemma3", "phi3-longrope",
            "llama-dynamic", "granite", "hyperclovax", "cohere", "gemma2", "mixtral", "qwen2_moe", "gemma", "phi",
            "glm4", "olmo3"]  # fmt: skip


def tiny_family_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised fp32 causal LM of family ``name`` (one of ``FAMILIES``), in eval mode."""
    if name in ARCHITECTURES:
        return tiny_model(name, seed, **overrides)
    torch.manual_seed(seed)
    if name == "gpt2":  # learned absolute positions, LayerNorm, biases everywhere
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=MODEL_VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
            initializer_range=0.3, tie_word_embeddings=False, **_IDS, **overrides,
        )  # fmt: skip
        return GPT2LMHeadModel(config).float().eval()
    config_cls, model_cls, extra = _family_specs()[name]
    if config_cls is None or model_cls is None:  # setup.py admits transformers releases from before the family
        import pytest
        import transformers

        pytest.skip(f"transformers {transformers.__version__} has no {name} family")
    config = config_cls(**{**_COMMON, **_IDS, **_rope_fields_for_release(extra), **overrides})
    return model_cls(config).float().eval()


def _rope_fields_for_release(fields: dict) -> dict:
    """`fields` with transformers 5's `rope_parameters` written as 4.x's `rope_theta` / `rope_scaling` (and Gemma 3's
    `rope_local_base_freq`) on a 4.x release, which would otherwise ignore them and build plain RoPE."""
    import transformers
    from packaging.version import Version

    if "rope_parameters" not in fields or Version(transformers.__version__).major >= 5:
        return fields
    fields = dict(fields)
    rope = dict(fields.pop("rope_parameters"))
    if "full_attention" in rope:  # per layer type (Gemma 3): the sliding layers' base is the local one
        fields["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
        rope = dict(rope["full_attention"])
    fields["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type") == "longrope":  # 4.x's Phi-3 wants exactly these three keys
        rope = {"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        fields["rope_scaling"] = rope
    return fields


def _base_tokenizer() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + list(string.printable))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per character
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer with a ChatML-style chat template (no BOS added to plain text)."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_base_tokenizer(), unk_token="<unk>", pad_token="<pad>", eos_token="<|im_end|>"
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def plain_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer without a chat template that adds ``<s>`` in front of every text."""
    tok = _base_tokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", SPECIAL_TOKENS.index("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


_FLOAT64_COPIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An eval-mode float64 copy of ``model``, made again whenever one of its parameters changed."""
    versions = tuple(p._version for p in model.parameters())
    cached = _FLOAT64_COPIES.get(model)
    if cached is None or cached[0] != versions:
        double = copy.deepcopy(model).double().eval()
        if getattr(double.config, "_experts_implementation", None) not in (None, "eager"):
            double.set_experts_implementation("eager")  # grouped-GEMM experts have no float64 kernel
        cached = (versions, double)
        _FLOAT64_COPIES[model] = cached
    return cached[1]


def naive_token_logprobs(
    model: torch.nn.Module, prefix: Sequence[int], completion: Sequence[int], temperature: float = 1.0
) -> torch.Tensor:
    """log p(completion_t | prefix, completion_<t) from one plain float64 forward of the model's weights:
    ``model(ids).logits`` and ``log_softmax``, the way the paper scores a sequence."""
    ids = torch.tensor([list(prefix) + list(completion)])
    with torch.no_grad():
        logits = float64_copy(model)(input_ids=ids).logits[0] / temperature
    logp = torch.log_softmax(logits, dim=-1)
    p = len(prefix)
    rows = logp[p - 1 : p - 1 + len(completion)]
    return rows.gather(-1, torch.tensor(list(completion)).unsqueeze(-1)).squeeze(-1)


def naive_perplexity(
    model: torch.nn.Module, prefix: Sequence[int], completion: Sequence[int], temperature: float = 1.0
) -> float:
    return math.exp(-naive_token_logprobs(model, prefix, completion, temperature).mean().item())


FP32_UNIT_ROUNDOFF = 2.0**-24


def _final_norm(decoder: torch.nn.Module) -> torch.nn.Module:
    for name in ("norm", "ln_f", "final_layernorm", "norm_f", "final_norm"):
        if isinstance(getattr(decoder, name, None), torch.nn.Module):
            return getattr(decoder, name)
    return [m for m in decoder.modules() if "Norm" in type(m).__name__][-1]  # the last norm the stack applies


def logit_bound(model: torch.nn.Module) -> float:
    """An upper bound on |logit| for any input, from the weights alone: the final norm's output ``gamma * xhat +
    beta`` (RMSNorm or LayerNorm, ``||xhat|| <= sqrt(D)``) has norm at most sqrt(D) * max|gamma| + ||beta||, so by
    Cauchy-Schwarz |z_v| <= that * max_v ||w_v|| (+ |bias|). The effective ``gamma`` and ``beta`` are read off the
    norm itself (some families scale by ``1 + weight``): for a zero-mean, unit-RMS ``x``, ``norm(x) = gamma x +
    beta`` and ``norm(-x) = -gamma x + beta``. Logit scaling and a final soft-cap only shrink it."""
    norm = _final_norm(model.get_decoder())
    width = next(p for p in norm.parameters()).shape[-1]
    x = torch.ones(width, dtype=torch.float64)
    x[1::2] = -1
    if width % 2:
        x[-1] = 0  # keeps the mean at zero; RMS slightly below 1 only makes the read gamma larger
    double = copy.deepcopy(norm).double()
    with torch.no_grad():
        plus, minus = double(x[None])[0], double(-x[None])[0]
    gamma = ((plus - minus) / 2).abs()[x != 0].max().item() / x.abs().max().item()
    beta = ((plus + minus) / 2).norm().item()
    head = model.get_output_embeddings()
    bound = (math.sqrt(width) * gamma + beta) * head.weight.norm(dim=1).max().item()
    if getattr(head, "bias", None) is not None:
        bound += head.bias.abs().max().item()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return bound if cap is None else min(bound, cap)


def fp32_nll_tolerance(model: torch.nn.Module, max_len: int, temperature: float = 1.0) -> float:
    """How far an fp32 forward's mean NLL of a sequence of at most ``max_len`` tokens may be from the exact one.

    First-order rounding model: the forward is a chain of 3L + 1 stages (per layer attention, MLP and norm, then the
    LM head), each output a sum of at most n terms (n = the widest of hidden size, MLP width, head size and sequence
    length). A sum of n fp32 terms is off by at most n * u of its terms' scale (u = 2^-24; Higham, *Accuracy and
    Stability of Numerical Algorithms*, section 3.1); measured against the logits' scale (``logit_bound``) the errors
    add along the residual stream, and a log-prob ``z_t - logsumexp(z)`` moves by at most twice the largest logit
    error. The mean of per-token errors is bounded by their maximum, and to first order the same number bounds the
    relative error of a perplexity (the exp of the mean). Two fp32 results (say whole and split passes, which sum in
    different orders) may differ by twice this.
    """
    from sarkern.model_support import config_value

    config = model.config
    mlp = config_value(config, "intermediate_size") or 4 * config.hidden_size  # GPT-2: n_inner or 4 D
    widest = max(config.hidden_size, mlp, config_value(config, "head_dim") or 0, max_len)
    for module in model.modules():  # the widest sum in any projection (expert, latent, mixer widths)
        if isinstance(module, torch.nn.Linear):
            widest = max(widest, module.in_features)
    stages = 3 * config.num_hidden_layers + 1
    return 2 * stages * widest * FP32_UNIT_ROUNDOFF * logit_bound(model) / temperature


def random_ids(generator: torch.Generator, length: int, low: int = 6, high: int = TOKENIZER_VOCAB) -> list[int]:
    return torch.randint(low, high, (length,), generator=generator).tolist()
