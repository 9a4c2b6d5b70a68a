"""The reward-model stage: pooling, truncation, built-in and file data, pairs and binned ratings."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file

from conftest import TINY
from rlhf.config import CONF_DIR, register_configs
from rlhf.errors import ConfigError
from rlhf.models import ModelConfig, build_model
from rlhf.reward import RewardModel, load_reward_model, model_reward_fn, truncate
from rlhf.sampling import join_prompt_response
from rlhf.stages import reward_model as rm_stage
from rlhf.tasks import TaskConfig
from rlhf.tasks.builtin import BuiltinTask


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_configs()


def run_in_process(tmp_path, *overrides):
    """Compose the real configs and run the recipe here (no subprocess: much faster on 2 cores)."""
    from rlhf.orchestrator import run_recipe

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[*TINY, *overrides])
    run_dir = tmp_path / "run"
    return run_recipe(cfg, run_dir), run_dir


def tiny_reward_model(num_bins: int = 1) -> RewardModel:
    torch.manual_seed(0)
    return RewardModel(build_model(ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64), vocab_size=20), num_bins).eval()


# ----------------------------------------------------------------------------- pooling and rows


@pytest.mark.parametrize("num_bins", [1, 5])
def test_reward_reads_the_last_response_token_so_padding_changes_nothing(num_bins):
    model = tiny_reward_model(num_bins)
    prompts, responses = [[2, 3, 4], [5, 6]], [[7, 8, 1], [9, 1]]
    tokens, mask = join_prompt_response(prompts, responses, pad_id=0)
    with torch.no_grad():
        batched = model(tokens, mask)
        # one by one, unpadded
        alone = torch.cat([model(*join_prompt_response([p], [r], pad_id=0)) for p, r in zip(prompts, responses)])
        # extra padding after the last response token, and junk in the padding
        wide = torch.cat([tokens, torch.full((2, 5), 0)], dim=1)
        wide_mask = torch.cat([mask, torch.zeros((2, 5), dtype=torch.bool)], dim=1)
        junk = wide.clone()
        junk[:, tokens.shape[1] :] = 11
        padded, junked = model(wide, wide_mask), model(junk, wide_mask)
    torch.testing.assert_close(batched, alone)
    torch.testing.assert_close(padded, alone)
    torch.testing.assert_close(junked, alone)
    # but the last response token itself matters
    other = tokens.clone()
    other[1, 3] = 12  # row 1 is [5, 6, 9, 1, pad]: position 3 is its EOS
    with torch.no_grad():
        assert model(other, mask)[1] != batched[1]


def test_truncate_keeps_the_prompt_end_and_the_response_start():
    prompt, response = list(range(100, 150)), list(range(200, 260))
    p, r = truncate(prompt, response, max_len=33)
    assert len(p) + len(r) + 1 <= 33
    assert r == response[: len(r)] and len(r) >= 16  # at least half the budget for the response
    assert p == prompt[-len(p) :]
    # a short prompt leaves the rest of the budget to the response
    p, r = truncate([1, 2], response, max_len=33)
    assert p == [1, 2] and len(r) == 30
    # short rows are untouched; no max_len means no cut
    assert truncate([1, 2], [3, 4], 33) == ([1, 2], [3, 4])
    assert truncate(prompt, response, None) == (prompt, response)


def test_model_reward_fn_cuts_long_rows_like_training():
    model = tiny_reward_model()
    model.max_len = 12

    class Tok:
        pad_id, eos_id = 0, 1

        def encode(self, text):
            return [2 + (ord(c) % 18) for c in text]

    long_prompt = "abcdefghijklmnopqrstuvwxyz"
    tok = Tok()
    got = model_reward_fn(model, tok)([long_prompt], ["hello world and more"])[0]
    p, r = truncate(tok.encode(long_prompt), tok.encode("hello world and more"), 12)
    with torch.no_grad():
        want = model(*join_prompt_response([p], [r + [1]], 0)).item()
    assert got == pytest.approx(want, abs=1e-6)


def test_builtin_graded_pairs_rank_by_the_verifier():
    task = BuiltinTask(TaskConfig())
    cfg = rm_stage.Config(graded_fraction=1.0)
    rng = random.Random(0)
    for _ in range(50):
        prompt = task.train_prompt(rng)
        chosen, rejected = rm_stage.graded_pair(task, prompt, rm_stage.answer(prompt), rng, cfg.max_edits)
        assert task.score(prompt, chosen) > task.score(prompt, rejected)


def test_policy_pairs_come_from_one_prompts_samples_better_first():
    pool = [("p1", "a", 0.5), ("p1", "b", 0.5), ("p1", "c", 1.0), ("p2", "x", 0.0), ("p2", "y", 0.0), ("p2", "z", 0.0)]
    rng = random.Random(0)
    pairs = [rm_stage.policy_pair(pool, 3, rng) for _ in range(30)]
    # p2's samples all score the same: only p1 gives pairs (or, rarely, none is found)
    assert {pair for pair in pairs if pair} <= {("p1", "c", "a"), ("p1", "c", "b")}
    assert any(pairs)


def test_spearman():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rm_stage.spearman(x, x * 10) == pytest.approx(1.0)
    assert rm_stage.spearman(x, -x) == pytest.approx(-1.0)
    assert rm_stage.spearman(x, torch.ones(4)) == 0.0
    # ties share ranks: [1, 1, 2, 2] vs [1, 2, 3, 4] -> ranks [0.5, 0.5, 2.5, 2.5] vs [0, 1, 2, 3]
    assert rm_stage.spearman(torch.tensor([1.0, 1.0, 2.0, 2.0]), x) == pytest.approx(2 / (5**0.5), abs=1e-6)


@pytest.mark.parametrize(
    "fields, culprit",
    [({"num_bins": 5}, "data_format=ratings"), ({"data_format": "ratings"}, "num_bins"), ({"init": "magic"}, "init"),
     ({"center_rewards_coefficient": -0.01}, "center_rewards_coefficient")],
)
def test_inconsistent_settings_fail_early(fields, culprit):
    with pytest.raises(ConfigError, match=f"stages.rm: .*{culprit}"):
        rm_stage.check_config(rm_stage.Config(**fields), "rm")



def test_reward_centering_adds_its_penalty_to_the_pair_loss(monkeypatch):
    from rlhf.losses.preference import bradley_terry_loss, reward_centering_penalty

    model = tiny_reward_model()
    tokens, mask = join_prompt_response([[2, 3], [4], [2, 3], [4]], [[7, 1], [8, 9, 1], [9, 1], [7, 1]], pad_id=0)
    with torch.no_grad():
        chosen, rejected = model(tokens, mask).chunk(2)
    losses = {}
    for coef in (0.0, 0.5):
        module = rm_stage.RewardModule(model, rm_stage.Config(center_rewards_coefficient=coef), "rm")
        monkeypatch.setattr(module, "log", lambda *a, **k: None)
        with torch.no_grad():
            losses[coef] = module.training_step({"tokens": tokens, "mask": mask}, 0).item()
    assert losses[0.0] == pytest.approx(bradley_terry_loss(chosen, rejected).item(), abs=1e-6)
    assert losses[0.5] - losses[0.0] == pytest.approx(0.5 * reward_centering_penalty(chosen, rejected).item(), abs=1e-5)
    assert losses[0.5] > losses[0.0]

# ----------------------------------------------------------------------------- whole stages


@pytest.mark.slow
def test_sft_then_reward_model_end_to_end(cli, tmp_path):
    run = tmp_path / "run"
    cli("run", "recipe=sft_rm", *TINY, "stages.sft.max_steps=4", "stages.rm.max_steps=4", "stages.rm.batch_size=8",
        "stages.rm.policy_fraction=0.3", "stages.rm.policy_pool=8", f"hydra.run.dir={run}")
    sft, rm = run / "stages" / "00_sft", run / "stages" / "01_rm"
    assert (rm / "COMPLETE").exists()
    assert {"reward_model.safetensors", "reward_model.yaml", "policy.safetensors", "metrics.json"} <= {p.name for p in rm.iterdir()}
    metrics = json.loads((rm / "metrics.json").read_text())
    for key in ("eval/pair_accuracy", "eval/reward_margin", "eval/verifier_agreement", "eval/verifier_correlation",
                "eval/best_of_k_score", "eval/sample_score"):
        assert key in metrics
    assert 0.0 <= metrics["eval/pair_accuracy"] <= 1.0 and -1.0 <= metrics["eval/verifier_correlation"] <= 1.0
    # the policy passes through unchanged
    before, after = load_file(str(sft / "policy.safetensors")), load_file(str(rm / "policy.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the saved reward model loads and scores
    model, tok = load_reward_model(rm)
    assert model.num_bins == 1 and model.max_len == 256
    rewards = model_reward_fn(model, tok)(["sort: cba\n", "sort: cba\n"], ["abc", "acb"])
    assert len(rewards) == 2 and all(isinstance(r, float) for r in rewards)


def test_binned_ratings_from_a_file(tmp_path):
    rng = random.Random(0)
    task = BuiltinTask(TaskConfig())
    rows = []
    for _ in range(40):
        prompt = task.train_prompt(rng)
        correct = rm_stage.answer(prompt)
        response = correct if rng.random() < 0.3 else rm_stage.near_miss(task, prompt, correct, rng, 4)
        rows.append({"prompt": prompt, "response": response, "rating": 1 + round(4 * task.score(prompt, response))})
    data = tmp_path / "ratings.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results, run_dir = run_in_process(
        tmp_path, "recipe=sft_rm", "order=[rm]", f"stages.rm.data={data}", "stages.rm.data_format=ratings",
        "stages.rm.num_bins=5", "stages.rm.max_steps=3", "stages.rm.batch_size=8", "stages.rm.valid_fraction=0.25",
    )
    metrics = results["rm"]
    assert metrics["data/train_rows"] == 30 and metrics["data/valid_rows"] == 10
    assert {"eval/pair_accuracy", "eval/reward_margin", "eval/rating_accuracy"} <= set(metrics)
    model, tok = load_reward_model(run_dir / "stages" / "00_rm")
    assert model.num_bins == 5
    rewards = model_reward_fn(model, tok)([r["prompt"] for r in rows[:4]], [r["response"] for r in rows[:4]])
    assert all(0.0 <= r <= 1.0 for r in rewards)  # the expected bin value


def test_built_in_task_ratings_and_scratch_init(tmp_path):
    results, _ = run_in_process(
        tmp_path, "recipe=sft_rm", "order=[rm]", "stages.rm.data_format=ratings", "stages.rm.num_bins=6",
        "stages.rm.init=scratch", "stages.rm.max_steps=2", "stages.rm.batch_size=8", "task.num_eval_prompts=10",
        "stages.rm.policy_fraction=0.5", "stages.rm.policy_pool=8",
    )
    metrics = results["rm"]
    for key in ("eval/pair_accuracy", "eval/verifier_agreement", "eval/verifier_correlation", "eval/rating_accuracy"):
        assert key in metrics


def test_bad_data_row_names_file_and_line(tmp_path):
    """The CLI prints such a DataError as one `error: ...` line (tests/test_cli.py, tests/test_best_of_n.py)."""
    from rlhf.errors import DataError

    data = tmp_path / "pairs.jsonl"
    data.write_text('{"prompt": "sort: ba\\n", "chosen": "ab", "rejected": "ba"}\n{"prompt": "sort: ba\\n", "chosen": "ab"}\n')
    with pytest.raises(DataError, match="^" + re.escape(f"{data}:2: missing key 'rejected'")):
        run_in_process(tmp_path, "recipe=sft_rm", "order=[rm]", f"stages.rm.data={data}")
    assert not (tmp_path / "run" / "stages" / "00_rm" / "COMPLETE").exists()
