"""SARScorer on every decoder family it is tested with (tiny random models) against naive per-sample forwards, and the
verification probe that decides what the scorer accepts: it refuses, naming the cause, what it cannot reproduce.

The families of ``tests/test_scorer.py`` (Llama, Qwen2, Qwen3, Mistral and sliding Qwen variants) are checked there;
this file covers the others: Qwen3 with YaRN, Qwen3-MoE, OLMo2, SmolLM3, GPT-2, Gemma3, Gemma2, Phi-3 longrope, Llama
with dynamic NTK RoPE and Granite.
"""

from __future__ import annotations

import re

import pytest
import torch
from scorer_models import (
    ARCHITECTURES,
    FAMILIES,
    naive_perplexity,
    random_ids,
    tiny_family_model,
    tiny_model,
)
from test_scorer import PLACEHOLDER, assert_ppl_close, assert_reward_close, mixed_batch, tolerance

from sarkern import verification
from sarkern.attention import ATTENTION_NAME, shared_prefix_attention
from sarkern.model_support import UnsupportedModelError
from sarkern.sar import sar_reward
from sarkern.scorer import SARScorer

OTHER_FAMILIES = [name for name in FAMILIES if name not in ARCHITECTURES]


@pytest.fixture(scope="module", params=OTHER_FAMILIES)
def family_model(request):
    return request.param, tiny_family_model(request.param)


def test_family_matches_naive_forwards_whole_and_split(family_model):
    name, model = family_model
    prompts, completions = mixed_batch(seed=21)
    cond = [naive_perplexity(model, p, c) for p, c in zip(prompts, completions)]
    uncond = [naive_perplexity(model, PLACEHOLDER, c) for c in completions]
    tol = tolerance(model, prompts, completions)
    for budget in (32768, 12):
        scores = SARScorer(model, placeholder_ids=PLACEHOLDER, max_tokens_per_pass=budget).score(prompts, completions)
        assert scores.scoring_path == "packed"  # proven on every one of these families
        assert_ppl_close(scores.ppl_cond, cond, tol)
        assert_ppl_close(scores.ppl_uncond, uncond, tol)
        assert_reward_close(scores.reward, sar_reward(torch.tensor(cond), torch.tensor(uncond)), tol)


def test_the_families_quirks_change_the_scores():
    """Guards the family tests: what the scorer must reproduce moves the scores far beyond the tolerance."""
    prompts, completions = mixed_batch(seed=21)
    far = lambda model: 10 * tolerance(model, prompts, completions)  # noqa: E731
    prompt, completion = prompts[5], completions[5]  # 9 + 16 tokens: past the window and the longrope threshold
    for name, plain_fields in [
        ("granite", {"logits_scaling": 1.0}),
        ("hyperclovax", {"logits_scaling": 1.0}),
        ("cohere", {"logit_scale": 1.0}),
        ("gemma2", {"final_logit_softcapping": None}),
        ("gemma2", {"attn_logit_softcapping": None}),
        ("gemma3", {"sliding_window": 64}),
        ("phi3-longrope", {"original_max_position_embeddings": 64}),
    ]:
        model = tiny_family_model(name)
        if name == "phi3-longrope":
            plain_fields = {"rope_parameters": {**model.config.rope_parameters, **plain_fields}, **plain_fields}
        plain = tiny_family_model(name, **plain_fields)
        delta = abs(naive_perplexity(model, prompt, completion) / naive_perplexity(plain, prompt, completion) - 1)
        assert delta > far(model), (name, plain_fields, delta)


def test_longrope_passes_hold_one_regime():
    """Sequences just below, at and just above ``original_max_position_embeddings``, alone and mixed, in passes of
    a small budget: each pass holds one regime, its largest position is its longest sequence's, and every pass stays
    within ``max_tokens_per_pass``."""
    model = tiny_family_model("phi3-longrope")
    g = torch.Generator().manual_seed(22)
    prompt = random_ids(g, 20)
    # Full lengths 23, 24 (short factors), 25 (long: its last position is 24, fed although it predicts nothing), 30.
    completions = [random_ids(g, n) for n in (3, 4, 5, 10)]
    prompts = [prompt] * len(completions)
    scorer = SARScorer(model, use_comparison=False, use_denominator=False, max_tokens_per_pass=24)
    scorer.verify()  # the first-use probe, before counting
    fed = []
    hook = model.get_decoder().register_forward_hook(
        lambda m, args, kwargs, out: fed.append(kwargs["position_ids"].max().item() + 1), with_kwargs=True
    )
    try:
        scores = scorer.score(prompts, completions)
        alone = scorer.score(prompts[2:3], completions[2:3])
    finally:
        hook.remove()
    cond = [naive_perplexity(model, p, c) for p, c in zip(prompts, completions)]
    tol = tolerance(model, prompts, completions)
    assert_ppl_close(scores.ppl_cond, cond, tol)
    assert_ppl_close(alone.ppl_cond, cond[2:3], tol)
    # Passes (RoPE length = largest position + 1): the short regime split by the budget (20 + 3, 20 + 4), then the
    # long one, each sequence alone since prefix + completion exceeds the budget; then the lone 25-token sequence,
    # whose last token is fed so that the model sees 25 positions, as in its own forward.
    assert fed == [23, 24, 25, 30, 25]


def test_split_passes_stay_within_the_budget():
    model = tiny_family_model("phi3-longrope")
    prompts, completions = mixed_batch(seed=23)
    rows = []
    hook = model.get_decoder().register_forward_hook(
        lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER, max_tokens_per_pass=30)
    scorer.verify()
    rows.clear()
    try:
        scorer.score(prompts, completions)
    finally:
        hook.remove()
    assert len(rows) > 2 and max(rows) <= 30  # no prefix + completion of this batch exceeds the budget alone


def test_logit_scaling_and_soft_caps_are_read_from_the_config():
    granite = SARScorer(tiny_family_model("granite"), placeholder_ids=PLACEHOLDER, temperature=0.5).resolve()
    assert granite.logit_transform.op_options(0.5) == {"temperature": 2.0}  # logits / 4 / 0.5
    hyperclovax = SARScorer(tiny_family_model("hyperclovax"), placeholder_ids=PLACEHOLDER).resolve()
    assert hyperclovax.logit_transform.op_options(1.5) == {"temperature": 0.5}  # the same field name, multiplied
    gemma2 = SARScorer(tiny_family_model("gemma2"), placeholder_ids=PLACEHOLDER).resolve()
    assert gemma2.logit_transform.op_options(1.0) == {"temperature": 1.0, "softcap": 2.0}


# --------------------------------------------------------------------------------------------------- verification


def test_probe_runs_once_per_model_and_config(monkeypatch):
    model = tiny_model("llama")
    probes = []
    real_probe = verification._probe_layout
    monkeypatch.setattr(verification, "_probe_layout", lambda *a: probes.append(1) or real_probe(*a))
    prompts, completions = mixed_batch(seed=24)
    SARScorer(model, placeholder_ids=PLACEHOLDER).score(prompts, completions)
    SARScorer(model, placeholder_ids=PLACEHOLDER, temperature=0.7).score(prompts, completions)
    assert len(probes) == 1  # a second scorer of the same model and config reuses the verdict
    model.config.rms_norm_eps = 1e-5  # a config change is a new model as far as the probe knows
    SARScorer(model, placeholder_ids=PLACEHOLDER).score(prompts, completions)
    assert len(probes) == 2
    SARScorer(tiny_model("llama"), placeholder_ids=PLACEHOLDER).score(prompts, completions)
    assert len(probes) == 3  # another model object
    longer = [c * 6 for c in completions]  # passes longer than the rows proven so far: probed again, at their length
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    scorer.score(prompts, longer)
    assert len(probes) == 4 and scorer.scoring_path == "packed"


def assert_universal_and_exact(scorer, prompts, completions, reason):
    """The scorer fell back to the universal path for ``reason`` (a regex), and its scores are still exact."""
    model = scorer.model
    scores = scorer.score(prompts, completions)
    assert scores.scoring_path == scorer.scoring_path == "universal", scorer.scoring_path_reason
    assert re.search(reason, scorer.scoring_path_reason), scorer.scoring_path_reason
    cond = [naive_perplexity(model, p, c) for p, c in zip(prompts, completions)]
    assert_ppl_close(scores.ppl_cond, cond, tolerance(model, prompts, completions))


def ignore_the_layout(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """A custom attention function that attends causally over the whole packed row, ignoring the layout."""
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=True, scale=scaling, enable_gqa=query.shape[1] != key.shape[1]
    )
    return out.transpose(1, 2), None


def test_a_model_whose_attention_ignores_the_layout_goes_universal(monkeypatch):
    from transformers import AttentionInterface

    model = tiny_model("qwen3")
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    monkeypatch.setitem(AttentionInterface._global_mapping, ATTENTION_NAME, ignore_the_layout)
    prompts, completions = mixed_batch(seed=25)
    assert_universal_and_exact(scorer, prompts, completions, "never called sarkern's shared-prefix attention")
    assert_universal_and_exact(scorer, prompts, completions, "never called")  # the verdict is cached
    with pytest.raises(UnsupportedModelError, match="the packed path is not proven: .* never called"):
        SARScorer(model, placeholder_ids=PLACEHOLDER, scoring_path="packed").score(prompts, completions)


def test_an_attention_that_drops_the_sliding_window_goes_universal(monkeypatch):
    """The shared-prefix attention runs, but the layers do not pass their window: the numbers differ."""
    from transformers import AttentionInterface

    def without_window(*args, sliding_window=None, **kwargs):
        return shared_prefix_attention(*args, **kwargs)

    model = tiny_model("mistral")
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    monkeypatch.setitem(AttentionInterface._global_mapping, ATTENTION_NAME, without_window)
    assert_universal_and_exact(scorer, *mixed_batch(seed=26), r"packed shared-prefix forward differs .* ran 2 times")


def test_a_hybrid_state_space_model_without_layer_types_is_caught_by_the_probe(monkeypatch):
    """Mamba layers carry a recurrent state along the row: in a packed row it would run from one sequence into the
    next. With the structural checks blinded (no layer types, not stateful), the probe still sees the difference."""
    import transformers as tf
    from scorer_models import _COMMON, _IDS

    config = tf.GraniteMoeHybridConfig(
        **{**_COMMON, **_IDS},
        layer_types=["mamba", "attention"],
        mamba_d_state=8,
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_chunk_size=8,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    torch.manual_seed(0)
    model = tf.GraniteMoeHybridForCausalLM(config).eval()
    structural = SARScorer(model, placeholder_ids=PLACEHOLDER)
    # Decided at construction, from the layer types.
    assert structural.scoring_path == "universal" and "linear_attention" in structural.scoring_path_reason
    monkeypatch.setattr(verification, "packed_path_obstacle", lambda *a: None)
    monkeypatch.setattr("sarkern.scorer.packed_path_obstacle", lambda *a: None)
    model.config.rms_norm_eps = 1.5e-6  # a new fingerprint: the verdict is made again, without the checks
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    assert scorer.scoring_path is None
    assert_universal_and_exact(scorer, *mixed_batch(seed=31), r"packed shared-prefix forward differs .* ran 1 times")


@pytest.mark.parametrize(
    "family, config_fields, reason",
    [
        # Attention sinks: found by the structural checks, at construction.
        ("GptOss", {"num_local_experts": 2, "num_experts_per_tok": 1, "head_dim": 8}, r"attention sinks"),
        # Attention layers that drop the backbone's keyword arguments: the layout never arrives.
        ("StableLm", {}, r"do not pass the backbone's keyword arguments on to the attention function"),
        # Falcon's own attention code for any implementation it does not know: fails without a mask.
        ("Falcon", {"new_decoder_architecture": True, "num_kv_heads": 2}, r"fails under .* \(TypeError"),
    ],
)
def test_families_the_packed_path_cannot_reproduce_go_universal_with_the_cause(family, config_fields, reason):
    import transformers as tf
    from scorer_models import _COMMON, _IDS

    config = getattr(tf, f"{family}Config")(**{**_COMMON, **_IDS, **config_fields})
    torch.manual_seed(0)
    model = getattr(tf, f"{family}ForCausalLM")(config).eval()
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    for _ in range(2):  # the second time from the cached verdict
        assert_universal_and_exact(scorer, *mixed_batch(seed=32), reason)


def test_an_unknown_logit_transform_is_refused():
    from transformers import LlamaForCausalLM

    class ScaledLogits(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0
            return out

    source = tiny_model("llama")
    model = ScaledLogits(source.config).eval()
    model.load_state_dict(source.state_dict())
    with pytest.raises(UnsupportedModelError, match="ScaledLogits's logits are not what SARScorer computes"):
        SARScorer(model, placeholder_ids=PLACEHOLDER).score(*mixed_batch(seed=27))


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"logits_scaling": 4.0}, r"config.logits_scaling=4.0, a logit scaling SARScorer does not know"),
        ({"logit_scale": 0.5}, r"config.logit_scale=0.5"),
        ({"final_logit_softcapping": -1.0}, r"config.final_logit_softcapping=-1.0 must be a positive number"),
        ({"is_causal": False}, r"non-causal \(config.is_causal=False\)"),
    ],
)
def test_known_config_traps_are_refused_up_front_by_field(fields, message):
    model = tiny_model("llama")
    for field, value in fields.items():
        setattr(model.config, field, value)
    with pytest.raises(UnsupportedModelError, match=message):
        SARScorer(model, placeholder_ids=PLACEHOLDER)


def test_probe_floor_follows_the_precision():
    view = SARScorer(tiny_model("llama"), placeholder_ids=PLACEHOLDER).resolve()
    fp32 = verification.floor_for(view, torch.float32)
    bf16 = verification.floor_for(view, torch.bfloat16)
    assert 0 < 32 * fp32 < bf16  # 16-bit activations round at every stage


def test_bf16_model_is_verified_in_its_own_precision():
    model = tiny_model("qwen3").to(torch.bfloat16)
    prompts, completions = mixed_batch(seed=28)
    scores = SARScorer(model, placeholder_ids=PLACEHOLDER).score(prompts, completions)
    assert scores.valid.all() and torch.isfinite(scores.reward).all()


# ----------------------------------------------------------------------------------------------------------- PEFT


def test_peft_lora_model_matches_its_own_forwards():
    peft = pytest.importorskip("peft", reason="peft is an optional dependency")
    prompts, completions = mixed_batch(seed=29)
    base = tiny_model("llama")
    without = [naive_perplexity(base, p, c) for p, c in zip(prompts, completions)]
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(1)
    model = peft.get_peft_model(base, config).eval()  # random A and B: the adapters change every score
    scores = SARScorer(model, placeholder_ids=PLACEHOLDER).score(prompts, completions)
    cond = [naive_perplexity(model, p, c) for p, c in zip(prompts, completions)]
    tol = tolerance(base, prompts, completions)
    assert_ppl_close(scores.ppl_cond, cond, tol)
    assert_ppl_close(scores.ppl_uncond, [naive_perplexity(model, PLACEHOLDER, c) for c in completions], tol)
    assert (scores.ppl_cond.double().log() - torch.tensor(without).log()).abs().max() > 10 * tol


def test_config_changes_after_construction_are_followed():
    """What the scorer reads from the config (here Granite's logits_scaling) is read again, and verified again."""
    model = tiny_family_model("granite")
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    prompts, completions = mixed_batch(seed=30)
    scorer.score(prompts, completions)
    model.config.logits_scaling = 2.0
    rescaled = tiny_family_model("granite", logits_scaling=2.0)  # same weights, the new scaling
    scores = scorer.score(prompts, completions)
    expected = [naive_perplexity(rescaled, p, c) for p, c in zip(prompts, completions)]
    assert_ppl_close(scores.ppl_cond, expected, tolerance(rescaled, prompts, completions))
