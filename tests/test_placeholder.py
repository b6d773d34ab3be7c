"""The placeholder prompt: chat template with the user's content emptied, plain-text fallback, explicit ids."""

from __future__ import annotations

import shutil

import pytest
import torch
from scorer_models import CHATML_TEMPLATE, chat_tokenizer, naive_perplexity, plain_tokenizer, tiny_model

from sarkern.placeholder import (
    PAPER_SYSTEM_PROMPT,
    PLAIN_TEXT_PLACEHOLDER,
    PlaceholderError,
    PlaceholderPrompts,
    build_placeholder_ids,
    placeholder_conversation,
    plain_text_placeholder_ids,
    validate_token_ids,
)
from sarkern.sar import sar_reward
from sarkern.scorer import SARScorer, SelfAlignedReward


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
    prompts = PlaceholderPrompts(tokenizer, chat_template_kwargs={})
    assert prompts.default == build_placeholder_ids(tokenizer)
    assert prompts.for_prompt(system) == build_placeholder_ids(tokenizer, system_message="be brief")
    assert prompts.for_prompts([system, [{"role": "user", "content": "x"}]]) == [
        build_placeholder_ids(tokenizer, system_message="be brief"),
        prompts.default,
    ]
    paper = PlaceholderPrompts(tokenizer, preset="paper")
    assert tokenizer.decode(paper.default) == (
        f"<|im_start|>system\n{PAPER_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n"
    )
    assert paper.for_prompt(system) == paper.for_prompt(system[1:]) == paper.default  # the same for every prompt
    explicit = PlaceholderPrompts(None, placeholder_ids=[7, 8])
    assert explicit.for_prompt(system) == explicit.for_prompt("2+2?") == [7, 8]
    with pytest.raises(ValueError, match="placeholder preset must be one of"):
        PlaceholderPrompts(tokenizer, preset="empty")
    # The scorer's default placeholder follows the preset; explicit ids and a preset other than the default conflict.
    model = tiny_model("llama")
    assert SARScorer(model, tokenizer, placeholder="paper").placeholder_ids == paper.default
    with pytest.raises(ValueError, match="either placeholder_ids or placeholder='paper'"):
        SARScorer(model, tokenizer, placeholder="paper", placeholder_ids=[1])


# --------------------------------------------------------------------- issue 20: plain-text prompts, plain placeholders


def bos_chat_tokenizer():
    """A tokenizer with a chat template that adds <s> to plain text (as Llama's do)."""
    tokenizer = plain_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def test_a_plain_text_prompt_gets_the_tokenization_of_an_empty_text_never_the_chat_template():
    tokenizer = bos_chat_tokenizer()
    prompts = PlaceholderPrompts(tokenizer)
    bos = [tokenizer.bos_token_id]
    assert plain_text_placeholder_ids(tokenizer) == tokenizer("")["input_ids"] == bos
    conversation = [{"role": "user", "content": "2+2?"}]
    # A mixed batch: each prompt's placeholder is rendered the way that prompt is.
    assert prompts.for_prompts(["what is 2+2?", conversation]) == [bos, build_placeholder_ids(tokenizer)]
    assert PlaceholderPrompts(tokenizer, placeholder_ids=[7]).for_prompt("what is 2+2?") == [7]


def test_sar_of_a_plain_text_prompt_is_measured_after_the_plain_placeholder():
    model, tokenizer = tiny_model("llama"), bos_chat_tokenizer()
    reward = SelfAlignedReward(model, tokenizer)
    prompt, completion = "what is 2+2? ", tokenizer("4. four.", add_special_tokens=False)["input_ids"]
    got = reward(prompts=[prompt], completions=["4. four."], completion_ids=[completion])[0]
    cond = naive_perplexity(model, tokenizer(prompt)["input_ids"], completion)
    plain = sar_reward(cond, naive_perplexity(model, [tokenizer.bos_token_id], completion)).item()
    templated = sar_reward(cond, naive_perplexity(model, build_placeholder_ids(tokenizer), completion)).item()
    assert abs(plain - templated) > 0.05  # the two placeholders really give different SAR on this model
    assert got == pytest.approx(plain, abs=1e-4)


def test_no_plain_text_placeholder_when_the_tokenizer_adds_nothing():
    tokenizer = chat_tokenizer()  # adds no BOS: an empty text has no tokens
    with pytest.raises(PlaceholderError, match=r"tokenization of an empty text, which is empty .*\(placeholder_ids="):
        PlaceholderPrompts(tokenizer).for_prompt("what is 2+2?")
    # The paper preset has the official code's plain-text placeholder for plain-text prompts (issue 24), no BOS.
    bos = bos_chat_tokenizer()
    assert bos.decode(PlaceholderPrompts(bos, preset="paper").for_prompt("what is 2+2?")) == (
        f"System: {PAPER_SYSTEM_PROMPT}\nUser: \nAssistant: "
    )
    with pytest.raises(TypeError, match="a prompt must be text or a list of chat messages, got int"):
        PlaceholderPrompts(tokenizer).for_prompt(3)


# ------------------------------------------------------------- issue 21 item 7: a template that refuses the placeholder

EMPTY_USER_RAISES = (
    "{%- for m in messages %}{% if m['role'] == 'user' and not m['content'] %}"
    "{{ raise_exception('user messages must have content') }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
SYSTEM_REQUIRED = (
    "{%- if messages[0]['role'] != 'system' %}{{ raise_exception('a system message comes first') }}{% endif %}"
    + CHATML_TEMPLATE
)


def test_a_template_that_raises_on_the_placeholder_is_named_with_the_way_out():
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = EMPTY_USER_RAISES
    with pytest.raises(PlaceholderError) as info:
        PlaceholderPrompts(tokenizer)
    message = str(info.value)
    name = type(tokenizer).__name__  # TokenizersBackend on transformers 5, PreTrainedTokenizerFast on 4.x
    assert message.startswith(
        f"the chat template of {name} cannot render SAR's placeholder prompt (an empty user turn + the "
        "generation prompt): TemplateError: user messages must have content [placeholder preset 'template']; "
    )
    assert "placeholder_ids=" in message and "sar_placeholder_ids=" in message
    # The paper preset renders here: its fallback (the official code's) puts the system prompt in the user turn,
    # which is then not empty; so it is offered.
    assert "use --placeholder paper" in message
    assert tokenizer.decode(PlaceholderPrompts(tokenizer, preset="paper").default) == (
        f"<|im_start|>user\n{PAPER_SYSTEM_PROMPT}\n<|im_end|>\n<|im_start|>assistant\n"
    )
    # A template that only wants a system message: the paper preset renders, so it is offered.
    tokenizer.chat_template = SYSTEM_REQUIRED
    with pytest.raises(PlaceholderError, match=r"a system message comes first .* use --placeholder paper"):
        SARScorer(tiny_model("llama"), tokenizer)
    assert PlaceholderPrompts(tokenizer, preset="paper").default == build_placeholder_ids(
        tokenizer, system_message=PAPER_SYSTEM_PROMPT
    )


def test_sarkern_train_names_the_placeholder_a_template_refuses(tmp_path, capsys):
    pytest.importorskip("trl")
    from sarkern import cli
    from sarkern.tiny import TINY_MODEL_DIR

    model_dir = tmp_path / "model"
    shutil.copytree(TINY_MODEL_DIR, model_dir)
    (model_dir / "chat_template.jinja").write_text(EMPTY_USER_RAISES, encoding="utf-8")
    quick = ["--max-completion-length", "8", "--prompts-per-step", "2", "--num-generations", "2", "--num-problems", "8"]
    status = cli.main(["train", "--model", str(model_dir), "--output-dir", str(tmp_path / "out"), "--steps=1", *quick])
    # One line of its own among the progress bars that share stderr.
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "sarkern" in line]
    assert status != 0 and len(lines) == 1 and lines[0].startswith("sarkern train: error: "), lines
    err = lines[0]
    assert "cannot render SAR's placeholder prompt (an empty user turn + the generation prompt)" in err
    assert "user messages must have content" in err and "placeholder_ids=" in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()  # refused before step 1
