"""Shifting and masking, checked against hand-computed numbers."""

import math

import pytest
import torch

from rlhf.logprobs import response_logprobs, response_nll, sequence_logprobs, token_logprobs


def _logits_for(probs_rows):
    """Logits whose softmax is exactly the given probabilities."""
    return torch.tensor(probs_rows, dtype=torch.float32).log()


def test_token_logprobs_matches_log_softmax():
    logits = torch.randn(2, 5, 7)
    targets = torch.randint(0, 7, (2, 5))
    expected = logits.log_softmax(-1).gather(-1, targets[..., None]).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, targets), expected, atol=1e-6)


def test_shift_uses_previous_position_logits():
    # vocab of 3; tokens [0, 1, 2]; prompt = token 0, response = tokens 1 and 2.
    # position 0 predicts token 1 with p=0.5, position 1 predicts token 2 with p=0.25.
    logits = _logits_for([[[0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]])
    tokens = torch.tensor([[0, 1, 2]])
    mask = torch.tensor([[0, 1, 1]])
    # log(0.5) + log(0.25) = -0.693147 - 1.386294 = -2.079442
    assert math.isclose(sequence_logprobs(logits, tokens, mask).item(), -2.079442, abs_tol=1e-5)
    # an unshifted (wrong) gather would read p(token1 | pos1)=0.25 and p(token2 | pos2)=1/3 instead
    assert not math.isclose(sequence_logprobs(logits, tokens, mask).item(), math.log(0.25) + math.log(1 / 3), abs_tol=1e-3)
    # per-token mean: -2.079442 / 2 = -1.039721
    assert math.isclose(sequence_logprobs(logits, tokens, mask, average=True).item(), -1.039721, abs_tol=1e-5)


def test_prompt_tokens_are_masked_out():
    # same numbers; only the last token is response: log(0.25) = -1.386294
    logits = _logits_for([[[0.25, 0.5, 0.25], [0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]])
    tokens = torch.tensor([[0, 1, 2]])
    logprobs, mask = response_logprobs(logits, tokens, torch.tensor([[0, 0, 1]]))
    assert mask.tolist() == [[0.0, 1.0]]
    assert logprobs[0, 0].item() == 0.0
    assert math.isclose(logprobs[0, 1].item(), -1.386294, abs_tol=1e-5)
    # SFT loss is the mean NLL over response tokens only: 1.386294
    assert math.isclose(response_nll(logits, tokens, torch.tensor([[0, 0, 1]])).item(), 1.386294, abs_tol=1e-5)


def test_padding_after_response_changes_nothing():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 6)
    tokens = torch.tensor([[2, 3, 4, 5]])
    mask = torch.tensor([[0, 1, 1, 1]])
    padded_logits = torch.cat([logits, torch.randn(1, 3, 6)], dim=1)
    padded_tokens = torch.cat([tokens, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    assert torch.allclose(sequence_logprobs(logits, tokens, mask), sequence_logprobs(padded_logits, padded_tokens, padded_mask))


# -- SFT's length buckets: less padding, the same loss ---------------------------------------


def test_length_buckets_cut_where_padding_is_least():
    from rlhf.training import length_buckets

    # four short rows and four long ones: one batch pads 8 x 100 = 800, two pad 4 x 30 + 4 x 100 = 520
    assert length_buckets([30, 100, 25, 98, 28, 100, 29, 97]) == [[2, 4, 6, 0], [7, 3, 1, 5]]
    assert length_buckets([30, 31, 29, 30]) == [[0, 1, 2, 3]]  # nothing to save: one forward
    assert length_buckets([10]) == [[0]] and length_buckets([]) == [[]]


def test_bucketed_response_nll_equals_the_padded_batch():
    from rlhf.logprobs import response_nll
    from rlhf.models import CausalLM, ModelConfig
    from rlhf.sampling import join_prompt_response
    from rlhf.training import bucketed_response_nll

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(dim=32, depth=2, heads=2), 30)
    prompts = [[1, 2, 3]] * 3 + [[4, 5, 6, 7, 8, 9, 10, 11]] * 3
    responses = [[12, 2]] * 3 + [list(range(3, 25))] * 3
    tokens, mask = join_prompt_response(prompts, responses, pad_id=0)
    whole = response_nll(model(tokens), tokens, mask)
    grads = torch.autograd.grad(whole, list(model.parameters()))
    bucketed = bucketed_response_nll(model, tokens, mask)
    grads_b = torch.autograd.grad(bucketed, list(model.parameters()))
    assert bucketed.item() == pytest.approx(whole.item(), rel=1e-5)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, grads_b))
