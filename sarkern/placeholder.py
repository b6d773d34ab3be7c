"""The placeholder prompt that stands in for the question when SAR measures ``ppl(a)``.

SAR compares how predictable a completion is after its real prompt and after a prompt that carries no question. That
"no question" prompt must look like a real one to the model (same chat scaffolding, same generation prompt), or the
comparison measures the template rather than the question. So it is built from the tokenizer:

* for a conversation, with a chat template: the template applied to the conversation with the user's content emptied,
  a system message kept when the real prompt has one, and the generation prompt added;
* for a conversation, without one: the plain-text fallback ``"User: \\nAssistant: "`` (``"System: ...\\n"`` first
  when there is a system message), tokenized with the tokenizer's usual special tokens;
* for a plain-text prompt (TRL tokenizes it with ``tokenizer(text)``, no chat template): the same tokenization of an
  empty text, i.e. the special tokens the tokenizer adds to any text (a BOS); never a chat-templated prefix, which the
  real prompt does not have (:func:`plain_text_placeholder_ids`);
* or given explicitly as token ids.

A template that cannot render the placeholder (one that raises on an empty user turn) is refused with
:class:`PlaceholderError`, naming the placeholder and the ways out.

Two presets choose the conversation the placeholder is built from (``PLACEHOLDER_PRESETS``):

* ``"template"`` (default): each prompt's own system/developer messages and an empty user turn;
* ``"paper"``: the official SAR code's placeholder (amazon-science's verl fork, ``create_ans_only_batch``), the same
  for every prompt. The official code builds its real prompts the same way (:func:`paper_prompt`), so that both
  halves of SAR see the same system prompt (:data:`PAPER_SYSTEM_PROMPT`):

  - with a chat template: ``[system: PAPER_SYSTEM_PROMPT, user: question]`` rendered with the generation prompt; a
    template that raises on the system turn (the official fallback) or renders without it (sarkern's addition: the
    official code would silently lose the system prompt) gets one user turn ``PAPER_SYSTEM_PROMPT + "\n" + question``
    instead. The placeholder is the same with an empty question: ``[system, user: ""]``, or the user turn
    ``PAPER_SYSTEM_PROMPT + "\n"``;
  - without one (or for a plain-text prompt): the text
    ``"System: <PAPER_SYSTEM_PROMPT>\nUser: <question>\nAssistant: "``;
  - the rendered text tokenized with ``add_special_tokens=False`` (no BOS added), as the official code does.

:class:`PlaceholderPrompts` builds the placeholder of each prompt of a batch (cached per distinct system message);
``SelfAlignedReward`` and ``SARGRPOTrainer`` both use it, so both score ``ppl(a)`` after the same prefix.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "PAPER_SYSTEM_PROMPT",
    "PLACEHOLDER_PRESETS",
    "PAPER_PLAIN_PROMPT",
    "PLAIN_TEXT_PLACEHOLDER",
    "PlaceholderError",
    "PlaceholderPrompts",
    "build_placeholder_ids",
    "paper_conversation",
    "paper_placeholder_ids",
    "paper_prompt",
    "paper_prompt_ids",
    "placeholder_conversation",
    "plain_text_placeholder_ids",
    "validate_token_ids",
]

PLAIN_TEXT_PLACEHOLDER = "User: \nAssistant: "

PLACEHOLDER_PRESETS = ("template", "paper")

# The fixed system prompt of the paper's official implementation, used by its placeholder prompt.
PAPER_SYSTEM_PROMPT = (
    "You are a reasoning expert assistant. Given a question, you will use your reasoning skills to solve the problem."
)

# The official code's prompt for a tokenizer without a chat template (its placeholder: the same, question empty).
PAPER_PLAIN_PROMPT = "System: {system}\nUser: {question}\nAssistant: "

# Roles whose messages stay in the placeholder conversation: they set up the assistant, they do not ask anything.
_KEPT_ROLES = ("system", "developer")

# How a caller gives the placeholder's token ids itself: SARScorer / SelfAlignedReward, then SARGRPOConfig.
EXPLICIT_IDS_HINT = "pass the placeholder's token ids explicitly (placeholder_ids=..., or sar_placeholder_ids=...)"


class PlaceholderError(ValueError):
    """The placeholder prompt cannot be built as asked (a template that fails on it, an empty result)."""


def placeholder_conversation(conversation: Sequence[Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """The placeholder version of a conversation: its system messages, then one user message with empty content.

    Everything else the user or assistant said (several turns included) is the "question" SAR conditions on, so it is
    dropped. When the user's content is a list of parts, the placeholder's is one empty text part, so that templates
    that iterate over parts still render.
    """
    kept: list[dict[str, Any]] = []
    empty_content: Any = ""
    for message in conversation or ():
        if not isinstance(message, Mapping) or "role" not in message:
            raise ValueError(f"a conversation is a list of {{'role': ..., 'content': ...}} messages, got {message!r}")
        if message["role"] in _KEPT_ROLES:
            kept.append(dict(message))
        elif message["role"] == "user" and isinstance(message.get("content"), list):
            empty_content = [{"type": "text", "text": ""}]
    return [*kept, {"role": "user", "content": empty_content}]


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _system_text(conversation: Sequence[Mapping[str, Any]] | None) -> str | None:
    parts = []
    for message in conversation or ():
        if message.get("role") in _KEPT_ROLES:
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(part.get("text", "") for part in content if isinstance(part, Mapping))
            parts.append(str(content))
    return "\n".join(parts) if parts else None


def build_placeholder_ids(
    tokenizer: Any,
    conversation: Sequence[Mapping[str, Any]] | None = None,
    *,
    system_message: str | None = None,
    use_chat_template: bool | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids of the placeholder prompt for ``tokenizer``.

    Args:
        tokenizer: a Hugging Face tokenizer (or processor with ``apply_chat_template``).
        conversation: the real prompt as chat messages; only its system (and developer) messages are used.
        system_message: a system message to keep, as a shortcut for ``[{"role": "system", "content": ...}]``; not
            together with ``conversation``.
        use_chat_template: force (True) or skip (False) the chat template; by default it is used when the tokenizer
            has one.
        chat_template_kwargs: extra arguments for ``apply_chat_template`` (e.g. ``{"enable_thinking": False}``); use
            the same as for the real prompts.

    Returns:
        A non-empty list of token ids. Raises ``ValueError`` if the result is empty (a prefix must have at least one
        token: its last hidden state predicts the completion's first token).
    """
    if system_message is not None:
        if conversation is not None:
            raise ValueError("pass either conversation or system_message, not both")
        conversation = [{"role": "system", "content": system_message}]
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    elif use_chat_template and not _has_chat_template(tokenizer):
        raise ValueError(f"use_chat_template=True but {type(tokenizer).__name__} has no chat template")

    if use_chat_template:
        messages = placeholder_conversation(conversation)
        kwargs = dict(chat_template_kwargs or {})
        try:
            ids = tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=False, **kwargs
            )
        except Exception as err:  # noqa: BLE001 - jinja2's TemplateError (raise_exception), or the template's own bug
            raise PlaceholderError(
                f"the chat template of {type(tokenizer).__name__} cannot render SAR's placeholder prompt "
                f"({_describe(messages)}): {type(err).__name__}: {' '.join(str(err).split())}; {EXPLICIT_IDS_HINT}"
            ) from err
        if isinstance(ids, Mapping):  # some tokenizers ignore return_dict=False
            ids = ids["input_ids"]
    else:
        system = _system_text(conversation)
        text = PLAIN_TEXT_PLACEHOLDER if system is None else f"System: {system}\n{PLAIN_TEXT_PLACEHOLDER}"
        ids = tokenizer(text)["input_ids"]
    ids = _flatten_ids(ids)
    if not ids:
        raise PlaceholderError(f"the placeholder prompt is empty; {EXPLICIT_IDS_HINT}")
    return ids


def _describe(messages: Sequence[Mapping[str, Any]]) -> str:
    kept = [m["role"] for m in messages if m["role"] in _KEPT_ROLES]
    return " + ".join([*(f"the {role} message" for role in kept), "an empty user turn", "the generation prompt"])


def plain_text_placeholder_ids(tokenizer: Any) -> list[int]:
    """The placeholder of a plain-text prompt: the tokenizer's ids for an empty text.

    A plain-text prompt is tokenized as ``tokenizer(prompt)`` (TRL does so), so emptying its question leaves what the
    tokenizer adds to any text, typically a BOS. A tokenizer that adds nothing (Qwen, GPT-2) leaves no token to predict
    the completion's first token from: refused, since any text put there instead would be a guess.
    """
    ids = _flatten_ids(tokenizer(text="")["input_ids"])
    if not ids:
        raise PlaceholderError(
            f"a plain-text prompt's placeholder is {type(tokenizer).__name__}'s tokenization of an empty text, which "
            "is empty (it adds no BOS token): there is no token to predict the first completion token from; "
            f"{EXPLICIT_IDS_HINT}, or use conversational prompts"
        )
    return ids


def paper_conversation(
    tokenizer: Any, question: Any, *, chat_template_kwargs: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The conversation the official SAR code renders for ``question`` with ``tokenizer``'s chat template.

    ``[system: PAPER_SYSTEM_PROMPT, user: question]``, unless the template raises on it (the official code catches any
    exception: a template without a system role) or renders it without the system prompt's text (a template that
    drops system turns; the official code would lose the system prompt there): then one user turn
    ``PAPER_SYSTEM_PROMPT + "\\n" + question``, as the official fallback. Decided per rendering, as there.
    """
    if not _has_chat_template(tokenizer):
        raise ValueError(f"{type(tokenizer).__name__} has no chat template: use paper_prompt (plain text)")
    kwargs = dict(chat_template_kwargs or {})
    with_system = [{"role": "system", "content": PAPER_SYSTEM_PROMPT}, {"role": "user", "content": question}]
    try:
        text = tokenizer.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False, **kwargs)
    except Exception:  # noqa: BLE001 - the official code's `except Exception`: no system role
        text = None
    if isinstance(text, str) and PAPER_SYSTEM_PROMPT in text:
        return with_system
    return [{"role": "user", "content": f"{PAPER_SYSTEM_PROMPT}\n{question}"}]


def paper_prompt(
    tokenizer: Any, question: str, *, chat_template_kwargs: Mapping[str, Any] | None = None
) -> list[dict[str, Any]] | str:
    """The real prompt of ``question`` as the official SAR code builds it: :func:`paper_conversation` with a chat
    template, else the plain text :data:`PAPER_PLAIN_PROMPT` (to be tokenized without special tokens)."""
    if _has_chat_template(tokenizer):
        return paper_conversation(tokenizer, question, chat_template_kwargs=chat_template_kwargs)
    return PAPER_PLAIN_PROMPT.format(system=PAPER_SYSTEM_PROMPT, question=question)


def paper_prompt_ids(
    tokenizer: Any,
    question: str,
    *,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    use_chat_template: bool | None = None,
) -> list[int]:
    """Token ids of :func:`paper_prompt` as the official code makes them: the rendered text (generation prompt
    included) tokenized with ``add_special_tokens=False``. ``use_chat_template=False``: the plain-text form even
    when the tokenizer has a chat template (the placeholder of a plain-text prompt)."""
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    if use_chat_template:
        messages = paper_conversation(tokenizer, question, chat_template_kwargs=chat_template_kwargs)
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False, **dict(chat_template_kwargs or {})
        )
    else:
        text = PAPER_PLAIN_PROMPT.format(system=PAPER_SYSTEM_PROMPT, question=question)
    return _flatten_ids(tokenizer(text, add_special_tokens=False)["input_ids"])


def paper_placeholder_ids(
    tokenizer: Any, *, chat_template_kwargs: Mapping[str, Any] | None = None, use_chat_template: bool | None = None
) -> list[int]:
    """The official code's placeholder prompt: :func:`paper_prompt_ids` with an empty question (see the module)."""
    if use_chat_template is None:
        use_chat_template = _has_chat_template(tokenizer)
    try:
        ids = paper_prompt_ids(
            tokenizer, "", chat_template_kwargs=chat_template_kwargs, use_chat_template=use_chat_template
        )
    except Exception as err:  # noqa: BLE001 - the fallback (system prompt in the user turn) failed too
        raise PlaceholderError(
            f"the chat template of {type(tokenizer).__name__} cannot render SAR's paper placeholder (the paper's "
            "system prompt as a system turn, or in the user turn, and the generation prompt): "
            f"{type(err).__name__}: {' '.join(str(err).split())}; {EXPLICIT_IDS_HINT}"
        ) from err
    if not ids:
        raise PlaceholderError(f"the paper placeholder prompt is empty; {EXPLICIT_IDS_HINT}")
    return ids


def _flatten_ids(ids: Any) -> list[int]:
    """``apply_chat_template`` / tokenizer output for one prompt as a flat list (some return a batch of one)."""
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if len(ids) and isinstance(ids[0], (list, tuple, torch.Tensor)):
        if len(ids) != 1:
            raise ValueError(f"expected the token ids of one prompt, got {len(ids)}")
        return _flatten_ids(ids[0])
    return [int(i) for i in ids]


def validate_token_ids(ids: Any, *, name: str, vocab_size: int | None = None, allow_empty: bool = False) -> list[int]:
    """Check one sequence of token ids (list of ints or 1-D integer tensor) and return it as a list of ints."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 1:
            raise ValueError(f"{name} must be one sequence (1-D), got shape {tuple(ids.shape)}")
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got dtype {ids.dtype}")
        ids = ids.tolist()
    elif isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise TypeError(f"{name} must be a sequence of integer token ids, got {type(ids).__name__}")
    out = []
    for token in ids:
        try:
            if isinstance(token, bool):
                raise TypeError
            out.append(operator.index(token))  # ints and integer scalars; floats and bools are refused
        except TypeError:
            raise TypeError(f"{name} must hold integer token ids, got {token!r}") from None
    if not out and not allow_empty:
        raise ValueError(f"{name} is empty")
    if out and vocab_size is not None:
        low, high = min(out), max(out)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{name} holds token id {bad}, outside the model's vocabulary [0, {vocab_size})")
    return out


def validate_placeholder_preset(preset: Any) -> str:
    if preset not in PLACEHOLDER_PRESETS:
        raise ValueError(f"placeholder preset must be one of {PLACEHOLDER_PRESETS}, got {preset!r}")
    return preset


def is_conversation(prompt: Any) -> bool:
    """Whether ``prompt`` is a list of chat messages (TRL's conversational format) rather than plain text."""
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, (str, bytes))
        and len(prompt) > 0
        and all(isinstance(m, Mapping) for m in prompt)
    )


class PlaceholderPrompts:
    """The placeholder prompt of each prompt of a batch, built the way the real prompts are rendered.

    Args:
        tokenizer: the tokenizer (or processor) that renders the real prompts.
        preset: ``"template"`` (each conversational prompt's system/developer messages kept) or ``"paper"`` (the
            official code's placeholder for every prompt: :func:`paper_placeholder_ids`, its plain-text form for a
            plain-text prompt).
        chat_template_kwargs: the arguments the real prompts are rendered with (e.g. ``{"enable_thinking": False}``).
        placeholder_ids: explicit ids for every prompt; then no preset applies.

    ``default`` is the placeholder of a conversation without system messages (with ``"paper"``: of every
    conversation; with explicit ids: of every prompt): the chat template with an empty user turn, or the plain-text
    fallback without a template. A plain-text prompt gets :func:`plain_text_placeholder_ids` (``"paper"``: the
    official plain-text placeholder, no special tokens), built on first use.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        preset: str = "template",
        chat_template_kwargs: Mapping[str, Any] | None = None,
        placeholder_ids: Sequence[int] | None = None,
    ) -> None:
        self.preset = validate_placeholder_preset(preset)
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.explicit = placeholder_ids is not None
        self._plain: list[int] | None = None
        if placeholder_ids is not None:
            self.default = [int(i) for i in placeholder_ids]
        elif tokenizer is None:
            raise ValueError("building a placeholder prompt needs a tokenizer or explicit placeholder_ids")
        elif preset == "paper":
            self.default = paper_placeholder_ids(tokenizer, chat_template_kwargs=self.chat_template_kwargs)
        else:
            self.default = self._build(None)
        self._cache: dict[str, list[int]] = {}

    def _build(self, conversation: Sequence[Mapping[str, Any]] | None) -> list[int]:
        """build_placeholder_ids, its failure told with the preset and the ways out that work for this tokenizer."""
        try:
            return build_placeholder_ids(self.tokenizer, conversation, chat_template_kwargs=self.chat_template_kwargs)
        except PlaceholderError as err:
            way_out = EXPLICIT_IDS_HINT
            if self.preset == "template" and self._paper_preset_renders():
                way_out = f"use --placeholder paper (placeholder='paper'), which this template renders, or {way_out}"
            reason = str(err).removesuffix(f"; {EXPLICIT_IDS_HINT}")
            raise PlaceholderError(f"{reason} [placeholder preset {self.preset!r}]; {way_out}") from err.__cause__

    def _paper_preset_renders(self) -> bool:
        try:
            paper_placeholder_ids(self.tokenizer, chat_template_kwargs=self.chat_template_kwargs)
        except PlaceholderError:
            return False
        return True

    def for_prompt(self, prompt: Any) -> list[int]:
        """Placeholder ids for one prompt (text or chat messages)."""
        if self.explicit:
            return self.default
        if isinstance(prompt, str):
            return self._plain_text()
        if not is_conversation(prompt):
            raise TypeError(f"a prompt must be text or a list of chat messages, got {type(prompt).__name__}")
        if self.preset == "paper":
            return self.default
        key = repr(placeholder_conversation(prompt))  # what the placeholder depends on: kept messages, content form
        if key not in self._cache:
            self._cache[key] = self._build(prompt)
        return self._cache[key]

    def _plain_text(self) -> list[int]:
        if self._plain is None:
            if self.preset == "paper":  # the official plain-text placeholder, never a chat-templated one
                self._plain = paper_placeholder_ids(self.tokenizer, use_chat_template=False)
            else:
                self._plain = plain_text_placeholder_ids(self.tokenizer)
        return self._plain

    def for_prompts(self, prompts: Sequence[Any]) -> list[list[int]]:
        return [self.for_prompt(p) for p in prompts]
