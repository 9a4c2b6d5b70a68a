"""The offline DPO stage and the shared preference batch code: log-prob parity (padding,
precomputed vs live reference), a frozen reference, hand-computed losses, resume, and
tiny end-to-end CLI runs (one process and 2-process DDP)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from rlhf.config import typed_run_config, typed_stage_config
from rlhf.data.examples import PreferencePair, SFTExample
from rlhf.models import CharTokenizer, ModelConfig, build_model
from rlhf.preference_batch import (
    EncodedPair,
    PreferenceLossConfig,
    collate_pairs,
    encode_pair,
    pair_logprobs,
    preference_loss,
    reference_logprobs,
)
from rlhf.stage_context import StageContext
from rlhf.stages import dpo
from rlhf.tasks import TaskConfig, build_task
from rlhf.tasks.builtin import ALPHABET
from rlhf.training import mix_seed

REPO = Path(__file__).resolve().parents[1]
TINY = {"dim": 32, "depth": 2, "heads": 2, "max_seq_len": 64, "tie_embedding": True}
EASY = {"sort_min_len": 3, "sort_max_len": 5, "add_min_digits": 1, "add_max_digits": 2}


def make_ctx(stage_dir: Path, kind: str = "dpo", initial: dict | None = None, **stage) -> StageContext:
    cfg = typed_run_config(
        OmegaConf.create(
            {
                "order": ["s"],
                "stages": {"s": {"kind": kind, **stage}},
                "model": TINY,
                "task": EASY,
                "logger": {"kind": "none"},
                "trainer": {"accelerator": "cpu", "progress_bar": False},
                "eval": {"num_prompts": 8},
            }
        )
    )
    task = build_task(cfg.task, stage_dir)
    torch.manual_seed(0)
    policy = build_model(cfg.model, task.tokenizer.vocab_size)
    if initial is not None:
        policy.load_state_dict(initial)
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(
        slot="s", cfg=typed_stage_config("s", cfg.stages.s), run_cfg=cfg, stage_dir=stage_dir, policy=policy,
        task=task, tokenizer=task.tokenizer, seed=mix_seed(0, "s"), logger=None, completed={},
    )


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------- log-probs and batches


def test_padding_gives_the_same_logprobs_as_unpadded_rows():
    torch.manual_seed(0)
    model = build_model(ModelConfig(**TINY), 20).eval()
    pairs = [
        EncodedPair([2, 3, 4], [5, 1], [6, 7, 8, 9, 1]),
        EncodedPair([2, 3, 4, 5, 6, 7], [8, 9, 10, 1], [11, 1]),
        EncodedPair([3], [4, 5, 6, 7, 8, 9, 10, 1], [12, 13, 1]),
    ]
    with torch.no_grad():
        sums, lengths = pair_logprobs(model, *collate_pairs(pairs, pad_id=0))
        for i, pair in enumerate(pairs):
            alone, alone_len = pair_logprobs(model, *collate_pairs([pair], pad_id=0))
            assert torch.allclose(sums[[i, i + 3]], alone, atol=1e-5)
            assert lengths[[i, i + 3]].tolist() == alone_len.tolist() == [len(pair.chosen), len(pair.rejected)]
        # the precompute path sorts by length and batches differently; same numbers, input order
        ref = reference_logprobs(model, pairs, pad_id=0, batch_size=2)
    assert torch.allclose(ref, sums.view(2, -1).T, atol=1e-5)


def test_encode_pair_appends_eos_and_truncates_the_prompt_start_first():
    task = build_task(TaskConfig(), Path("."))
    tok = task.tokenizer
    pair = encode_pair(PreferencePair("abcdefgh", "xy", "z"), tok, max_length=64)
    assert pair.chosen == tok.encode("xy") + [tok.eos_id] and pair.rejected == tok.encode("z") + [tok.eos_id]
    short = encode_pair(PreferencePair("abcdefgh", "xy", "z"), tok, max_length=6)
    assert short.prompt == tok.encode("defgh")[-3:] and short.chosen == pair.chosen  # 3 + 3 <= 6


# ------------------------------------------------------------------------------- losses


def _loss(**fields):
    cfg = PreferenceLossConfig(**{"beta": 1.0, "nll_weight": 0.5, **fields})
    sums, lengths = torch.tensor([-2.0, -4.0]), torch.tensor([2.0, 4.0])
    ref = torch.tensor([[-3.0, -3.0]])
    return preference_loss(cfg, sums, lengths, ref)


def test_preference_loss_hand_computed():
    # h = (-2 - -3) - (-4 - -3) = 2; -logsigmoid(2) = log(1 + e^-2) = 0.126928; NLL = 2 / 2 = 1
    loss, metrics = _loss()
    assert loss.item() == pytest.approx(0.126928 + 0.5, abs=1e-5)
    assert metrics["rewards/margin"].item() == pytest.approx(2.0) and metrics["rewards/accuracy"].item() == 1.0
    assert metrics["logps/chosen"].item() == -2.0
    # per-token averages: (-1 - -1.5) - (-1 - -0.75) = 0.75; log(1 + e^-0.75) = 0.386871
    assert _loss(average_logprobs=True)[0].item() == pytest.approx(0.386871 + 0.5, abs=1e-5)
    # IPO on per-token averages by default, as TRL: (0.75 - 1 / (2 beta))^2 = 0.25^2
    assert _loss(loss="ipo")[0].item() == pytest.approx(0.0625 + 0.5, abs=1e-5)
    # on sums only when asked: (2 - 0.5)^2
    assert _loss(loss="ipo", average_logprobs=False)[0].item() == pytest.approx(2.25 + 0.5, abs=1e-5)
    # SimPO is reference-free on averages: -logsigmoid(1 * (-1 - -1) - 0.5) = log(1 + e^0.5) = 0.974077
    assert _loss(loss="simpo", simpo_gamma=0.5)[0].item() == pytest.approx(0.974077 + 0.5, abs=1e-5)
    # RRHF: relu(-1 - -1) = 0, so only the NLL term is left
    assert _loss(loss="rrhf")[0].item() == pytest.approx(0.5, abs=1e-6)
    assert _loss(nll_weight=0.0)[0].item() == pytest.approx(0.126928, abs=1e-5)


# ---------------------------------------------------------------------- the stage, in-process


def test_reference_stays_unchanged_while_the_policy_trains(tmp_path, monkeypatch):
    refs = []
    real = dpo.starting_reference
    monkeypatch.setattr(dpo, "starting_reference", lambda *a: refs.append(real(*a)) or refs[-1])
    ctx = make_ctx(tmp_path, max_steps=3, batch_size=4, lr=1e-2, precompute_reference=False, eval_every=0)
    before = snapshot(ctx.policy)
    dpo.run(ctx)
    (ref,) = refs
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())  # bit-identical
    assert any(not torch.equal(v, before[k]) for k, v in ctx.policy.state_dict().items())
    assert not any(p.requires_grad for p in ref.parameters())


def test_precomputed_reference_gives_the_same_training_as_live(tmp_path):
    results = {}
    for precompute in (True, False):
        ctx = make_ctx(tmp_path / str(precompute), max_steps=3, batch_size=4, lr=1e-2, precompute_reference=precompute, eval_every=0)
        results[precompute] = (dpo.run(ctx).metrics, snapshot(ctx.policy))
    (m_pre, w_pre), (m_live, w_live) = results[True], results[False]
    assert "train/reference_precompute_s" in m_pre
    for key in ("train/loss", "train/rewards/chosen", "train/rewards/margin"):
        assert m_pre[key] == pytest.approx(m_live[key], abs=1e-5)
    assert all(torch.allclose(w_pre[k], w_live[k], atol=1e-5) for k in w_pre)


def test_resume_mid_stage_matches_an_uninterrupted_run(tmp_path):
    flat = {"lr": 1e-2, "warmup_steps": 1, "min_lr_ratio": 1.0, "batch_size": 4, "eval_every": 0}  # constant lr
    initial = snapshot(make_ctx(tmp_path / "init").policy)
    straight = make_ctx(tmp_path / "a", initial=initial, max_steps=4, **flat)
    dpo.run(straight)
    dpo.run(make_ctx(tmp_path / "b", initial=initial, max_steps=2, **flat))  # "crashes" after step 2
    assert (tmp_path / "b" / "checkpoints" / "last.ckpt").exists()
    resumed = make_ctx(tmp_path / "b", initial=initial, max_steps=4, **flat)
    dpo.run(resumed)
    a, b = snapshot(straight.policy), snapshot(resumed.policy)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_file_data_and_reference_free_loss(tmp_path):
    rows = [{"prompt": "sort: cba\n", "chosen": "abc", "rejected": "acb"}, {"chosen": "\n\nHuman: hi\n\nAssistant: 1", "rejected": "\n\nHuman: hi\n\nAssistant: 2"}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = make_ctx(tmp_path / "s", data=str(data), loss="simpo", max_steps=2, batch_size=2, eval_every=0)
    metrics = dpo.run(ctx).metrics
    assert math.isfinite(metrics["train/loss"]) and "train/reference_precompute_s" not in metrics


def test_lora_policy_gets_a_plain_reference_of_its_base_weights(tmp_path):
    pytest.importorskip("peft")
    from rlhf.models import prepare_trainable

    ctx = make_ctx(tmp_path, max_steps=2, batch_size=4, lr=1e-2, eval_every=0, lora={"enabled": True, "rank": 2})
    ctx.policy = prepare_trainable(ctx.policy, ctx.cfg)
    metrics = dpo.run(ctx).metrics
    # fresh adapters are zero: the policy starts equal to its reference, so the first margins are ~0
    assert math.isfinite(metrics["train/loss"]) and "train/reference_precompute_s" in metrics


def test_bad_loss_name_is_a_config_error(tmp_path):
    from rlhf.errors import ConfigError

    with pytest.raises(ConfigError, match="loss='dpo2'"):
        dpo.run(make_ctx(tmp_path, loss="dpo2"))


# ---------------------------------------------------------------------------- CLI, end to end


def cli(run_dir: Path, *overrides: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "rlhf", "run", "model=tiny", "task=easy", "logger=none", "eval.num_prompts=8",
           "trainer.progress_bar=false", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_cli_dpo_recipe_end_to_end(tmp_path):
    cli(tmp_path, "recipe=dpo", "stages.sft.max_steps=5", "stages.dpo.max_steps=4", "stages.dpo.batch_size=8", "stages.dpo.eval_every=2")
    stage = tmp_path / "stages" / "01_dpo"
    assert (stage / "COMPLETE").exists() and (stage / "policy.safetensors").exists()
    metrics = json.loads((stage / "metrics.json").read_text())
    for key in ("eval/task_score", "train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/rewards/margin",
                "train/rewards/accuracy", "train/logps/chosen", "train/reference_precompute_s"):
        assert key in metrics, key
    during = [json.loads(line) for line in (stage / "eval_during.jsonl").read_text().splitlines()]
    assert [row["step"] for row in during] == [2] and "eval/task_score" in during[0]
    assert not (stage / "checkpoints").exists()


@pytest.mark.slow
def test_cli_dpo_under_two_process_ddp(tmp_path):
    cli(tmp_path, "recipe=dpo", "trainer=ddp_cpu", "stages.sft.max_steps=2", "stages.dpo.max_steps=3", "stages.dpo.batch_size=8",
        "stages.dpo.eval_every=2", "stages.dpo.loss=ipo", "stages.dpo.beta=0.5", timeout=300)
    metrics = json.loads((tmp_path / "stages" / "01_dpo" / "metrics.json").read_text())
    assert math.isfinite(metrics["train/loss"]) and "eval/task_score" in metrics


def test_shared_prompt_packing_gives_the_two_row_log_probs_and_gradients():
    """prompt | chosen | rejected in one row (the rejected tokens see the prompt, not the chosen
    ones; their positions restart after the prompt) equals the plain two-row layout."""
    from rlhf.models import CausalLM, ModelConfig
    from rlhf.preference_batch import EncodedPair, collate_pairs, pack_pairs, pair_logprobs, shared_prompt_forward

    torch.manual_seed(0)
    model = CausalLM(ModelConfig(dim=32, depth=2, heads=2), 30)
    pairs = [
        EncodedPair([3, 4, 5, 6], [7, 8, 9, 1], [10, 11, 1]),
        EncodedPair([5, 6], [7, 1], [12, 13, 14, 15, 1]),  # rejected longer than chosen
        EncodedPair([3, 4, 5, 6, 7, 8, 9], [1], [2, 1]),
    ]
    plain, plain_lengths = pair_logprobs(model, *collate_pairs(pairs, 0))
    plain.sum().backward()
    plain_grad = model.net.to_logits.weight.grad.clone()
    model.zero_grad()
    packed, packed_lengths = shared_prompt_forward(model, *pack_pairs(pairs, 0))
    packed.sum().backward()
    assert torch.allclose(packed, plain, atol=1e-5) and torch.equal(packed_lengths, plain_lengths)
    assert torch.allclose(model.net.to_logits.weight.grad, plain_grad, atol=1e-5)


def test_an_empty_prompt_opens_with_one_token_and_every_layout_agrees():
    """No token before the response would leave its first token unscored: an empty prompt is
    one BOS (our tokenizers: the EOS) in SFT, both DPO layouts and generation alike."""
    from rlhf.models import CausalLM, ModelConfig
    from rlhf.preference_batch import pack_pairs, shared_prompt_forward
    from rlhf.sampling import encode_examples, encode_prompt

    tok = CharTokenizer(ALPHABET)
    assert encode_prompt(tok, "") == [tok.eos_id] and encode_prompt(tok, "ab") == tok.encode("ab")
    pair = encode_pair(PreferencePair("", "ab", "c"), tok, max_length=64)
    assert pair.prompt == [tok.eos_id] and pair.chosen == tok.encode("ab") + [tok.eos_id]
    # SFT: every response token, the first included, is scored
    tokens, mask = encode_examples(tok, [SFTExample("", "ab")])
    assert tokens[0, 0].item() == tok.eos_id and mask[0].tolist() == [False, True, True, True]
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(dim=32, depth=2, heads=2), tok.vocab_size)
    other = encode_pair(PreferencePair("sort: ba\n", "ab", "ba"), tok, max_length=64)
    plain, _ = pair_logprobs(model, *collate_pairs([pair, other], tok.pad_id))
    packed, _ = shared_prompt_forward(model, *pack_pairs([pair, other], tok.pad_id))
    assert torch.allclose(packed, plain, atol=1e-5)
    # the scored tokens are the response's own: "ab" + EOS and "c" + EOS
    assert plain.shape == (4,) and all(v < 0 for v in plain.tolist())
    with pytest.raises(ValueError, match="at least one prompt token"):
        pack_pairs([EncodedPair([], [5, 1], [6, 1])], tok.pad_id)


@pytest.mark.parametrize("share_prompt", [True, False])
def test_dpo_on_empty_prompts_starts_at_ln2_in_either_layout(tmp_path, share_prompt):
    # the policy equals its reference at step 0, so the DPO loss is ln 2 whatever the layout
    # (it was 1.0252 with share_prompt false: the reference had been precomputed packed)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": "", "chosen": c, "rejected": r}) + "\n" for c, r in [("ab", "c"), ("abc", "ba")]))
    ctx = make_ctx(tmp_path / "s", data=str(data), batch_size=2, max_steps=1, nll_weight=0.0, eval_every=0, share_prompt=share_prompt)
    metrics = dpo.run(ctx).metrics
    assert metrics["train/preference_loss"] == pytest.approx(math.log(2), abs=1e-5)
