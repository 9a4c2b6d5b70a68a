"""Feedback candidates sampled from a (tiny, untrained) finished stage's policy."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
from omegaconf import OmegaConf  # noqa: E402

from rlhf.feedback import cli  # noqa: E402
from rlhf.feedback.candidates import load_candidates, make_items, sample_candidates  # noqa: E402
from rlhf.files import mark_complete  # noqa: E402
from rlhf.models import CharTokenizer, ModelConfig, build_model, save_model_files, save_weights  # noqa: E402


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory):
    import torch

    torch.manual_seed(0)
    stage = tmp_path_factory.mktemp("run") / "stages" / "01_sft"
    stage.mkdir(parents=True)
    tokenizer = CharTokenizer("abcdefgh +=?")
    cfg = ModelConfig(dim=32, depth=1, heads=2, max_seq_len=32)
    model = build_model(cfg, tokenizer.vocab_size)
    save_weights(model, stage / "policy.safetensors")
    save_model_files(stage, OmegaConf.structured(cfg), tokenizer)
    mark_complete(stage)
    return stage


def test_sample_candidates_from_a_stage(stage_dir, tmp_path):
    prompts = ["a+b=?", "hh ", "cab"]
    out = tmp_path / "cands.jsonl"
    cands = sample_candidates(stage_dir, prompts, n=3, max_new_tokens=6, seed=1, out=out)
    assert 1 <= len(cands) <= 3 and all(c.prompt in prompts for c in cands)
    for c in cands:
        assert 2 <= len(c.responses) <= 3 and all(0 < len(r) <= 6 for r in c.responses)
        assert (c.model, c.checkpoint) == ("01_sft", str(stage_dir))
    assert load_candidates(out) == cands
    make_items(cands, "compare")  # usable as they are
    again = sample_candidates(stage_dir, prompts, n=3, max_new_tokens=6, seed=1, model="sft-v1")
    assert [c.responses for c in again] == [c.responses for c in cands]  # seeded
    assert again[0].model == "sft-v1"


def test_cli_sample(stage_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "response": "x"}) + "\n" for p in ["ab", "ba"]))
    out = tmp_path / "c.jsonl"
    code = cli.main(["sample", "--stage", str(stage_dir), "--prompts", str(prompts), "--out", str(out),
                     "--n", "2", "--max-new-tokens", "5"])
    assert code == 0 and "wrote" in capsys.readouterr().out
    assert out.exists()
    assert cli.main(["sample", "--stage", str(tmp_path), "--prompts", str(prompts), "--out", str(out)]) == 2
    assert "not a complete stage dir" in capsys.readouterr().err
