"""Character-level tokenizer of the bundled tiny model.

One token per character keeps the vocabulary tiny, so the embedding and the LM head of the tiny model cost next to
nothing and every digit of an arithmetic result is its own prediction. Precisely, it is one token per UTF-8 *byte*,
which is one token per character for ASCII text (all the tiny model ever sees) and still encodes any other text
losslessly, with no unknown token.

It is built as a byte-level BPE without merges, in exactly the pipeline of Qwen2's tokenizer (NFC normalisation,
Qwen's pre-tokenisation regex, byte-level mapping, byte-level decoding). That matters: for a `qwen2` model directory,
`AutoTokenizer.from_pretrained(dir)` in transformers 5 does not use the saved `tokenizer.json` pipeline as is but
rebuilds `Qwen2Tokenizer` from its vocabulary and merges. Because the saved pipeline is the one `Qwen2Tokenizer`
rebuilds, loading from `tokenizer.json` (transformers 4, `PreTrainedTokenizerFast`) and rebuilding (transformers 5,
`Qwen2Tokenizer`) give identical token ids, and no remote code is needed.

Special tokens follow Qwen's ChatML conventions:

* `<|im_start|>` / `<|im_end|>` open and close a chat turn; `<|im_end|>` is the EOS token, the one generation stops
  on, so a completion is "assistant text + <|im_end|>".
* `<|endoftext|>` ends a raw document; it is a second stop token in the generation config.
* `<|pad|>` pads batches; it never appears in training targets.

Like Qwen there is no BOS token: every sequence starts with `<|im_start|>` through the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|pad|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, ENDOFTEXT_TOKEN, IM_START_TOKEN, IM_END_TOKEN)

# Qwen2's pre-tokenisation regex. Without merges it does not change the tokens (every byte ends up alone anyway), but
# it is part of the pipeline `Qwen2Tokenizer` rebuilds, so the saved pipeline uses it too.
_QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# ChatML, as Qwen uses it: `<|im_start|>{role}\n{content}<|im_end|>\n` per message, then the opening of an assistant
# turn when a generation prompt is asked for. No default system message: prompts stay short for CPU generation.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\n' }}"
    "{%- endif -%}"
)


def byte_symbols() -> list[str]:
    """The printable stand-in of each byte value 0..255 in byte-level BPE (GPT-2's reversible byte mapping).

    Bytes that are printable Latin-1 characters stand for themselves (so ASCII text reads as itself, except space and
    control characters); every other byte maps to an unused code point from 256 upwards, in byte order.
    """
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1))
    printable |= set(range(ord("®"), ord("ÿ") + 1))
    symbols, next_free = [], 256
    for byte in range(256):
        if byte in printable:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(next_free))
            next_free += 1
    return symbols


def build_vocab() -> dict[str, int]:
    """Token -> id: the special tokens first (pad is id 0), then byte b as id `len(SPECIAL_TOKENS) + b`."""
    tokens = list(SPECIAL_TOKENS) + byte_symbols()
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer(model_max_length: int = 512) -> PreTrainedTokenizerFast:
    """Build the byte-level (for ASCII: character-level) tokenizer with its special tokens and ChatML template."""
    backend = Tokenizer(models.BPE(vocab=build_vocab(), merges=[], unk_token=None, fuse_unk=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(SPECIAL_TOKENS))

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=IM_END_TOKEN,
        bos_token=None,
        unk_token=None,  # every byte has a token: nothing is ever unknown
        additional_special_tokens=[ENDOFTEXT_TOKEN, IM_START_TOKEN],
        model_max_length=model_max_length,
        padding_side="left",  # decoder-only generation pads on the left
        # A causal LM takes no token type ids (transformers 4.x's fast tokenizer would return them, and `generate`
        # refuses them).
        model_input_names=["input_ids", "attention_mask"],
        # Text must round-trip exactly: no " ." -> "." clean-up on decode.
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Ids generation should stop on: end of turn first (the EOS), then end of text."""
    return [tokenizer.convert_tokens_to_ids(IM_END_TOKEN), tokenizer.convert_tokens_to_ids(ENDOFTEXT_TOKEN)]


def portable_tokenizer_config(tokenizer: PreTrainedTokenizerFast) -> dict[str, object]:
    """`tokenizer_config.json` for `build_tokenizer`'s tokenizer in keys transformers 4.56+ and 5.x read alike.

    transformers 5 saves `tokenizer_class: TokenizersBackend` and `extra_special_tokens` as a list, which 4.x cannot
    load (no such class; a dict expected). `PreTrainedTokenizerFast` and `additional_special_tokens` are what 4.x
    writes, and 5.x still reads them (the tokenizer itself is in `tokenizer.json`, which both read)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "additional_special_tokens": [ENDOFTEXT_TOKEN, IM_START_TOKEN],
        "bos_token": None,
        "eos_token": IM_END_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": tokenizer.model_max_length,
        "padding_side": tokenizer.padding_side,
        "model_input_names": list(tokenizer.model_input_names),
    }


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, out: Path) -> None:
    """`tokenizer.save_pretrained(out)` with `portable_tokenizer_config` in place of the version-specific config."""
    tokenizer.save_pretrained(out)
    config = json.dumps(portable_tokenizer_config(tokenizer), indent=2, sort_keys=True)
    (Path(out) / "tokenizer_config.json").write_text(config + "\n", encoding="utf-8")
