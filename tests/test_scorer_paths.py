"""The two scoring paths on the families GRPO users train now (``tests/family_zoo.py``): each takes the path it
must, says why, and equals float64 per-sample forwards within the fp32 bound, whole and in small passes. Also: the
universal path forced on a packed-path model, a custom attention function, row-index tricks the structural checks
cannot see, PEFT wrapping and resizing after the scorer was built, and the probe's own token budget."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from family_zoo import ZOO, zoo_model
from scorer_models import naive_perplexity, random_ids, tiny_model
from test_scorer import PLACEHOLDER, assert_ppl_close, assert_reward_close, mixed_batch, tolerance

from sarkern import verification
from sarkern.model_support import UnsupportedModelError
from sarkern.sar import sar_reward
from sarkern.scorer import SARScorer

README = Path(__file__).resolve().parents[1] / "README.md"


def small_batch(seed: int):
    """Two groups (siblings that both feed rows, one single-token completion), prompts past a 6-token window."""
    g = torch.Generator().manual_seed(seed)
    prompt_a, prompt_b = random_ids(g, 9), random_ids(g, 4)
    prompts = [prompt_a, prompt_a, prompt_a, prompt_b]
    completions = [random_ids(g, n) for n in (8, 5, 1, 9)]
    return prompts, completions


def assert_exact(model, scores, prompts, completions, placeholder=PLACEHOLDER):
    cond = [naive_perplexity(model, p, c) for p, c in zip(prompts, completions)]
    uncond = [naive_perplexity(model, placeholder, c) for c in completions]
    tol = tolerance(model, prompts, completions, placeholder=placeholder)
    assert_ppl_close(scores.ppl_cond, cond, tol)
    assert_ppl_close(scores.ppl_uncond, uncond, tol)
    assert_reward_close(scores.reward, sar_reward(torch.tensor(cond), torch.tensor(uncond)), tol)


@pytest.mark.parametrize("name", list(ZOO))
def test_family_takes_its_path_and_matches_per_sample_forwards(name):
    model = zoo_model(name)
    expected_path = ZOO[name][3]
    prompts, completions = small_batch(seed=41)
    for budget in (32768, 12):
        scorer = SARScorer(model, placeholder_ids=PLACEHOLDER, max_tokens_per_pass=budget)
        scores = scorer.score(prompts, completions)
        assert scores.scoring_path == scorer.scoring_path == expected_path, scorer.scoring_path_reason
        assert scorer.scoring_path_reason
        assert_exact(model, scores, prompts, completions)


def test_readme_families_table_is_the_zoo():
    """README's table of families and paths lists exactly what these tests check."""
    rows = re.findall(r"^\| `(\w+)` \| (packed|universal) \|", README.read_text(encoding="utf-8"), re.M)
    listed = dict(rows)
    for name, (*_, path, _why) in ZOO.items():
        assert listed.get(name) == path, (name, listed.get(name), path)


def test_the_universal_path_forced_equals_the_packed_path():
    model = tiny_model("qwen3-sliding")
    prompts, completions = mixed_batch(seed=42)
    packed = SARScorer(model, placeholder_ids=PLACEHOLDER).score(prompts, completions)
    universal = SARScorer(model, placeholder_ids=PLACEHOLDER, scoring_path="universal", max_tokens_per_pass=40)
    forced = universal.score(prompts, completions)
    assert (packed.scoring_path, forced.scoring_path) == ("packed", "universal")
    assert "asked for" in universal.scoring_path_reason
    assert_exact(model, forced, prompts, completions)
    tol = 2 * tolerance(model, prompts, completions)
    torch.testing.assert_close(forced.ppl_cond.double().log(), packed.ppl_cond.double().log(), rtol=0, atol=tol)


def test_packed_insists_and_refuses_by_name():
    with pytest.raises(UnsupportedModelError, match=r"packed path cannot score .*config\.layer_types"):
        SARScorer(zoo_model("qwen3_5"), placeholder_ids=PLACEHOLDER, scoring_path="packed")
    with pytest.raises(ValueError, match="scoring_path must be one of"):
        SARScorer(tiny_model("llama"), placeholder_ids=PLACEHOLDER, scoring_path="fast")


def test_a_custom_attention_function_keeps_the_models_own_forward(monkeypatch):
    """A local window the config does not know, registered through AttentionInterface: the packed path would
    replace it, so the universal path runs it."""
    from transformers import AttentionInterface

    def windowed(module, query, key, value, attention_mask, scaling=None, **kwargs):
        """Causal attention over the last 4 keys (right padding comes after every real query: never seen)."""
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        t = query.shape[2]
        distance = torch.arange(t)[:, None] - torch.arange(t)[None, :]
        allowed = ((distance >= 0) & (distance < 4)).to(query.device)
        scores = (query @ key.transpose(-1, -2)) * scaling
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        return (probs @ value).transpose(1, 2).contiguous(), None

    monkeypatch.setitem(AttentionInterface._global_mapping, "local_window", windowed)
    model = tiny_model("qwen3")
    model.config._attn_implementation = "local_window"
    plain = tiny_model("qwen3")
    prompts, completions = small_batch(seed=43)
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    assert scorer.scoring_path == "universal" and "registered outside transformers" in scorer.scoring_path_reason
    scores = scorer.score(prompts, completions)
    assert_exact(model, scores, prompts, completions)
    moved = naive_perplexity(model, prompts[0], completions[0]) / naive_perplexity(plain, prompts[0], completions[0])
    assert abs(moved - 1) > 10 * tolerance(model, prompts, completions)  # the window changes the scores


def test_the_probe_sees_a_row_index_trick_at_the_longest_row(monkeypatch):
    """Llama 4's temperature tuning reads the row index; with the structural check blinded, the probe (compared
    sequences at the end of a row as long as the passes) still refuses the packed path, and the scores are exact."""
    monkeypatch.setattr(verification, "packed_path_obstacle", lambda *a: None)
    monkeypatch.setattr("sarkern.scorer.packed_path_obstacle", lambda *a: None)
    model = zoo_model("llama4_temperature")
    prompts, completions = small_batch(seed=44)
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    scores = scorer.score(prompts, completions)
    assert scores.scoring_path == "universal"
    assert re.search(r"differs from per-sample forwards .* in a 64-row pass", scorer.scoring_path_reason)
    assert_exact(model, scores, prompts, completions)


def test_the_probe_and_the_passes_stay_within_the_token_budget():
    model = tiny_model("mistral")  # a 6-token window: the probe's sequences run past it
    rows = []
    hooks = [
        model.get_decoder().register_forward_hook(
            lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].numel()), with_kwargs=True
        ),
    ]
    prompts, completions = small_batch(seed=45)
    try:
        scores = SARScorer(model, placeholder_ids=PLACEHOLDER, max_tokens_per_pass=20).score(prompts, completions)
    finally:
        for hook in hooks:
            hook.remove()
    assert scores.scoring_path == "packed"
    # The probe's per-sample, batched and packed forwards included (no pair of this batch exceeds 20 tokens alone).
    assert len(rows) > 4 and max(rows) <= 20, rows


def test_peft_wrapping_after_the_scorer_was_built_is_followed():
    peft = pytest.importorskip("peft", reason="peft is an optional dependency")
    prompts, completions = small_batch(seed=46)
    for config in (
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], modules_to_save=["lm_head"]),
    ):
        base = tiny_model("llama")
        scorer = SARScorer(base, placeholder_ids=PLACEHOLDER)
        before = scorer.score(prompts, completions)
        torch.manual_seed(1)
        wrapped = peft.get_peft_model(base, config).eval()  # in place, as GRPOTrainer(peft_config=...) does
        if config.modules_to_save:
            head = wrapped.base_model.model.lm_head.modules_to_save["default"]
            torch.nn.init.normal_(head.weight, std=0.3)  # the trained copy differs from the original head
        scores = scorer.score(prompts, completions)
        assert_exact(wrapped, scores, prompts, completions)
        assert (scores.ppl_cond.log() - before.ppl_cond.log()).abs().max() > 10 * tolerance(base, prompts, completions)


def test_resized_embeddings_are_followed():
    model = tiny_model("llama")
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    prompts, completions = small_batch(seed=47)
    scorer.score(prompts, completions)
    model.resize_token_embeddings(model.config.vocab_size + 8)
    completions[0] = completions[0] + [model.config.vocab_size - 1]  # a new token
    scores = scorer.score(prompts, completions)
    assert scorer.vocab_size == model.config.vocab_size
    assert_exact(model, scores, prompts, completions)


def test_bf16_at_real_width_the_probe_accepts_the_clean_model_and_catches_a_position_bug(monkeypatch):
    """Qwen3-1.7B's width (hidden 2048, MLP 6144, 16 heads of 128, 8 KV heads), 2 layers, bf16: the calibrated
    probe accepts the packed path, and refuses it when completions' positions restart at 0 (sent to the universal
    path, whose scores agree with the clean packed ones)."""
    import dataclasses

    from transformers import Qwen3Config, Qwen3ForCausalLM

    from sarkern import packing

    config = Qwen3Config(
        vocab_size=512, hidden_size=2048, intermediate_size=6144, num_hidden_layers=2, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(48)
    prompt_a, prompt_b = random_ids(g, 20, 0, 512), random_ids(g, 12, 0, 512)
    prompts = [prompt_a] * 3 + [prompt_b]
    completions = [random_ids(g, n, 0, 512) for n in (30, 24, 1, 28)]
    placeholder = random_ids(g, 10, 0, 512)
    clean = SARScorer(model, placeholder_ids=placeholder)
    clean_scores = clean.score(prompts, completions)
    assert clean_scores.scoring_path == "packed", clean.scoring_path_reason

    real_build_pass = packing.build_pass

    def positions_restart_at_zero(pairs, prefixes, completions, backend, *, feed_last=False):
        pack = real_build_pass(pairs, prefixes, completions, backend, feed_last=feed_last)
        positions = pack.position_ids.clone()
        for segment in pack.layout.segments:
            rows = slice(segment.query_start, segment.query_start + segment.query_len)
            positions[0, rows] -= segment.prefix_len
        return dataclasses.replace(pack, position_ids=positions)

    monkeypatch.setattr(verification, "build_pass", positions_restart_at_zero)
    monkeypatch.setattr("sarkern.scorer.build_pass", positions_restart_at_zero)
    model.config.rms_norm_eps = 1.1e-6  # a new fingerprint: proven again, with the bug
    buggy = SARScorer(model, placeholder_ids=placeholder)
    scores = buggy.score(prompts, completions)
    assert scores.scoring_path == "universal"
    assert re.search(r"differs from per-sample forwards by .* in bfloat16", buggy.scoring_path_reason)
    floor = verification.FLOORS[torch.bfloat16]
    torch.testing.assert_close(scores.ppl_cond.log(), clean_scores.ppl_cond.log(), rtol=0, atol=floor)


def test_universal_batches_bound_tokens_and_padding_and_keep_regimes_apart():
    from sarkern.packing import Pair
    from sarkern.universal import MAX_PADDING, PADDING_SLACK, build_batch, plan_batches

    g = torch.Generator().manual_seed(49)
    prefixes = [torch.zeros(n, dtype=torch.long) for n in (12, 3)]
    completions = [torch.zeros(n, dtype=torch.long) for n in torch.randint(1, 97, (64,), generator=g).tolist()]
    pairs = [Pair(j % 2, j) for j in range(64)]
    regime = lambda length: length > 60  # noqa: E731 - two regimes, as longrope's threshold makes
    for budget in (32768, 300, 50):
        plan = plan_batches(pairs, prefixes, completions, budget, regime=regime, feed_last=True)
        assert sorted(j for members in plan for j in members) == list(range(64))
        for members in plan:
            batch = build_batch([pairs[j] for j in members], prefixes, completions, feed_last=True)
            lengths = [len(prefixes[pairs[j].prefix]) + len(completions[pairs[j].completion]) for j in members]
            width = batch.input_ids.shape[1]
            assert width == max(lengths) and (len(members) == 1 or batch.tokens <= budget)
            assert all(width - n <= max(PADDING_SLACK, MAX_PADDING * width) for n in lengths)
            assert len({regime(n) for n in lengths}) == 1
