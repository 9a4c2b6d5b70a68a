"""Parity tests that guard sampling and scoring: cached vs uncached, batched vs one-by-one,
padded vs unpadded, and sampled log-probs vs a scoring pass."""

import shutil

import pytest
import torch

from rlhf.logprobs import response_logprobs, sequence_logprobs
from rlhf.models import CausalLM, ModelConfig, frozen_copy
from rlhf.sampling import SamplingConfig, filter_logits, generate, join_prompt_response

PROMPTS = [[3, 4, 5, 6, 7, 8], [9, 10], [11, 12, 13]]


def _model(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64), vocab_size=20).eval()


def test_greedy_is_identical_with_and_without_cache():
    model = _model()
    cfg = SamplingConfig(max_new_tokens=16, temperature=0)
    cached = generate(model, PROMPTS, cfg, eos_id=1, pad_id=0)
    uncached = generate(model, PROMPTS, SamplingConfig(max_new_tokens=16, temperature=0, use_cache=False), eos_id=1, pad_id=0)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert torch.allclose(cached.logprobs, uncached.logprobs, atol=1e-5)


def test_batched_left_padded_equals_one_by_one():
    model = _model()
    cfg = SamplingConfig(max_new_tokens=16, temperature=0)
    batched = generate(model, PROMPTS, cfg, eos_id=1, pad_id=0)
    for i, prompt in enumerate(PROMPTS):
        single = generate(model, [prompt], cfg, eos_id=1, pad_id=0)
        n = single.tokens.shape[1]
        assert single.response_ids()[0] == batched.response_ids()[i]
        assert torch.allclose(single.logprobs[0], batched.logprobs[i, :n], atol=1e-5)


def test_sampled_logprobs_equal_scoring_pass():
    model = _model()
    gen = generate(model, PROMPTS, SamplingConfig(max_new_tokens=12), eos_id=1, pad_id=0, generator=torch.Generator().manual_seed(3))
    tokens, mask = join_prompt_response(PROMPTS, gen.response_ids(), pad_id=0)
    scored, scored_mask = response_logprobs(model(tokens), tokens, mask)
    for i in range(len(PROMPTS)):
        assert torch.allclose(scored[i][scored_mask[i].bool()], gen.logprobs[i][gen.mask[i]], atol=1e-5)


def test_scoring_padded_batch_equals_unpadded_rows():
    model = _model()
    responses = [[5, 6, 7, 1], [8, 1], [9, 9, 9, 9, 9, 1]]
    tokens, mask = join_prompt_response(PROMPTS, responses, pad_id=0)
    batched = sequence_logprobs(model(tokens), tokens, mask)
    for i in range(len(PROMPTS)):
        t, m = join_prompt_response([PROMPTS[i]], [responses[i]], pad_id=0)
        assert torch.allclose(sequence_logprobs(model(t), t, m)[0], batched[i], atol=1e-5)


def test_rows_stop_after_eos_and_keep_it():
    gen = generate(_eos_model(), PROMPTS, SamplingConfig(max_new_tokens=8, temperature=0), eos_id=1, pad_id=0)
    assert gen.tokens.shape[1] == 1 and gen.response_ids() == [[1], [1], [1]]


def _eos_model():
    class AlwaysEOS(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def decode_step(self, tokens, cache=None, seq_start_pos=None):
            logits = torch.zeros(tokens.shape[0], 20)
            logits[:, 1] = 5.0
            return logits, None

    return AlwaysEOS()


def test_top_k_and_top_p_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    # softmax = [0.644, 0.237, 0.087, 0.032]: top_p=0.7 keeps the first two (0.644 < 0.7)
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]


def test_frozen_copy_does_not_follow_training():
    model = _model()
    ref = frozen_copy(model, ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64), 20)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    tokens = torch.tensor([[3, 4, 5, 6]])
    model.train()
    model(tokens).sum().backward()
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_lean_cached_decoding_equals_the_library_forward():
    """CausalLM.decode_step's own cached path against x-transformers' full forward, left padded,
    past the cache's first capacity (it grows), with stacked q/k/v weights and, under LoRA, without."""
    from rlhf.models import CausalLM, LoRAConfig, ModelConfig, apply_lora
    from rlhf.models.xtransformers import CACHE_HEADROOM

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(dim=64, depth=2, heads=2, max_seq_len=128), 30).eval()
    steps = CACHE_HEADROOM + 4
    tokens = torch.randint(2, 30, (3, 6 + steps))
    start = torch.tensor([0, 2, 5])
    tokens[1, :2] = 0
    tokens[2, :5] = 0
    lora = apply_lora(CausalLM(ModelConfig(dim=64, depth=2, heads=2, max_seq_len=128), 30), LoRAConfig(enabled=True, rank=4))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p)  # adapters that change the output
    lora.eval()
    for m in (model, lora):
        with torch.no_grad():
            logits, cache = m.decode_step(tokens[:, :6], None, start)  # the prompt, then one token at a time
            assert (cache.qkv_weights[0] is None) == (m is lora)
            for t in range(6, tokens.shape[1] + 1):
                if t > 6:
                    logits, cache = m.decode_step(tokens[:, :t], cache, start)
                if t in (6, 7, 8, 6 + CACHE_HEADROOM, tokens.shape[1]):
                    full = m(tokens[:, :t])[:, -1] if m is lora else m.net(tokens[:, :t], seq_start_pos=start)[:, -1]
                    if m is lora:  # the full forward has no padding mask: compare the unpadded row
                        assert torch.allclose(logits[0], full[0], atol=1e-5), t
                    else:
                        assert torch.allclose(logits, full, atol=1e-5), t
        assert cache.keys[0].shape[2] >= tokens.shape[1] > 6 + CACHE_HEADROOM


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_model_matches_the_eager_one():
    # model.compile=true: the network and the cached decode step under torch.compile
    eager = _model()
    torch.manual_seed(0)
    compiled = CausalLM(ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64, compile=True), vocab_size=20).eval()
    compiled.load_state_dict(eager.state_dict())
    assert set(compiled.state_dict()) == set(eager.state_dict())  # checkpoints load either way
    cfg = SamplingConfig(max_new_tokens=16, temperature=0)
    a, b = (generate(m, PROMPTS, cfg, eos_id=1, pad_id=0) for m in (eager, compiled))
    assert torch.equal(a.tokens, b.tokens)
    assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
    tokens, mask = join_prompt_response(PROMPTS, a.response_ids(), pad_id=0)
    grads = []
    for m in (eager.train(), compiled.train()):
        m.zero_grad()
        sequence_logprobs(m(tokens), tokens, mask).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_one_truncation_rule_keeps_the_prompt_end_and_the_response_start():
    from rlhf.sampling import truncate_to_fit

    # fits: unchanged
    assert truncate_to_fit([1, 2], [[3, 4, 1]], 5) == ([1, 2], [[3, 4, 1]], False)
    # long both ways: the response keeps half of 6 (its EOS goes with its end), the prompt its last 3
    assert truncate_to_fit([11, 12, 13, 14, 15, 16], [[7, 8, 9, 10, 1]], 6) == ([14, 15, 16], [[7, 8, 9]], True)
    # a short prompt stays whole; the response gets the rest
    assert truncate_to_fit([1, 2], [list(range(20, 30))], 6) == ([1, 2], [[20, 21, 22, 23]], True)
    # a pair: the longest response sets the cut, both responses are cut alike
    assert truncate_to_fit([11, 12, 13, 14], [[5, 6, 7, 1], [8, 1]], 6) == ([12, 13, 14], [[5, 6, 7], [8, 1]], True)


def test_sft_rows_longer_than_the_context_are_cut_and_counted():
    from rlhf.data.examples import SFTExample
    from rlhf.models import CharTokenizer
    from rlhf.sampling import count_truncated, encode_examples
    from rlhf.tasks.builtin import ALPHABET

    tok = CharTokenizer(ALPHABET)
    rows = [SFTExample("sort: ba\n", "ab"), SFTExample("sort: " + "a" * 40 + "\n", "b" * 40)]
    tokens, mask = encode_examples(tok, rows, max_len=32)
    assert tokens.shape[1] == 32 and mask[1].sum() == 16 and tokens[1, -1].item() != tok.eos_id  # cut: no EOS
    assert mask[0].sum() == 3  # "ab" + EOS, whole
    assert count_truncated(tok, [(r.prompt, [r.response]) for r in rows], 32, "sft") == 1
