"""The bundled tiny model: character-level tokenizer, chat template, checkpoint and accuracy."""

from __future__ import annotations

import json
import string
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from sarkern.tasks import Verbosity, generate_problems, make_prompt
from sarkern.tiny import TINY_MODEL_DIR, load_tiny_model
from sarkern.tiny.build import BuildConfig, build, encode_examples, make_batches, make_model
from sarkern.tiny.evaluate import evaluate_accuracy
from sarkern.tiny.tokenizer import (
    IM_END_TOKEN,
    IM_START_TOKEN,
    SPECIAL_TOKENS,
    build_tokenizer,
    byte_symbols,
    portable_tokenizer_config,
    save_tokenizer,
    stop_token_ids,
)

PRINTABLE = string.printable  # ASCII letters, digits, punctuation and whitespace
SAMPLE_TEXTS = [
    "tom has 3 boxes of 12 pens. he gives away 7. how many pens does he have now?",
    "3*12=36. so tom has 36 pens. 36-7=29. so tom has 29 pens. let me check: 3*12=36. 36-7=29. yes. answer: 29",
    "  Leading spaces, CAPS, tabs\tand\r\nnewlines\n\n it's 'quoted' ",
    "non-ascii: é, €, 数学, 🙂",
]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def bundled():
    torch.set_num_threads(1)
    return load_tiny_model()


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------------------


def test_one_token_per_character(tokenizer):
    text = "tom has 3 boxes of 12 pens.\nanswer: 29"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert len(set(ids)) == len(set(text))
    assert len(tokenizer) == len(SPECIAL_TOKENS) + 256
    assert len(set(byte_symbols())) == 256


# Special-token strings (`<|im_end|>`, ...) are meant to become one token; plain text is what goes byte by byte.
_SPECIAL_STRINGS = tuple(build_tokenizer().get_added_vocab())
_PLAIN = st.text(alphabet=PRINTABLE, max_size=200).filter(lambda text: not any(s in text for s in _SPECIAL_STRINGS))


@settings(max_examples=100, deadline=None)
@given(_PLAIN)
def test_ascii_round_trip_one_token_per_character(text):
    tokenizer = build_tokenizer()
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=50).filter(lambda text: not any(special in text for special in _SPECIAL_STRINGS)))
def test_any_text_round_trips_byte_by_byte(text):
    tokenizer = build_tokenizer()
    normalized = unicodedata.normalize("NFC", text)  # the tokenizer normalises like Qwen's: NFC
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(normalized.encode("utf-8"))
    assert tokenizer.unk_token_id is None  # every byte has a token
    assert tokenizer.decode(ids) == normalized


def test_special_tokens(tokenizer):
    assert tokenizer.eos_token == IM_END_TOKEN
    assert tokenizer.bos_token is None
    assert tokenizer.pad_token_id not in stop_token_ids(tokenizer)
    ids = tokenizer(f"{IM_START_TOKEN}user\nhi{IM_END_TOKEN}")["input_ids"]
    assert ids[0] == tokenizer.convert_tokens_to_ids(IM_START_TOKEN)
    assert ids[-1] == tokenizer.eos_token_id
    assert len(ids) == 2 + len("user\nhi")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "answer: 2"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nbe brief.<|im_end|>\n"
        "<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\nanswer: 2<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tokenizer.apply_chat_template(messages[1:2], tokenize=False, add_generation_prompt=False)
    assert no_prompt == "<|im_start|>user\n1+1?<|im_end|>\n"
    # SAR's placeholder prompt: the same conversation with the user's content emptied.
    empty = tokenizer.apply_chat_template([{"role": "user", "content": ""}], tokenize=False, add_generation_prompt=True)
    assert empty == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"


def _assert_same_tokenizer(loaded, tokenizer):
    for text in SAMPLE_TEXTS:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"], text
        assert loaded.decode(loaded(text)["input_ids"]) == text
    messages = make_prompt("2+2?")
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )
    assert (loaded.pad_token, loaded.eos_token) == (tokenizer.pad_token, tokenizer.eos_token)
    assert loaded.bos_token is None


def test_saved_tokenizer_loads_with_auto_tokenizer(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    _assert_same_tokenizer(AutoTokenizer.from_pretrained(tmp_path), tokenizer)


def test_saved_tokenizer_loads_from_a_qwen2_model_directory(tokenizer, tmp_path):
    # With a qwen2 config.json next to it, transformers 5 rebuilds Qwen2Tokenizer from the vocabulary instead of
    # using tokenizer.json as is: the result must be the same tokenizer.
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _assert_same_tokenizer(AutoTokenizer.from_pretrained(tmp_path), tokenizer)


def test_saved_tokenizer_files_load_alike_on_transformers_4_and_5(tokenizer, tmp_path):
    """What the build writes (and the bundled model ships) is read the same by every transformers release setup.py
    admits: no class or key only one of them knows (transformers 5's own save names `TokenizersBackend`, which 4.x
    lacks). The suite runs under both (`make test-oldest`)."""
    save_tokenizer(tokenizer, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config == portable_tokenizer_config(tokenizer)
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "extra_special_tokens" not in config
    bundled = json.loads((TINY_MODEL_DIR / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert bundled == config
    for directory in (tmp_path, TINY_MODEL_DIR):
        loaded = AutoTokenizer.from_pretrained(directory)
        _assert_same_tokenizer(loaded, tokenizer)
        assert loaded("ab")["input_ids"] == tokenizer("ab")["input_ids"]
        assert set(loaded("ab")) == {"input_ids", "attention_mask"}  # no token type ids for `generate` to refuse
        assert loaded.padding_side == "left" and loaded.model_max_length == tokenizer.model_max_length


# ----------------------------------------------------------------------------------------------------------------------
# Build script pieces (cheap: no training)
# ----------------------------------------------------------------------------------------------------------------------


def test_training_examples_mask_the_prompt(tokenizer):
    import random

    config = BuildConfig(train_steps=1, batch_size=4)
    examples = encode_examples(config, tokenizer, 4, random.Random(0))
    problems = generate_problems(4, config.seed, split="train")
    for (ids, labels), problem in zip(examples, problems):
        assert len(ids) == len(labels)
        targets = [t for t in labels if t != -100]
        text = tokenizer.decode(targets)
        assert text.endswith(f"answer: {problem.answer}{IM_END_TOKEN}")
        assert text[: -len(IM_END_TOKEN)] in {problem.solution(v) for v in Verbosity}
        prompt = tokenizer.decode(ids[: len(ids) - len(targets)])
        assert prompt.endswith("<|im_start|>assistant\n") and problem.question in prompt
    batches = make_batches(examples, 2, tokenizer.pad_token_id, random.Random(0))
    assert sum(b["input_ids"].shape[0] for b in batches) == 4
    for batch in batches:
        padding = batch["attention_mask"] == 0
        assert (batch["labels"][padding] == -100).all()
        assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()


def test_fresh_model_is_a_tiny_qwen2(tokenizer):
    model = make_model(BuildConfig(), tokenizer)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def _tiny_build(out, seed):
    config = BuildConfig(
        seed=seed,
        out=str(out),
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        train_steps=3,
        batch_size=4,
        warmup_steps=1,
        eval_every=0,
        final_eval_problems=2,
        min_accuracy=0.0,
    )
    report = build(config)
    return report, load_file(str(out / "model.safetensors"))


def test_build_is_reproducible_from_the_seed(tmp_path):
    report, weights = _tiny_build(tmp_path / "a", seed=5)
    _, again = _tiny_build(tmp_path / "b", seed=5)
    _, other = _tiny_build(tmp_path / "c", seed=6)
    assert weights.keys() == again.keys() == other.keys()
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    assert not all(torch.equal(weights[k], other[k]) for k in weights)
    assert report["heldout_problems"] == 2
    assert json.loads((tmp_path / "a" / "build_report.json").read_text())["seed"] == 5
    # The output directory is a complete model directory.
    model, loaded_tokenizer = load_tiny_model(tmp_path / "a")
    assert model.config.hidden_size == 16
    assert loaded_tokenizer.chat_template is not None


def test_untrained_model_scores_near_zero(tokenizer):
    # The accuracy test below must be able to fail: random weights solve (almost) nothing.
    torch.manual_seed(0)
    model = make_model(BuildConfig(hidden_size=32, intermediate_size=64, num_layers=1), tokenizer)
    result = evaluate_accuracy(model, tokenizer, num_problems=16, max_new_tokens=24)
    assert result.num_problems == 16
    assert result.accuracy <= 0.25


# ----------------------------------------------------------------------------------------------------------------------
# Bundled checkpoint
# ----------------------------------------------------------------------------------------------------------------------


def test_checkpoint_files_are_shipped():
    names = {p.name for p in TINY_MODEL_DIR.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    total = sum(p.stat().st_size for p in TINY_MODEL_DIR.iterdir() if p.is_file())
    assert total < 8 * 2**20


def test_checkpoint_loads_with_auto_classes():
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    _assert_same_tokenizer(tokenizer, build_tokenizer())
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tokenizer)
    assert tokenizer.eos_token_id in (model.generation_config.eos_token_id or [])
    assert tokenizer.chat_template is not None
    with torch.inference_mode():
        ids = tokenizer.apply_chat_template(make_prompt("1+1?"), add_generation_prompt=True, return_tensors="pt")
        ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_load_tiny_model_rejects_a_directory_without_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_tiny_model(tmp_path)


def test_build_report_matches_checkpoint():
    report = json.loads((TINY_MODEL_DIR / "build_report.json").read_text())
    assert report["heldout_accuracy"] >= 0.6
    model_config = json.loads((TINY_MODEL_DIR / "config.json").read_text())
    assert model_config["hidden_size"] == report["config"]["hidden_size"]


def test_bundled_model_solves_a_majority_of_heldout_problems(bundled):
    model, tokenizer = bundled
    result = evaluate_accuracy(model, tokenizer, num_problems=50, seed=12345)
    assert result.num_problems == 50
    assert result.accuracy > 0.5, f"greedy accuracy {result.accuracy:.0%}; completions: {result.completions[:3]}"
    # It answers in the task's format and stops on its own.
    assert sum("answer:" in c for c in result.completions) >= 45
    assert result.mean_completion_tokens < 190


def test_bundled_model_samples_varied_lengths(bundled):
    # Sampled completions should differ in verbosity: the length a length-aware reward can remove.
    model, tokenizer = bundled
    torch.manual_seed(0)
    problems = generate_problems(4, seed=7, split="test")
    prompts = [make_prompt(p.question) for p in problems for _ in range(8)]
    batch = tokenizer.apply_chat_template(
        prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        output = model.generate(**batch, do_sample=True, temperature=1.0, max_new_tokens=200)
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    lengths = [len(t) for t in texts]
    assert max(lengths) - min(lengths) >= 50, lengths


def test_sampled_evaluation_is_seeded_and_leaves_the_callers_random_state(bundled):
    model, tokenizer = bundled
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = evaluate_accuracy(model, tokenizer, num_problems=6, num_samples=3, sampling_seed=5, max_new_tokens=120)
    assert torch.equal(torch.rand(3), expected_next)  # the evaluation drew from its own seeded generator state
    again = evaluate_accuracy(model, tokenizer, num_problems=6, num_samples=3, sampling_seed=5, max_new_tokens=120)
    assert first.num_problems == 18 and len(first.completions) == 18
    assert first.completions == again.completions
    assert len(set(first.completions)) > 6  # sampling at temperature 1 varies the completions
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_accuracy(model, tokenizer, num_problems=2, num_samples=-1)


def test_evaluation_counts_completions_cut_off_by_the_token_limit(bundled):
    model, tokenizer = bundled
    cut = evaluate_accuracy(model, tokenizer, num_problems=4, max_new_tokens=8)
    assert cut.num_truncated == 4 and cut.mean_completion_tokens == 8  # no answer fits in 8 tokens
    full = evaluate_accuracy(model, tokenizer, num_problems=4, max_new_tokens=200)
    lengths = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in full.completions]
    assert full.num_truncated == sum(length >= 200 for length in lengths) < 4
