"""LoRA through peft on the x-transformers policy: adapters only, base weights untouched, merge."""

import pytest
import torch

from rlhf.models import CausalLM, LoRAConfig, ModelConfig, apply_lora, base_state_dict, disabled_adapters, has_lora, merge_lora, remove_lora
from rlhf.sampling import SamplingConfig, generate

pytest.importorskip("peft")

CFG = ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64)
VOCAB = 40


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, above all on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(CFG, VOCAB)


def train(model, steps: int = 5, lr: float = 1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.1)
    x = torch.randint(2, VOCAB, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].transpose(1, 2), x[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return x


def test_only_adapters_train_and_start_as_identity():
    base = tiny()
    model = apply_lora(tiny(), LoRAConfig(enabled=True, rank=4))
    x = torch.randint(2, VOCAB, (2, 9))
    torch.testing.assert_close(model(x), base(x))  # lora_B starts at zero
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    # every attention and feed-forward linear is adapted: 4 + 2 per block pair, A and B each
    assert len(trainable) == 2 * 2 * (4 + 2)


def test_lora_reference_is_the_base_model_and_unchanged_by_training():
    base = tiny()
    model = apply_lora(tiny(), LoRAConfig(enabled=True, rank=4))
    before = {k: v.clone() for k, v in base_state_dict(model).items()}
    x = train(model)
    assert not torch.allclose(model(x), base(x))  # the adapted policy moved
    with disabled_adapters(model):
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=0)  # the reference did not
    for k, v in base_state_dict(model).items():
        assert torch.equal(v, before[k]), k
    # the context restores adapters and their trainability
    assert not torch.allclose(model(x), base(x))
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)


def test_disabled_adapters_keeps_frozen_adapters_frozen():
    model = apply_lora(tiny(), LoRAConfig(enabled=True))
    frozen = [p for n, p in model.named_parameters() if "layers.0." in n and ".lora_" in n]
    for p in frozen:
        p.requires_grad_(False)
    with disabled_adapters(model):
        pass
    assert not any(p.requires_grad for p in frozen)


def test_merge_gives_a_plain_model_with_the_same_outputs():
    model = apply_lora(tiny(), LoRAConfig(enabled=True, rank=4, alpha=8))
    x = train(model)
    adapted = model(x).detach()
    merged = merge_lora(model)
    assert not has_lora(merged)
    torch.testing.assert_close(merged(x), adapted, rtol=1e-4, atol=1e-4)
    fresh = tiny(seed=5)
    fresh.load_state_dict(merged.state_dict())  # same keys as a model built without LoRA
    torch.testing.assert_close(fresh(x), adapted, rtol=1e-4, atol=1e-4)


def test_remove_drops_the_adapters():
    base = tiny()
    model = apply_lora(tiny(), LoRAConfig(enabled=True))
    x = train(model)
    torch.testing.assert_close(remove_lora(model)(x), base(x), rtol=0, atol=0)


def test_cached_generation_works_with_adapters():
    model = apply_lora(tiny(), LoRAConfig(enabled=True))
    train(model)
    prompts = [[3, 4, 5], [6, 7]]
    cfg = SamplingConfig(max_new_tokens=6, temperature=0.0)
    cached = generate(model, prompts, cfg, eos_id=1, pad_id=0)
    uncached = generate(model, prompts, SamplingConfig(max_new_tokens=6, temperature=0.0, use_cache=False), eos_id=1, pad_id=0)
    assert torch.equal(cached.tokens, uncached.tokens)


def test_bad_target_is_a_config_error():
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="lora.target"):
        apply_lora(tiny(), LoRAConfig(enabled=True, target=["q_proj"]))


@pytest.mark.slow
def test_sft_with_lora_through_the_cli(cli, tmp_path):
    """Any stage: LoRA comes from the shared stage config; the stage ends merged and saves the adapter."""
    from safetensors.torch import load_file

    from rlhf.tasks.builtin import ALPHABET

    run = tmp_path / "run"
    cli("run", "recipe=sft", "model=tiny", "logger=none", "eval.num_prompts=8", "trainer.progress_bar=false", "trainer.num_threads=1",
        "stages.sft.max_steps=4", "stages.sft.batch_size=8", "stages.sft.lora.enabled=true", "stages.sft.lora.rank=2", f"hydra.run.dir={run}")
    stage = run / "stages" / "00_sft"
    assert (stage / "COMPLETE").exists()
    adapter = load_file(str(stage / "lora_adapter.safetensors"))
    assert adapter and all(".lora_" in k for k in adapter)
    weights = load_file(str(stage / "policy.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in weights)  # merged: loads into a plain model
    CausalLM(ModelConfig(dim=32, depth=2, heads=2, max_seq_len=128), len(ALPHABET) + 2).load_state_dict(weights)
