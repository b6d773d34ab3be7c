"""The placeholder prompt: chat template with the user's content emptied, plain-text fallback, explicit ids."""

from __future__ import annotations

import pytest
import torch
from scorer_models import chat_tokenizer, plain_tokenizer, tiny_model

from sarkern.placeholder import (
    PAPER_SYSTEM_PROMPT,
    PLAIN_TEXT_PLACEHOLDER,
    PlaceholderPrompts,
    build_placeholder_ids,
    placeholder_conversation,
    validate_token_ids,
)
from sarkern.scorer import SARScorer


def test_chat_template_with_empty_user_content_and_generation_prompt():
    tokenizer = chat_tokenizer()
    ids = build_placeholder_ids(tokenizer)
    assert tokenizer.decode(ids) == "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    # Exactly what the template gives for that conversation.
    expected = tokenizer.apply_chat_template(
        [{"role": "user", "content": ""}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert ids == list(expected)


def test_system_message_stays_and_everything_else_goes():
    tokenizer = chat_tokenizer()
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
    ]
    ids = build_placeholder_ids(tokenizer, conversation)
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    )
    assert build_placeholder_ids(tokenizer, system_message="be brief") == ids
    assert placeholder_conversation(conversation) == [conversation[0], {"role": "user", "content": ""}]


def test_content_parts_stay_parts():
    conversation = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert placeholder_conversation(conversation) == [{"role": "user", "content": [{"type": "text", "text": ""}]}]
    tokenizer = chat_tokenizer()
    assert build_placeholder_ids(tokenizer, conversation) == build_placeholder_ids(tokenizer)


def test_chat_template_kwargs_reach_the_template():
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = "{{ 'T' if think else 'F' }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert tokenizer.decode(build_placeholder_ids(tokenizer, chat_template_kwargs={"think": True})) == "T"
    assert tokenizer.decode(build_placeholder_ids(tokenizer, chat_template_kwargs={"think": False})) == "F"


def test_plain_text_fallback_without_chat_template():
    tokenizer = plain_tokenizer()
    ids = build_placeholder_ids(tokenizer)
    assert ids == tokenizer(PLAIN_TEXT_PLACEHOLDER)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids[0]) == "<s>"  # the tokenizer's usual special tokens are added
    assert tokenizer.decode(ids, skip_special_tokens=True) == "User: \nAssistant: "
    with_system = build_placeholder_ids(tokenizer, system_message="be brief")
    assert tokenizer.decode(with_system, skip_special_tokens=True) == "System: be brief\nUser: \nAssistant: "
    # The fallback can also be forced on a tokenizer that has a template.
    assert (
        build_placeholder_ids(chat_tokenizer(), use_chat_template=False)
        == chat_tokenizer()(PLAIN_TEXT_PLACEHOLDER)["input_ids"]
    )


def test_errors():
    with pytest.raises(ValueError, match="has no chat template"):
        build_placeholder_ids(plain_tokenizer(), use_chat_template=True)
    with pytest.raises(ValueError, match="either conversation or system_message"):
        build_placeholder_ids(chat_tokenizer(), [{"role": "user", "content": "x"}], system_message="s")
    with pytest.raises(ValueError, match="role"):
        placeholder_conversation(["not a message"])
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # renders nothing here
    with pytest.raises(ValueError, match="placeholder prompt is empty"):
        build_placeholder_ids(tokenizer)


def test_explicit_override_by_ids():
    model = tiny_model("llama")
    scorer = SARScorer(model, chat_tokenizer(), placeholder_ids=torch.tensor([7, 8, 9]))
    assert scorer.placeholder_ids == [7, 8, 9]
    assert SARScorer(model, None, placeholder_ids=[5]).placeholder_ids == [5]
    with pytest.raises(ValueError, match="placeholder_ids is empty"):
        SARScorer(model, None, placeholder_ids=[])


def test_validate_token_ids():
    assert validate_token_ids(torch.tensor([1, 2]), name="x", vocab_size=3) == [1, 2]
    with pytest.raises(ValueError, match="x holds token id 3, outside the model's vocabulary \\[0, 3\\)"):
        validate_token_ids([1, 3], name="x", vocab_size=3)
    with pytest.raises(TypeError, match="integer token ids"):
        validate_token_ids([1.0], name="x")
    with pytest.raises(TypeError, match="integer token ids"):
        validate_token_ids([True], name="x")
    with pytest.raises(ValueError, match="1-D"):
        validate_token_ids(torch.zeros(2, 2, dtype=torch.long), name="x")
    with pytest.raises(TypeError, match="sequence of integer token ids"):
        validate_token_ids("abc", name="x")


def test_placeholder_prompts_per_prompt_and_presets():
    tokenizer = chat_tokenizer()
    system = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    plain = "User: 2+2?\nAssistant: "
    prompts = PlaceholderPrompts(tokenizer, chat_template_kwargs={})
    assert prompts.for_prompt(plain) == prompts.default == build_placeholder_ids(tokenizer)  # plain text: as before
    assert prompts.for_prompt(system) == build_placeholder_ids(tokenizer, system_message="be brief")
    assert prompts.for_prompts([system, [{"role": "user", "content": "x"}]]) == [
        build_placeholder_ids(tokenizer, system_message="be brief"),
        prompts.default,
    ]
    paper = PlaceholderPrompts(tokenizer, preset="paper")
    assert tokenizer.decode(paper.default) == (
        f"<|im_start|>system\n{PAPER_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    )
    assert paper.for_prompt(system) == paper.for_prompt(plain) == paper.default  # the same for every prompt
    explicit = PlaceholderPrompts(None, placeholder_ids=[7, 8])
    assert explicit.for_prompt(system) == [7, 8]
    with pytest.raises(ValueError, match="placeholder preset must be one of"):
        PlaceholderPrompts(tokenizer, preset="empty")
    # The scorer's default placeholder follows the preset; explicit ids and a preset other than the default conflict.
    model = tiny_model("llama")
    assert SARScorer(model, tokenizer, placeholder="paper").placeholder_ids == paper.default
    with pytest.raises(ValueError, match="either placeholder_ids or placeholder='paper'"):
        SARScorer(model, tokenizer, placeholder="paper", placeholder_ids=[1])
