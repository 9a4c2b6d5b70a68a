"""Training only the last N transformer blocks: everything else stays bit-identical."""

import pytest
import torch

from rlhf.errors import ConfigError
from rlhf.models import CausalLM, ModelConfig, prepare_trainable, train_last_n_layers

VOCAB = 40


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(depth: int = 3) -> CausalLM:
    torch.manual_seed(0)
    return CausalLM(ModelConfig(dim=32, depth=depth, heads=2, max_seq_len=64), VOCAB)


def train(model, steps: int = 4):
    # weight decay too: a frozen parameter must not move even by decay
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    x = torch.randint(2, VOCAB, (4, 10), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].transpose(1, 2), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()


def block_of(name: str) -> int | None:
    """Transformer block (0-based) of a parameter name; layers alternate attention, feed-forward."""
    if ".attn_layers.layers." not in name:
        return None
    return int(name.split(".attn_layers.layers.")[1].split(".")[0]) // 2


def test_last_block_trains_and_the_rest_is_bit_identical():
    model = train_last_n_layers(tiny(depth=3), 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model)
    for name, p in model.named_parameters():
        trained = block_of(name) == 2 or "final_norm" in name or "to_logits" in name
        assert p.requires_grad == trained, name
        if trained:
            assert not torch.equal(p, before[name]), f"{name} should have changed"
        else:
            assert torch.equal(p, before[name]), f"{name} changed but is frozen"


@pytest.mark.parametrize("n, blocks", [(0, set()), (2, {1, 2}), (3, {0, 1, 2}), (9, {0, 1, 2})])
def test_which_blocks_train(n, blocks):
    model = train_last_n_layers(tiny(depth=3), n)
    trained_blocks = {block_of(k) for k, p in model.named_parameters() if p.requires_grad and block_of(k) is not None}
    assert trained_blocks == blocks
    assert model.net.to_logits.weight.requires_grad and model.net.attn_layers.final_norm.gamma.requires_grad
    assert not model.net.token_emb.emb.weight.requires_grad  # the embedding stays frozen


def test_heads_beside_the_trunk_stay_trainable():
    from rlhf.reward import RewardModel

    rm = RewardModel(tiny(depth=2))
    train_last_n_layers(rm, 1)
    assert rm.head.weight.requires_grad


def test_negative_n_is_a_config_error():
    with pytest.raises(ConfigError):
        train_last_n_layers(tiny(), -1)


def test_prepare_trainable_resets_flags_and_combines_with_lora():
    pytest.importorskip("peft")
    from rlhf.models import LoRAConfig

    class Stage:  # the two shared StageConfig fields
        lora = LoRAConfig(enabled=True, rank=2)
        train_last_n_layers = 1

    model = tiny(depth=2)
    model.net.token_emb.emb.weight.requires_grad_(False)  # as an earlier stage might leave it
    model = prepare_trainable(model, Stage())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    # LoRA on the last block only, plus the final norm and head
    assert all(".lora_" in n or "final_norm" in n or "to_logits" in n for n in trainable)
    assert {block_of(n) for n in trainable if ".lora_" in n} == {1}

    class Plain:
        lora = LoRAConfig()
        train_last_n_layers = None

    plain = prepare_trainable(tiny(depth=2), Plain())
    assert all(p.requires_grad for p in plain.parameters())
