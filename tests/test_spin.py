"""SPIN: the loss wiring against a hand-computed number, config checks, a stage with no pair, an end-to-end run."""

import json
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY
from rlhf.config import typed_run_config, typed_stage_config
from rlhf.errors import ConfigError, DataError
from rlhf.models import build_model
from rlhf.stage_context import StageContext
from rlhf.stages import spin
from rlhf.tasks import build_task
from rlhf.tasks.builtin import answer
from rlhf.training import mix_seed
from rlhf.preference_batch import EncodedPair, collate_pairs
from rlhf.stages.spin import spin_step_loss


class Uniform(nn.Module):
    """Zero logits over V tokens: every token has log-prob -log V."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, tokens):
        return torch.zeros(*tokens.shape, self.vocab)


def test_spin_loss_hand_computed():
    # V = 4: each token log p = -ln 4. Real response 3 tokens, generated 5 (EOS included).
    # policy: real = -3 ln4, generated = -5 ln4; opponent (ref): -4 and -4.
    # lam * ((real - ref_real) - (gen - ref_gen)) = 0.5 * ((-3 ln4 + 4) - (-5 ln4 + 4)) = 0.5 * 2 ln4 = ln 4
    # loss = -log sigmoid(ln 4) = log(1 + 1/4) = ln 1.25 = 0.223144
    pair = EncodedPair(prompt=[2, 3], chosen=[2, 2, 1], rejected=[3, 3, 3, 3, 1])
    tokens, mask = collate_pairs([pair], pad_id=0)
    ref = torch.tensor([[-4.0, -4.0]])
    loss, metrics = spin_step_loss(Uniform(4), tokens, mask, ref, lam=0.5, nll_weight=0.0)
    assert loss.item() == pytest.approx(math.log(1.25), abs=1e-6)
    assert metrics["rewards/real"].item() == pytest.approx(0.5 * (-3 * math.log(4) + 4), abs=1e-6)
    # + the NLL term on the real response: per-token -log p = ln 4, so ln 1.25 + ln 4 = ln 5
    loss, metrics = spin_step_loss(Uniform(4), tokens, mask, ref, lam=0.5, nll_weight=1.0)
    assert loss.item() == pytest.approx(math.log(5.0), abs=1e-6)
    assert metrics["nll"].item() == pytest.approx(math.log(4), abs=1e-6)


def test_spin_loss_batch_keeps_rows_apart():
    # two pairs: the second identical to the hand-computed one, the first with equal log-ratios (loss ln 2)
    a = EncodedPair(prompt=[2], chosen=[2, 1], rejected=[3, 1])
    b = EncodedPair(prompt=[2, 3], chosen=[2, 2, 1], rejected=[3, 3, 3, 3, 1])
    tokens, mask = collate_pairs([a, b], pad_id=0)
    ref = torch.tensor([[-1.0, -1.0], [-4.0, -4.0]])
    loss, _ = spin_step_loss(Uniform(4), tokens, mask, ref, lam=0.5, nll_weight=0.0)
    assert loss.item() == pytest.approx((math.log(2) + math.log(1.25)) / 2, abs=1e-6)


def test_spin_config_checks():
    with pytest.raises(ConfigError, match="previous_slot"):
        typed_stage_config("s2", {"kind": "spin", "mix_previous": True})
    with pytest.raises(ConfigError, match="lam"):
        typed_stage_config("s2", {"kind": "spin", "lam": 0.0})
    cfg = typed_stage_config("s2", {"kind": "spin"})
    assert cfg.lam == 0.1 and not cfg.mix_previous


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_spin_recipe_end_to_end(cli, tmp_path):
    per_slot = ["steps_per_round=2", "batch_size=4", "eval_prompts=4", "max_new_tokens=8"]
    cli(
        "run", "recipe=spin", "task=easy", *TINY, "stages.sft.max_steps=20", "stages.sft.batch_size=16",
        *[f"stages.{slot}.{kv}" for slot in ("spin_iter1", "spin_iter2") for kv in per_slot],
        "stages.spin_iter1.max_steps=4", "stages.spin_iter2.max_steps=2", f"hydra.run.dir={tmp_path}",
    )
    it1, it2 = tmp_path / "stages" / "01_spin_iter1", tmp_path / "stages" / "02_spin_iter2"
    for d in (it1, it2):
        assert (d / "COMPLETE").exists() and (d / "generations.jsonl").exists()
    rows1 = read_jsonl(it1 / "generations.jsonl")
    assert len(rows1) == 2 * 8 and {r["round"] for r in rows1} == {0, 1}
    for row in rows1:
        assert set(row) >= {"prompt", "real", "generated", "status", "source"}
        # a generation cut off at the token limit is never the (finished) real answer
        assert row["status"] == ("identical" if row["generated"] == row["real"] and row["generated_finished"] else "pair")
        if row["status"] == "pair":
            assert len(row["ref"]) == 2
    # iteration 2 mixes in iteration 1's generations, as many as its own
    rows2 = read_jsonl(it2 / "rounds" / "round_000.jsonl")
    previous = [r for r in rows2 if r["source"] == "previous"]
    assert len(previous) == 8 and len(rows2) == 16
    assert {(r["prompt"], r["generated"]) for r in previous} <= {(r["prompt"], r["generated"]) for r in rows1}
    m = json.loads((it2 / "metrics.json").read_text())
    for key in ("eval/task_score", "pairs_total", "identical_total", "round/previous", "round/generated_score", "train/spin_loss", "train/rewards/accuracy"):
        assert key in m, key


def small_spin_context(tmp_path, task: dict, **stage) -> StageContext:
    stage = {"kind": "spin", "max_steps": 2, "steps_per_round": 2, "batch_size": 4, "max_new_tokens": 8, "eval_prompts": 0, **stage}
    cfg = typed_run_config(OmegaConf.create({
        "order": ["s"], "stages": {"s": stage}, "model": {"dim": 32, "depth": 2, "heads": 2, "max_seq_len": 64}, "task": task,
        "logger": {"kind": "none"}, "trainer": {"accelerator": "cpu", "progress_bar": False}, "eval": {"num_prompts": 8},
    }))
    built = build_task(cfg.task, tmp_path)
    torch.manual_seed(0)
    return StageContext(slot="s", cfg=typed_stage_config("s", cfg.stages.s), run_cfg=cfg, stage_dir=Path(tmp_path), policy=build_model(cfg.model, built.tokenizer.vocab_size),
                        task=built, tokenizer=built.tokenizer, seed=mix_seed(0, "s"), logger=None, completed={})


def test_a_spin_stage_whose_answers_all_equal_the_data_fails_instead_of_completing(tmp_path, monkeypatch):
    # the opponent writes the real answer every time: no pair, so the stage trains on nothing and
    # must say so (a DataError naming the cause), not be marked complete with its weights unchanged
    ctx = small_spin_context(tmp_path, {"sort_min_len": 3, "sort_max_len": 5, "add_min_digits": 1, "add_max_digits": 2})
    monkeypatch.setattr(spin, "generate_responses", lambda model, tok, prompts, *a, **k: ([answer(p) for p in prompts], [True] * len(prompts)))
    with pytest.raises(DataError, match=r"stages.s: no usable pair, nothing was trained: all 8 generations equal the real response"):
        spin.run(ctx)
    assert not (tmp_path / "COMPLETE").exists()


def test_drop_verified_drops_other_right_answers_and_keeps_wrong_ones(tmp_path, monkeypatch):
    # arrange has many right orderings, the data one: a reversed right ordering is right too (the
    # neighbour rule is symmetric); alphabetical order puts neighbours side by side and is wrong
    arrange = {"families": ["arrange"], "arrange_min_len": 4, "arrange_max_len": 5}
    write = lambda model, tok, prompts, *a, **k: ([answer(p)[::-1] if i % 2 == 0 else "".join(sorted(answer(p))) for i, p in enumerate(prompts)], [True] * len(prompts))
    monkeypatch.setattr(spin, "generate_responses", write)
    for drop in (False, True):
        ctx = small_spin_context(tmp_path / str(drop), arrange, drop_verified=drop)
        result = spin.run(ctx)
        rows = [json.loads(line) for line in (tmp_path / str(drop) / "generations.jsonl").read_text().splitlines()]
        assert len(rows) == 8
        right = [row for row in rows if row["score"] == 1.0]
        assert len(right) == 4 and all(row["generated"] != row["real"] for row in right)
        assert {row["status"] for row in right} == {"verified" if drop else "pair"}
        assert {row["status"] for row in rows if row["score"] < 1.0} == {"pair"}
        assert result.metrics["pairs_total"] == (4 if drop else 8)
    # every answer right: nothing to train on, said as for identical answers
    monkeypatch.setattr(spin, "generate_responses", lambda model, tok, prompts, *a, **k: ([answer(p)[::-1] for p in prompts], [True] * len(prompts)))
    with pytest.raises(DataError, match="with drop_verified, score 1.0"):
        spin.run(small_spin_context(tmp_path / "all", arrange, drop_verified=True))
    with pytest.raises(ConfigError, match="drop_verified=true needs a task with a verifier"):
        ctx = small_spin_context(tmp_path / "text", arrange, drop_verified=True)
        monkeypatch.setattr(ctx.task, "score", lambda prompt, response: None)
        spin.run(ctx)
