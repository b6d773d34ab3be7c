"""What `SARScorer.score` accepts as masks, padded tensors and conditioned log-probs (issue 21, item 12): a mask that
is not 0/1 or has a hole, padding nobody declared and infinite log-probs are refused by name, never scored."""

from __future__ import annotations

import math

import pytest
import torch
from scorer_models import MODEL_VOCAB, chat_tokenizer, plain_tokenizer, tiny_model

from sarkern.score_inputs import as_sequences, checked_mask, cond_nll_from_logprobs, undeclared_padding_id
from sarkern.scorer import SARScorer

IDS = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])


def completions(mask: torch.Tensor, ids: torch.Tensor = IDS) -> list[list[int]]:
    rows = as_sequences(ids, mask, "completion_ids", allow_empty=True, vocab_size=MODEL_VOCAB)
    return [row.tolist() for row in rows]


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]]),  # right and left padding
        torch.tensor([[True, True, True, False], [False, True, True, True]]),
        torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]]),  # floats that are exactly 0/1
        torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.uint8),
    ],
)
def test_0_1_masks_of_any_dtype_select_the_tokens(mask):
    assert completions(mask) == [[10, 11, 12], [21, 22, 23]]


def test_a_mask_with_a_hole_is_refused_naming_row_and_column():
    # Scoring [20, 23] would join two tokens that never followed each other.
    with pytest.raises(ValueError, match=r"completion_mask row 1 has a hole at column 1: .* contiguous run"):
        completions(torch.tensor([[1, 1, 0, 0], [1, 0, 0, 1]]))
    with pytest.raises(ValueError, match=r"prompt_mask row 0 has a hole at column 2"):
        as_sequences(IDS, torch.tensor([[1, 1, 0, 1], [1, 1, 1, 1]]), "prompt_ids", allow_empty=False, vocab_size=99)


@pytest.mark.parametrize(
    ("value", "shown"), [(2, "2"), (-1, "-1"), (0.5, "0.5"), (math.nan, "nan")], ids=["2", "-1", "0.5", "nan"]
)
def test_mask_values_other_than_0_and_1_are_refused_naming_the_entry(value, shown):
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.float32 if isinstance(value, float) else torch.long)
    mask[1, 2] = value
    with pytest.raises(ValueError, match=rf"completion_mask\[1, 2\] is {shown}(\.0)?: a mask holds 0 .* or 1"):
        completions(mask)
    # The log-prob path reads the same mask, and refuses it the same way.
    logprobs = torch.full(IDS.shape, -1.0)
    with pytest.raises(ValueError, match=r"completion_mask\[1, 2\]"):
        cond_nll_from_logprobs(logprobs, [torch.tensor(r) for r in ([10, 11, 12], [20, 21, 22, 23])], mask)


def test_checked_mask_refuses_what_is_not_a_tensor_of_the_shape():
    with pytest.raises(TypeError, match="completion_mask must be a tensor"):
        checked_mask([[1, 1]], torch.Size([1, 2]), "completion_mask")
    with pytest.raises(ValueError, match=r"shape \(1, 3\), but the ids it masks have \(1, 2\)"):
        checked_mask(torch.ones(1, 3), torch.Size([1, 2]), "completion_mask")


def test_padding_without_a_mask_is_refused_when_the_pad_id_can_only_be_padding():
    tokenizer = plain_tokenizer()  # <pad> = 0, distinct from <s> and </s>
    pad = tokenizer.pad_token_id
    right = torch.tensor([[10, 11, 12], [20, pad, pad]])
    left = torch.tensor([[10, 11, 12], [pad, 20, 21]])
    for name, ids in (("completion_ids", right), ("prompt_ids", left)):
        with pytest.raises(ValueError, match=rf"{name} row 1 starts or ends with the pad token id {pad}: .*"):
            as_sequences(ids, None, name, allow_empty=False, vocab_size=MODEL_VOCAB, tokenizer=tokenizer)
        # Declared padding is fine, and so is a pad id in the middle of an unpadded row.
        mask = (ids != pad).long()
        assert len(as_sequences(ids, mask, name, allow_empty=False, vocab_size=MODEL_VOCAB, tokenizer=tokenizer)) == 2
    middle = torch.tensor([[10, pad, 12]])
    assert as_sequences(middle, None, "x", allow_empty=False, vocab_size=MODEL_VOCAB, tokenizer=tokenizer)[0].tolist()
    # A pad id that is also EOS (Llama 3 style) ends real completions: it cannot mark padding, so it is not checked.
    tokenizer.pad_token = tokenizer.eos_token
    assert undeclared_padding_id(tokenizer) is None
    assert len(as_sequences(right, None, "c", allow_empty=False, vocab_size=MODEL_VOCAB, tokenizer=tokenizer)) == 2
    assert undeclared_padding_id(None) is None and undeclared_padding_id(chat_tokenizer()) == 0


def test_the_scorer_refuses_an_unmasked_padded_batch():
    tokenizer = chat_tokenizer()
    scorer = SARScorer(tiny_model("llama"), tokenizer)
    prompts = torch.tensor([[7, 8, 9], [7, 8, 9]])
    padded = torch.tensor([[40, 41, 42], [43, 0, 0]])  # row 1 right-padded with <pad> = 0
    with pytest.raises(ValueError, match="completion_ids row 1 .* pad token id 0: .* needs completion_mask"):
        scorer.score(prompts, padded)
    with pytest.raises(ValueError, match="prompt_ids row 0 .* pad token id 0: .* needs prompt_mask"):
        scorer.score(torch.tensor([[0, 8, 9], [7, 8, 9]]), [[40], [41]])


def test_infinite_cond_logprobs_are_refused_naming_row_and_token():
    rows = [torch.tensor([10, 11, 12]), torch.tensor([20, 21])]
    with pytest.raises(ValueError, match=r"cond_logprobs\[1\] is -inf at completion token 1: .* full softmax"):
        cond_nll_from_logprobs([torch.tensor([-1.0, -2.0, -0.5]), torch.tensor([-0.3, -math.inf])], rows, None)
    # -inf where the mask says padding is never read.
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.5, -1.5, -math.inf]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    nll = cond_nll_from_logprobs(logprobs, rows, mask)
    torch.testing.assert_close(nll, torch.tensor([3.5 / 3, 1.0]))
    with pytest.raises(ValueError, match=r"cond_logprobs\[1\] is -inf at completion token 1"):
        cond_nll_from_logprobs(logprobs, rows, torch.tensor([[1, 1, 1], [0, 1, 1]]))
