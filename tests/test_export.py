"""`python -m rlhf export`: HF runs give a save_pretrained folder that `transformers` loads and that
generates what the project's policy generates; x-transformers runs give safetensors + config +
tokenizer that `load_exported` rebuilds. Stage dirs are written by hand (fast); one test goes
through the CLI."""

import json

import pytest
import torch
from omegaconf import OmegaConf

pytest.importorskip("transformers")

from rlhf.errors import ConfigError, RLHFError  # noqa: E402
from rlhf.export import export_stage, load_exported  # noqa: E402
from rlhf.files import mark_complete, write_text  # noqa: E402
from rlhf.models import (  # noqa: E402
    CausalLM,
    HFCausalLM,
    ModelConfig,
    load_hf_model,
    load_hf_tokenizer,
    load_policy,
    make_tiny_checkpoint,
    save_model_files,
    save_weights,
)
from rlhf.models.xtransformers import decode_cached  # noqa: E402
from rlhf.reward import RewardModel, save_reward_model  # noqa: E402
from rlhf.sampling import SamplingConfig, generate, join_prompt_response  # noqa: E402
from rlhf.tasks import TaskConfig  # noqa: E402
from rlhf.tasks.builtin import BuiltinTask, solved_texts  # noqa: E402

PROMPTS = ["sort: qwhfkdmz\n", "add: 48213+937\n", "sort: ab\n"]


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("hf") / "gpt2", solved_texts())


def _write_stage(stage_dir, model, model_cfg, tok, reward_model=None):
    stage_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model, stage_dir / "policy.safetensors")
    if reward_model is not None:
        save_reward_model(reward_model, stage_dir)
    save_model_files(stage_dir, OmegaConf.structured(model_cfg), tok)
    mark_complete(stage_dir)
    return stage_dir


def _perturbed(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # stands in for training: differs from the checkpoint
    return model.eval()


def _hf_stage(tmp_path, hf_checkpoint, reward_bins=None):
    cfg = ModelConfig(backend="hf", path=str(hf_checkpoint))
    model, tok = _perturbed(load_hf_model(cfg)), load_hf_tokenizer(cfg)
    reward = None
    if reward_bins is not None:
        reward = RewardModel(_perturbed(load_hf_model(cfg), seed=2), num_bins=reward_bins)
    return _write_stage(tmp_path / "stage", model, cfg, tok, reward), model, tok, reward


def _xt_stage(tmp_path, reward_bins=None):
    cfg = ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64)
    tok = BuiltinTask(TaskConfig()).tokenizer
    torch.manual_seed(0)
    model = CausalLM(cfg, tok.vocab_size).eval()
    reward = RewardModel(CausalLM(cfg, tok.vocab_size), num_bins=reward_bins).eval() if reward_bins is not None else None
    return _write_stage(tmp_path / "stage", model, cfg, tok, reward), model, tok, reward


def _greedy(model, tok, prompts, n=12) -> list[list[int]]:
    gen = generate(model, [tok.encode(p) for p in prompts], SamplingConfig(max_new_tokens=n, temperature=0), tok.eos_id, tok.pad_id)
    return gen.response_ids()


def test_hf_export_loads_in_transformers_and_generates_the_same(hf_checkpoint, tmp_path, cli):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    stage, model, tok, _ = _hf_stage(tmp_path, hf_checkpoint)
    out = tmp_path / "export"
    proc = cli("export", str(stage), "--out", str(out))
    assert "exported policy" in proc.stdout
    hf_model = AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    assert hf_tok.chat_template == tok.chat_template
    ours = _greedy(model, tok, PROMPTS)
    for prompt, expected in zip(PROMPTS, ours):
        ids = hf_tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        assert ids[0].tolist() == tok.encode(prompt)
        with torch.no_grad():
            out_ids = hf_model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.pad_token_id)
        assert out_ids[0, ids.shape[1]:].tolist() == expected
        assert len(expected) > 1  # a real continuation, not an immediate EOS
    # the export is itself a local checkpoint: load_exported (and model=hf model.path=...) take it
    again, again_tok = load_exported(out)
    assert isinstance(again, HFCausalLM) and _greedy(again, again_tok, PROMPTS) == ours


def test_xtransformers_export_round_trips(tmp_path):
    stage, model, tok, _ = _xt_stage(tmp_path)
    out = export_stage(stage, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    config = json.loads((out / "config.json").read_text())
    assert config["format"] == "rlhf" and config["model"]["dim"] == 32 and config["vocab_size"] == tok.vocab_size
    again, again_tok = load_exported(out)
    assert isinstance(again, CausalLM)
    tokens = torch.tensor([tok.encode(p) for p in PROMPTS[:1]])
    assert torch.allclose(again(tokens), model(tokens), atol=1e-6)
    assert again_tok.encode(PROMPTS[0]) == tok.encode(PROMPTS[0])
    assert _greedy(again, again_tok, PROMPTS) == _greedy(model, tok, PROMPTS)


@pytest.mark.parametrize("backend", ["xtransformers", "hf"])
def test_reward_model_export_round_trips(backend, hf_checkpoint, tmp_path):
    if backend == "hf":
        stage, _, tok, reward = _hf_stage(tmp_path, hf_checkpoint, reward_bins=1)
    else:
        stage, _, tok, reward = _xt_stage(tmp_path, reward_bins=5)
    out = export_stage(stage, tmp_path / "export", what="reward_model")
    assert (out / "reward_head.safetensors").exists()
    again, again_tok = load_exported(out)
    assert isinstance(again, RewardModel) and again.num_bins == reward.num_bins
    tokens, mask = join_prompt_response([tok.encode(p) for p in PROMPTS], [tok.encode("abc") + [tok.eos_id]] * 3, tok.pad_id)
    with torch.no_grad():
        assert torch.allclose(again(tokens, mask), reward.eval()(tokens, mask), atol=1e-5)


def test_export_refuses_bad_input_and_never_leaves_half_a_folder(tmp_path, monkeypatch):
    stage, *_ = _xt_stage(tmp_path)
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    with pytest.raises(RLHFError, match="not a complete stage"):
        export_stage(incomplete, tmp_path / "a")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists"):
        export_stage(stage, taken)
    assert (taken / "keep.txt").read_text() == "mine"
    with pytest.raises(ConfigError, match="reward_model"):
        export_stage(stage, tmp_path / "b", what="reward_model")  # a policy stage has no reward model

    import rlhf.export

    def crash(model, tokenizer, model_cfg, folder):
        (folder / "model.safetensors").write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(rlhf.export, "_write_trunk", crash)
    with pytest.raises(OSError):
        export_stage(stage, tmp_path / "crashed")
    assert not (tmp_path / "crashed").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".crashed")]  # no temp folder left behind


def test_cli_export_of_a_missing_stage_is_one_line_error(cli_in_process, tmp_path):
    proc = cli_in_process("export", str(tmp_path / "nope"), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error:") and "nope" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_a_compiled_run_saves_weights_that_load_uncompiled(tmp_path):
    # model.compile is how a run ran, not part of the weights: loading must not compile (a minute)
    cfg = ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64, compile=True)
    tok = BuiltinTask(TaskConfig()).tokenizer
    stage = _write_stage(tmp_path / "stage", CausalLM(ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64), tok.vocab_size), cfg, tok)
    assert OmegaConf.load(stage / "model.yaml").compile is False
    model, _ = load_policy(stage)
    assert model.decode_fn is decode_cached and model.net._compiled_call_impl is None


def test_written_files_follow_the_umask(tmp_path):
    """Temporary files renamed into place keep the mode a new file gets, not mkstemp's 0600."""
    import os

    from rlhf.feedback.candidates import atomic_write_lines

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        atomic_write_lines(tmp_path / "b.jsonl", ["{}"])
        save_weights(torch.nn.Linear(2, 2), tmp_path / "w.safetensors")  # safetensors writes a file of its own
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "b.jsonl").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_text(tmp_path / "c.txt", "x")
        assert (tmp_path / "c.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
