"""Issue 24: ``placeholder="paper"`` against an independent re-implementation of the official SAR computation
(tests/official_sar.py), on the bundled model and on a tiny random Qwen3 with a chat template of Qwen3's structure;
the official prompt construction for templates without a system role and for tokenizers without a chat template."""

from __future__ import annotations

import pytest
import torch
from official_sar import (
    SYS_PROMPT,
    official_placeholder_ids,
    official_prompt_ids,
    official_reward,
    official_sar,
    response_mask,
)
from scorer_models import TOKENIZER_VOCAB, chat_tokenizer, fp32_nll_tolerance, plain_tokenizer, tiny_model

from sarkern.placeholder import (
    PAPER_SYSTEM_PROMPT,
    PlaceholderPrompts,
    paper_conversation,
    paper_placeholder_ids,
    paper_prompt,
    paper_prompt_ids,
)
from sarkern.sar import sar_reward
from sarkern.scorer import SARScorer

# The structure of Qwen3's chat template (tokenizer_config.json of the Qwen3 checkpoints), tools left out: the first
# system message alone, user turns, assistant turns with their reasoning after the last query, the generation prompt
# and the empty think block of enable_thinking=False.
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}"
    "{%- set index = (messages|length - 1) - loop.index0 %}"
    "{%- if ns.multi_step_tool and message.role == 'user' and message.content is string and not("
    "message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- if message.content is string %}{%- set content = message.content %}{%- else %}{%- set content = '' %}"
    "{%- endif %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning_content = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n'"
    " + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Gemma's way: a system turn raises.
NO_SYSTEM_ROLE = (
    "{%- for m in messages %}{%- if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{%- endif %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] + '<end_of_turn>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)
# A template that renders system turns as nothing.
DROPS_SYSTEM = (
    "{%- for m in messages %}{%- if m['role'] != 'system' %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def qwen3_tokenizer():
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def bundled():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sarkern.tiny import TINY_MODEL_DIR

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, local_files_only=True).float().eval()
    return model, AutoTokenizer.from_pretrained(TINY_MODEL_DIR, local_files_only=True)


def trl_prompt_ids(tokenizer, prompt) -> list[int]:
    """The ids TRL's GRPOTrainer generates from: the chat template tokenized for a conversation, the tokenizer for
    text (the paper preset refuses plain text whose tokenizer adds special tokens, so both agree there)."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"])
    ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def responses_with_tokens_after_eos(generator, batch: int, width: int, eos: int, pad: int, low: int, high: int,
                                    avoid: list[int]):  # fmt: skip
    """[batch, width] right-padded responses: random tokens, an EOS, more tokens after it (inside the mask), pads.
    Row 0 has no EOS: a completion truncated at the width, as generation leaves it. Returns the ids and the 0/1 mask
    of the non-pad tokens."""
    ids = torch.full((batch, width), pad, dtype=torch.long)
    mask = torch.zeros((batch, width), dtype=torch.long)
    for row in range(batch):
        length = width if row == 0 else int(torch.randint(width // 2, width + 1, (1,), generator=generator))
        tokens = torch.randint(low, high, (length,), generator=generator)
        for bad in avoid:
            tokens[tokens == bad] = low + (bad + 1 - low) % (high - low)
        if row > 0:
            tokens[int(torch.randint(1, length - 2, (1,), generator=generator))] = eos  # tokens follow it
        ids[row, :length], mask[row, :length] = tokens, 1
    return ids, mask


CASES = {
    # name: (model + tokenizer, questions, token range of the random responses)
    "bundled": (bundled, ["tom has 3 boxes of 8 pens. he gives away 7. how many pens does he have now?", "2+2?"],
                (10, 200)),
    "qwen3": (lambda: (tiny_model("qwen3"), qwen3_tokenizer()), ["what is 6*7?", "name a prime number."],
              (6, TOKENIZER_VOCAB)),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_paper_preset_equals_the_official_computation(case):
    build, questions, (low, high) = CASES[case]
    model, tokenizer = build()
    scorer_eos = SARScorer(model, tokenizer, placeholder="paper").eos_token_ids
    # The prompts and the placeholder are the official ones, id for id, on both halves.
    real = [paper_prompt(tokenizer, q) for q in questions]
    prompt_ids = [trl_prompt_ids(tokenizer, p) for p in real]
    assert prompt_ids == [official_prompt_ids(tokenizer, q) for q in questions]
    assert paper_placeholder_ids(tokenizer) == official_placeholder_ids(tokenizer)
    for ids in [*prompt_ids, paper_placeholder_ids(tokenizer)]:
        assert SYS_PROMPT in tokenizer.decode(ids)

    generator = torch.Generator().manual_seed(0)
    pad = tokenizer.pad_token_id
    responses, mask = responses_with_tokens_after_eos(
        generator, 2 * len(questions), 24, tokenizer.eos_token_id, pad, low, high, avoid=[*scorer_eos, pad]
    )
    prompts = [prompt_ids[i % len(questions)] for i in range(len(responses))]
    for temperature in (1.0, 0.7):
        scorer = SARScorer(model, tokenizer, placeholder="paper", temperature=temperature)
        got = scorer.score(prompts, responses, completion_mask=mask)
        want = official_sar(
            model, tokenizer, [questions[i % len(questions)] for i in range(len(responses))], responses, scorer_eos,
            temperature=temperature,
        )  # fmt: skip
        assert scorer.placeholder_ids == want["placeholder"]
        longest = max(len(p) for p in prompts) + responses.shape[1]
        tol = fp32_nll_tolerance(model, longest, temperature)  # per half, in mean NLL (relative in perplexity)
        for half in ("ppl_cond", "ppl_uncond"):
            gap = (torch.log(got.__dict__[half].double()) - torch.log(want[half])).abs().max().item()
            print(case, temperature, half, gap, tol)
            assert gap <= tol, (case, temperature, half, gap, tol)
        # SAR = -expm1(nll_c - nll_u): its error is at most exp(nll_c - nll_u) times the two halves' errors.
        ratio = (want["ppl_cond"] / want["ppl_uncond"]).max().item()
        assert (got.reward.double() - want["reward"]).abs().max().item() <= 2 * tol * ratio * (1 + 2 * tol) + 1e-6
        # The official formula's variants on the same perplexities, from sarkern's sar_reward.
        for options in ({"use_log": True}, {"clip_value": 3.0}, {"use_log": True, "clip_value": 2.5},
                        {"use_denominator": False}):  # fmt: skip
            ours = sar_reward(want["ppl_cond"], want["ppl_uncond"], **options)
            pairs = zip(want["ppl_cond"].tolist(), want["ppl_uncond"].tolist())
            theirs = [official_reward(c, u, **options) for c, u in pairs]
            assert ours.tolist() == pytest.approx(theirs, abs=1e-9, rel=1e-9)
        if temperature == 1.0:  # the test can fail: the template preset's halves (no system prompt) are off by far more
            template = SARScorer(model, tokenizer).score(
                [trl_prompt_ids(tokenizer, [{"role": "user", "content": questions[i % len(questions)]}])
                 for i in range(len(responses))], responses, completion_mask=mask,
            )  # fmt: skip
            for half in ("ppl_cond", "ppl_uncond"):
                gap = (torch.log(template.__dict__[half].double()) - torch.log(want[half])).abs().max().item()
                assert gap > 10 * tol, (case, half, gap, tol)
        # What is scored is the official response mask: up to and including the first EOS, never the tokens after.
        official_lengths = response_mask(responses, scorer_eos).sum(dim=1)
        assert got.num_tokens.long().tolist() == official_lengths.tolist()
        assert bool((mask.sum(dim=1) > official_lengths)[1:].all())  # every row but 0 had tokens after its EOS


def test_the_official_system_prompt_is_the_same_text():
    assert PAPER_SYSTEM_PROMPT == SYS_PROMPT


@pytest.mark.parametrize("template", ["NO_SYSTEM_ROLE", "DROPS_SYSTEM"])
def test_templates_without_a_system_role_get_the_system_prompt_in_the_user_turn(template):
    tokenizer = chat_tokenizer()
    tokenizer.chat_template = {"NO_SYSTEM_ROLE": NO_SYSTEM_ROLE, "DROPS_SYSTEM": DROPS_SYSTEM}[template]
    user_only = [{"role": "user", "content": f"{PAPER_SYSTEM_PROMPT}\nwhat is 2+2?"}]
    assert paper_conversation(tokenizer, "what is 2+2?") == user_only
    # The placeholder: the user turn holds the system prompt, a newline and the empty question.
    placeholder = tokenizer.decode(paper_placeholder_ids(tokenizer))
    turn = "<start_of_turn>user\n" if template == "NO_SYSTEM_ROLE" else "<|im_start|>user\n"
    assert placeholder.startswith(f"{turn}{PAPER_SYSTEM_PROMPT}\n<")
    assert PlaceholderPrompts(tokenizer, preset="paper").default == paper_placeholder_ids(tokenizer)
    if template == "NO_SYSTEM_ROLE":  # the official code's own fallback: the same ids
        assert paper_placeholder_ids(tokenizer) == official_placeholder_ids(tokenizer)
        assert trl_prompt_ids(tokenizer, paper_prompt(tokenizer, "2+2?")) == official_prompt_ids(tokenizer, "2+2?")
    else:  # the official code catches only exceptions and would lose the system prompt here; sarkern does not
        assert SYS_PROMPT not in tokenizer.decode(official_placeholder_ids(tokenizer))
        assert SYS_PROMPT in placeholder


def test_without_a_chat_template_the_official_plain_text_without_special_tokens():
    tokenizer = plain_tokenizer()  # adds <s> to every text
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    text = f"System: {PAPER_SYSTEM_PROMPT}\nUser: what is 2+2?\nAssistant: "
    assert paper_prompt(tokenizer, "what is 2+2?") == text
    assert paper_prompt_ids(tokenizer, "what is 2+2?") == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert paper_prompt_ids(tokenizer, "what is 2+2?") == official_prompt_ids(tokenizer, "what is 2+2?")
    placeholder = paper_placeholder_ids(tokenizer)
    assert placeholder == official_placeholder_ids(tokenizer) and tokenizer.bos_token_id not in placeholder
    assert tokenizer.decode(placeholder) == f"System: {PAPER_SYSTEM_PROMPT}\nUser: \nAssistant: "
    prompts = PlaceholderPrompts(tokenizer, preset="paper")
    assert prompts.default == prompts.for_prompt(text) == placeholder
    # A plain-text prompt with a tokenizer that has a chat template: the plain placeholder, never the templated one.
    chat = qwen3_tokenizer()
    assert (
        PlaceholderPrompts(chat, preset="paper").for_prompt(text)
        == chat(f"System: {PAPER_SYSTEM_PROMPT}\nUser: \nAssistant: ", add_special_tokens=False)["input_ids"]
    )


def test_chat_template_kwargs_reach_both_halves():
    tokenizer = qwen3_tokenizer()
    kwargs = {"enable_thinking": False}
    prompt = paper_prompt(tokenizer, "2+2?", chat_template_kwargs=kwargs)
    assert tokenizer.decode(trl_prompt_ids_kwargs(tokenizer, prompt, kwargs)).endswith("<think>\n\n</think>\n\n")
    placeholder = PlaceholderPrompts(tokenizer, preset="paper", chat_template_kwargs=kwargs).default
    assert tokenizer.decode(placeholder) == (
        f"<|im_start|>system\n{PAPER_SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
        "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )


def trl_prompt_ids_kwargs(tokenizer, prompt, kwargs):
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False,
                                         **kwargs)  # fmt: skip


def test_an_unrenderable_paper_placeholder_is_named():
    from sarkern.placeholder import PlaceholderError

    tokenizer = chat_tokenizer()
    tokenizer.chat_template = "{{ raise_exception('no chat here') }}"
    with pytest.raises(PlaceholderError, match=r"cannot render SAR's paper placeholder .* no chat here; pass the"):
        PlaceholderPrompts(tokenizer, preset="paper")
