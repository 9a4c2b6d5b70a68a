"""The Hugging Face backend: a local checkpoint behind the project's model and tokenizer interfaces.

Tiny GPT-2 (learned absolute positions, Conv1D layers) and Llama (rotary, nn.Linear)
checkpoints are built locally from configs with a locally trained tokenizer: no downloads.
The parity tests are those that guard the x-transformers sampling (tests/test_sampling.py).
"""

import json
import warnings

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("transformers")

from conftest import REPO, TINY  # noqa: E402

from rlhf.errors import ConfigError  # noqa: E402
from rlhf.files import is_complete, mark_complete  # noqa: E402
from rlhf.logprobs import response_logprobs, sequence_logprobs  # noqa: E402
from rlhf.models import (  # noqa: E402
    HFCausalLM,
    HFTokenizer,
    ModelConfig,
    build_model,
    frozen_copy,
    load_hf_model,
    load_hf_tokenizer,
    load_policy,
    load_tokenizer,
    make_tiny_checkpoint,
    save_model_files,
    save_weights,
)
from rlhf.sampling import SamplingConfig, generate, join_prompt_response  # noqa: E402
from rlhf.tasks.builtin import solved_texts  # noqa: E402

ARCHS = ["gpt2", "llama"]
TEXTS = ["sort: qwhfkdmz\n", "add: 48213+937\n", "sort: ab\n", "judge add: 1+2\nanswer 3\nscore:", "a ,b  c!\n\t~{}"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {arch: make_tiny_checkpoint(root / arch, solved_texts(), arch=arch) for arch in ARCHS}


def _cfg(path) -> ModelConfig:
    return ModelConfig(backend="hf", path=str(path))


def _load(path):
    return load_hf_model(_cfg(path)).eval(), load_hf_tokenizer(_cfg(path))


def _prompts(tok) -> list[list[int]]:
    # different lengths, so batches are left-padded
    return [tok.encode(t) for t in ("sort: qwhfkdmzab\n", "add: 1+2\n", "sort: xyz\n")]


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("path", ["/nonexistent/checkpoint", "gpt2", "EMPTY"])
def test_a_path_that_is_not_a_local_checkpoint_is_a_config_error(path, tmp_path):
    if path == "EMPTY":
        path = str(tmp_path)  # a folder without config.json
    with pytest.raises(ConfigError) as err:
        load_hf_model(_cfg(path))
    message = str(err.value)
    assert path in message and "\n" not in message
    with pytest.raises(ConfigError):
        load_hf_tokenizer(_cfg(path))


def test_model_hf_without_a_path_names_model_path():
    cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(REPO / "conf" / "model" / "hf.yaml"))
    with pytest.raises(ConfigError, match="model.path"):
        load_hf_tokenizer(cfg)


def test_attn_implementation_errors_name_the_setting(checkpoints):
    with pytest.raises(ConfigError, match=r"^model\.attn_implementation=bogus: ") as err:
        load_hf_model(ModelConfig(backend="hf", path=str(checkpoints["gpt2"]), attn_implementation="bogus"))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="model.attn_implementation is for the Hugging Face backend"):
        build_model(ModelConfig(attn_implementation="eager"), 64)


@pytest.mark.parametrize("arch", ARCHS)
def test_interface_matches_causal_lm(checkpoints, arch):
    model = build_model(_cfg(checkpoints[arch]), vocab_size=0)  # vocab comes from the checkpoint
    assert isinstance(model, HFCausalLM)
    assert model.training  # like a freshly built CausalLM
    assert (model.hidden_size, model.max_seq_len) == (64, 256)
    assert model.vocab_size == load_hf_tokenizer(_cfg(checkpoints[arch])).vocab_size
    assert model.num_parameters() == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(exclude_embedding=True) < model.num_parameters()
    # the checkpoint's dropout is replaced by model.dropout (0): training-mode log-probs equal sampling ones
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, torch.nn.Dropout))
    tokens = torch.randint(0, model.vocab_size, (2, 7))
    logits = model(tokens)
    assert logits.shape == (2, 7, model.vocab_size)
    logits2, hidden = model.forward_hidden(tokens)
    assert hidden.shape == (2, 7, 64)
    assert torch.allclose(logits, logits2, atol=1e-5)
    # the head-free path reward models use gives the same (final-norm) hidden states
    assert torch.allclose(model.hidden(tokens), hidden, atol=1e-5)


def test_gpt2_runs_the_fused_gelu_and_matches_transformers(checkpoints):
    """load_hf_model swaps GPT-2's Python gelu_new for torch's fused tanh GELU: the same
    outputs as the checkpoint loaded by transformers itself, whose config is untouched."""
    from transformers import AutoModelForCausalLM
    from transformers.activations import GELUTanh, NewGELUActivation

    model = build_model(_cfg(checkpoints["gpt2"]), vocab_size=0).eval()
    reference = AutoModelForCausalLM.from_pretrained(str(checkpoints["gpt2"]), local_files_only=True).eval()
    assert any(isinstance(m, NewGELUActivation) for m in reference.modules())
    assert not any(isinstance(m, NewGELUActivation) for m in model.modules())
    assert any(isinstance(m, GELUTanh) for m in model.modules())
    assert model.model.config.activation_function == reference.config.activation_function
    tokens = torch.randint(0, model.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.allclose(model(tokens), reference(tokens).logits, atol=1e-5)


# --------------------------------------------------------------------------- sampling parity


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_is_identical_with_and_without_cache(checkpoints, arch):
    model, tok = _load(checkpoints[arch])
    prompts = _prompts(tok)
    cached = generate(model, prompts, SamplingConfig(max_new_tokens=12, temperature=0), tok.eos_id, tok.pad_id)
    uncached = generate(model, prompts, SamplingConfig(max_new_tokens=12, temperature=0, use_cache=False), tok.eos_id, tok.pad_id)
    assert cached.tokens.shape[1] > 1
    assert torch.equal(cached.tokens, uncached.tokens)
    assert torch.allclose(cached.logprobs, uncached.logprobs, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_batched_left_padded_equals_one_by_one(checkpoints, arch):
    model, tok = _load(checkpoints[arch])
    prompts = _prompts(tok)
    cfg = SamplingConfig(max_new_tokens=12, temperature=0)
    batched = generate(model, prompts, cfg, tok.eos_id, tok.pad_id)
    for i, prompt in enumerate(prompts):
        single = generate(model, [prompt], cfg, tok.eos_id, tok.pad_id)
        n = single.tokens.shape[1]
        assert single.response_ids()[0] == batched.response_ids()[i]
        assert torch.allclose(single.logprobs[0], batched.logprobs[i, :n], atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_sampled_logprobs_equal_scoring_pass(checkpoints, arch):
    model, tok = _load(checkpoints[arch])
    prompts = _prompts(tok)
    gen = generate(model, prompts, SamplingConfig(max_new_tokens=10), tok.eos_id, tok.pad_id, generator=torch.Generator().manual_seed(3))
    tokens, mask = join_prompt_response(prompts, gen.response_ids(), tok.pad_id)
    scored, scored_mask = response_logprobs(model(tokens), tokens, mask)
    for i in range(len(prompts)):
        assert torch.allclose(scored[i][scored_mask[i].bool()], gen.logprobs[i][gen.mask[i]], atol=1e-5)
    # and a right-padded scoring batch equals its rows scored alone
    batched = sequence_logprobs(model(tokens), tokens, mask)
    for i in range(len(prompts)):
        t, m = join_prompt_response([prompts[i]], [gen.response_ids()[i]], tok.pad_id)
        assert torch.allclose(sequence_logprobs(model(t), t, m)[0], batched[i], atol=1e-4)


def test_frozen_copy_does_not_follow_training(checkpoints):
    model, _ = _load(checkpoints["gpt2"])
    ref = frozen_copy(model, _cfg(checkpoints["gpt2"]), 0)
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    model.train()
    model(torch.tensor([[3, 4, 5, 6]])).sum().backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    assert all(torch.equal(before[k], v) for k, v in ref.state_dict().items())
    assert not torch.equal(before["model.transformer.wte.weight"], model.model.transformer.wte.weight)


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_transformers_and_round_trips(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    folder = checkpoints["gpt2"]
    tok = load_hf_tokenizer(_cfg(folder))
    reference = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert tok.vocab_size == len(reference)
    assert tok.eos_id == reference.eos_token_id and tok.pad_id == tok.eos_id  # GPT-2 has no pad token
    assert tok.chat_template == reference.chat_template
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    assert tok.decode(tok.encode("add: 1+2\n") + [tok.eos_id]) == "add: 1+2\n"  # specials dropped

    tok.save(tmp_path / "tokenizer.json")
    assert json.loads((tmp_path / "tokenizer.json").read_text())["kind"] == "hf"
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert isinstance(again, HFTokenizer)
    assert (again.vocab_size, again.eos_id, again.pad_id, again.chat_template) == (tok.vocab_size, tok.eos_id, tok.pad_id, tok.chat_template)
    assert all(again.encode(t) == tok.encode(t) for t in TEXTS)


# --------------------------------------------------------------------------- stage dirs and LoRA


def _write_stage(stage_dir, model, model_cfg, tok) -> None:
    save_weights(model, stage_dir / "policy.safetensors")
    save_model_files(stage_dir, OmegaConf.structured(model_cfg), tok)
    mark_complete(stage_dir)


def test_load_policy_rebuilds_an_hf_stage_with_tied_weights(checkpoints, tmp_path):
    model, tok = _load(checkpoints["gpt2"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # "trained" weights, unlike the checkpoint's
    _write_stage(tmp_path, model, _cfg(checkpoints["gpt2"]), tok)
    loaded, loaded_tok = load_policy(tmp_path)
    assert isinstance(loaded, HFCausalLM) and isinstance(loaded_tok, HFTokenizer)
    inner = loaded.model
    assert inner.lm_head.weight is inner.transformer.wte.weight  # still tied after safetensors round trip
    tokens = torch.tensor([tok.encode("sort: qwhfkdmz\n")])
    assert torch.allclose(loaded(tokens), model(tokens), atol=1e-5)


@pytest.mark.parametrize("arch, expected", [("gpt2", ["c_attn", "c_fc", "c_proj"]), ("llama", ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])])
def test_lora_default_targets_map_to_hf_layer_names(checkpoints, arch, expected):
    from rlhf.models import LoRAConfig, apply_lora, disabled_adapters, merge_lora

    model, _ = _load(checkpoints[arch])
    assert model.lora_targets() == expected
    tokens = torch.randint(0, model.vocab_size, (2, 9))
    base = model(tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft notes that GPT-2's Conv1D is fan_in_fan_out
        apply_lora(model, LoRAConfig(enabled=True))  # the default (x-transformers) targets
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    adapted = model(tokens)
    assert not torch.allclose(adapted, base, atol=1e-3)
    with disabled_adapters(model):
        assert torch.allclose(model(tokens), base, atol=1e-5)
    merge_lora(model)
    assert torch.allclose(model(tokens), adapted, atol=1e-4)
    fresh, _ = _load(checkpoints[arch])
    fresh.load_state_dict(model.state_dict())  # a merged model is a plain model again


# --------------------------------------------------------------------------- the CLI


def test_cli_nonexistent_path_is_one_line_error(cli_in_process, tmp_path):
    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("model=")]
    proc = cli_in_process("run", "recipe=sft", "model=hf", "model.path=/nonexistent/hf_checkpoint", *args, f"hydra.run.dir={run}", check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "/nonexistent/hf_checkpoint" in errors[0]
    assert not (run / "stages").exists()


@pytest.mark.slow
def test_hf_chain_sft_dpo_ppo_with_lora_via_cli(cli, checkpoints, tmp_path):
    """recipes/hf_chain.yaml end to end on a tiny GPT-2, DPO and PPO with LoRA adapters."""
    run = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("model=")]
    overrides = [
        "recipe=hf_chain", f"model.path={checkpoints['gpt2']}", *args,
        "stages.sft.max_steps=20", "stages.sft.batch_size=16",
        "stages.dpo.max_steps=3", "stages.dpo.batch_size=4", "stages.dpo.eval_every=0", "stages.dpo.lora.enabled=true",
        "stages.ppo.max_steps=2", "stages.ppo.rollout_batch_size=8", "stages.ppo.minibatch_size=4",
        "stages.ppo.generation_batch_size=8", "stages.ppo.eval_every=0", "stages.ppo.lora.enabled=true",
    ]
    cli("run", *overrides, f"hydra.run.dir={run}")
    stages = sorted(p.name for p in (run / "stages").iterdir())
    assert stages == ["00_sft", "01_dpo", "02_ppo"]
    for name in stages:
        assert is_complete(run / "stages" / name)
        assert "eval/task_score" in json.loads((run / "stages" / name / "metrics.json").read_text())
    assert all((run / "stages" / s / "lora_adapter.safetensors").exists() for s in ("01_dpo", "02_ppo"))
    model, tok = load_policy(run / "stages" / "02_ppo")
    assert isinstance(model, HFCausalLM) and isinstance(tok, HFTokenizer)
    # the policy the run handed on is a plain model (LoRA merged) that loads without peft layers
    assert not any(".lora_" in k for k in model.state_dict())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ARCHS)
def test_shared_prompt_pairs_equal_two_rows(checkpoints, arch, attention):
    """DPO's packed rows (prompt | chosen | rejected, a 4D mask and position ids) give the
    two-row log-probs on HF models too, with either attention kernel (sdpa reads the mask as
    booleans, eager adds it to the scores)."""
    from rlhf.preference_batch import EncodedPair, can_share_prompt, collate_pairs, pack_pairs, pair_logprobs, shared_prompt_forward

    model = load_hf_model(ModelConfig(backend="hf", path=str(checkpoints[arch]), attn_implementation=attention)).eval()
    assert model.model.config._attn_implementation == attention
    assert can_share_prompt(model)
    pairs = [EncodedPair([3, 4, 5, 6], [7, 8, 9, 1], [10, 11, 1]), EncodedPair([5, 6], [7, 1], [12, 13, 14, 15, 1])]
    plain, _ = pair_logprobs(model, *collate_pairs(pairs, 0))
    packed, _ = shared_prompt_forward(model, *pack_pairs(pairs, 0))
    assert torch.allclose(packed, plain, atol=1e-4)


def test_eager_attention_samples_and_scores_like_sdpa(checkpoints):
    """model.attn_implementation=eager: the same greedy tokens and log-probs as the default kernel,
    cached and uncached, on left-padded batches."""
    path = str(checkpoints["gpt2"])
    sdpa, tok = _load(path)
    eager = load_hf_model(ModelConfig(backend="hf", path=path, attn_implementation="eager")).eval()
    assert sdpa.model.config._attn_implementation == "sdpa"
    prompts = _prompts(tok)
    for use_cache in (True, False):
        cfg = SamplingConfig(max_new_tokens=12, temperature=0, use_cache=use_cache)
        a, b = (generate(m, prompts, cfg, tok.eos_id, tok.pad_id) for m in (sdpa, eager))
        assert torch.equal(a.tokens, b.tokens)
        assert torch.allclose(a.logprobs, b.logprobs, atol=1e-5)
