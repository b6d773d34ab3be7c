"""A small, independent re-implementation of the official SAR computation, to hold ``placeholder="paper"`` against.

What the official code (amazon-science's verl fork of the paper, "ppl_qa" in its code) does, written from its
description, not from sarkern:

* real prompt: ``[system: SYS_PROMPT, user: question]`` through the chat template with the generation prompt; if the
  template raises, one user turn ``SYS_PROMPT + "\\n" + question``; without a chat template the text
  ``"System: SYS_PROMPT\\nUser: question\\nAssistant: "``. The text is tokenized with ``add_special_tokens=False`` and
  left-padded to ``max_prompt_length``; position ids are ``cumsum(attention_mask) - 1`` (clipped at 0);
* placeholder ("answer-only batch"): the same with an empty question, put in place of every prompt, the response's
  position ids shifted to continue right after it;
* response mask: 1 up to and including the first EOS, 0 after (``get_response_mask``);
* log-probs: one padded forward per sample, full ``[S, V]`` logits divided by the temperature, ``log_softmax``,
  gathered at the response tokens; ``ppl = exp(-sum(logp * mask) / sum(mask))``;
* reward (``compute_ppl_qa_log``): ``QA, A = ppl(a|q), ppl(a)`` (their logs with ``use_log``), each capped at
  ``clip_value`` when it is above 1, then ``max((A - QA) / (A + 1e-9), -1)``.

Everything runs in float64 on a copy of the model, so it is exact up to float64 rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from scorer_models import float64_copy

# The official code's system prompt, typed here again (not imported from sarkern: this file must not share its code).
SYS_PROMPT = (
    "You are a reasoning expert assistant. Given a question, you will use your reasoning skills to solve the problem."
)


def official_prompt_text(tokenizer, question: str) -> str:
    if tokenizer.chat_template:
        try:
            chat = [{"role": "system", "content": SYS_PROMPT}, {"role": "user", "content": question}]
            return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        except Exception:  # noqa: BLE001 - as the official code: no system role supported
            chat = [{"role": "user", "content": f"{SYS_PROMPT}\n{question}"}]
            return tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    return f"System: {SYS_PROMPT}\nUser: {question}\nAssistant: "


def official_prompt_ids(tokenizer, question: str) -> list[int]:
    return list(tokenizer(official_prompt_text(tokenizer, question), add_special_tokens=False)["input_ids"])


def official_placeholder_ids(tokenizer) -> list[int]:
    return official_prompt_ids(tokenizer, "")


def response_mask(responses: torch.Tensor, eos_ids: Sequence[int]) -> torch.Tensor:
    """1 up to and including the first EOS of each row, 0 after."""
    is_eos = torch.isin(responses, torch.tensor(list(eos_ids))).long()
    return (is_eos.cumsum(dim=1) - is_eos).eq(0).long()


def _left_pad(rows: list[list[int]], length: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    return ids, mask


def official_perplexities(
    model, prompt_rows: list[list[int]], responses: torch.Tensor, eos_ids: Sequence[int], pad_id: int,
    temperature: float = 1.0,
) -> torch.Tensor:  # fmt: skip
    """ppl of each response row after its (left-padded) prompt row, one padded float64 forward per sample."""
    double = float64_copy(model)
    prompt_len = max(len(r) for r in prompt_rows)
    prompt_ids, prompt_mask = _left_pad(prompt_rows, prompt_len, pad_id)
    r_mask = response_mask(responses, eos_ids)
    input_ids = torch.cat([prompt_ids, responses], dim=1)
    attention = torch.cat([prompt_mask, r_mask], dim=1)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    # The response positions continue after the prompt, also after the first EOS (masked tokens keep counting).
    width = responses.shape[1]
    positions[:, prompt_len:] = positions[:, prompt_len - 1 : prompt_len] + torch.arange(1, width + 1)
    out = []
    with torch.no_grad():
        for i in range(len(prompt_rows)):
            logits = double(
                input_ids=input_ids[i : i + 1], attention_mask=attention[i : i + 1], position_ids=positions[i : i + 1]
            ).logits[0]
            logp = torch.log_softmax(logits[prompt_len - 1 : -1] / temperature, dim=-1)
            token_logp = logp.gather(-1, responses[i].unsqueeze(-1)).squeeze(-1)
            mask = r_mask[i].double()
            out.append(math.exp(-float((token_logp * mask).sum() / mask.sum())))
    return torch.tensor(out, dtype=torch.float64)


def official_reward(
    ppl_qa: float, ppl_a: float, *, use_log: bool = False, clip_value: float = -1.0, use_denominator: bool = True
) -> float:
    qa, a = (math.log(ppl_qa), math.log(ppl_a)) if use_log else (ppl_qa, ppl_a)
    if clip_value > 1:
        qa, a = min(qa, clip_value), min(a, clip_value)
    if use_denominator:
        return max((a - qa) / (a + 1e-9), -1.0)
    return a - qa


def official_sar(
    model, tokenizer, questions: list[str], responses: torch.Tensor, eos_ids: Sequence[int], *,
    temperature: float = 1.0, **reward_options,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """The official pipeline end to end: prompts and placeholder built from the questions, both perplexities, SAR."""
    pad_id = tokenizer.pad_token_id
    prompts = [official_prompt_ids(tokenizer, q) for q in questions]
    placeholder = official_placeholder_ids(tokenizer)
    ppl_qa = official_perplexities(model, prompts, responses, eos_ids, pad_id, temperature)
    ppl_a = official_perplexities(model, [placeholder] * len(questions), responses, eos_ids, pad_id, temperature)
    reward = torch.tensor([official_reward(c, u, **reward_options) for c, u in zip(ppl_qa.tolist(), ppl_a.tolist())])
    return {"ppl_cond": ppl_qa, "ppl_uncond": ppl_a, "reward": reward, "prompts": prompts, "placeholder": placeholder}
