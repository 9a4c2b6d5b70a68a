"""Best-of-N generation (`python -m rlhf generate`): ranking, determinism, reward models, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from rlhf import best_of_n
from rlhf.cli import main as cli_main
from rlhf.files import mark_complete
from rlhf.models import ModelConfig, build_model, save_model_files, save_weights
from rlhf.reward import RewardModel, load_reward_model, model_reward_fn, save_reward_model
from rlhf.tasks import TaskConfig
from rlhf.tasks.builtin import BuiltinTask

MODEL = ModelConfig(dim=32, depth=2, heads=2, max_seq_len=64)


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A reward function the CLI imports by dotted path: longer is better."""
    return [float(len(r)) for r in responses]


def write_stage(stage_dir, module) -> None:
    """A complete stage dir holding `module` (an untrained policy or reward model)."""
    tok = BuiltinTask(TaskConfig()).tokenizer
    save_model_files(stage_dir, OmegaConf.structured(MODEL), tok)
    if isinstance(module, RewardModel):
        save_reward_model(module, stage_dir)
    else:
        save_weights(module, stage_dir / "policy.safetensors")
    mark_complete(stage_dir)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    stage = tmp_path_factory.mktemp("policy")
    torch.manual_seed(0)
    write_stage(stage, build_model(MODEL, BuiltinTask(TaskConfig()).tokenizer.vocab_size))
    return stage


def generate(capsys, *args) -> list[dict]:
    assert best_of_n.main(list(args)) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_best_is_the_max_reward_candidate(policy_dir, capsys):
    rows = generate(capsys, "--policy", str(policy_dir), "--reward-fn", "test_best_of_n.length_reward",
                    "--prompt", r"sort: cab\n", "--prompt", r"add: 12+30\n", "-n", "6", "--max-new-tokens", "8")
    assert [r["prompt"] for r in rows] == ["sort: cab\n", "add: 12+30\n"]  # \n decoded
    for row in rows:
        candidates = row["candidates"]
        assert len(candidates) == 6
        assert all(c["reward"] == len(c["response"]) for c in candidates)
        assert [c["reward"] for c in candidates] == sorted((c["reward"] for c in candidates), reverse=True)
        assert row["best"] == candidates[0]["response"]
        assert row["best_reward"] == max(len(c["response"]) for c in candidates)
        assert len({c["response"] for c in candidates}) > 1  # really N different samples


def test_same_seed_same_candidates(policy_dir, capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "sort: zyx\n"}) + "\n")
    args = ["--policy", str(policy_dir), "--reward-fn", "test_best_of_n.length_reward", "--prompts-file", str(prompts),
            "-n", "3", "--max-new-tokens", "6", "--top-p", "0.9"]
    first = generate(capsys, *args, "--seed", "1")
    assert first == generate(capsys, *args, "--seed", "1")
    assert first != generate(capsys, *args, "--seed", "2")


def test_reward_model_scores_the_candidates(policy_dir, capsys, tmp_path):
    torch.manual_seed(1)
    reward_dir = tmp_path / "rm"
    write_stage(reward_dir, RewardModel(build_model(MODEL, BuiltinTask(TaskConfig()).tokenizer.vocab_size)))
    (row,) = generate(capsys, "--policy", str(policy_dir), "--reward", str(reward_dir), "--prompt", r"add: 1+2\n",
                      "-n", "4", "--max-new-tokens", "5")
    model, tok = load_reward_model(reward_dir)
    want = model_reward_fn(model, tok)([row["prompt"]] * 4, [c["response"] for c in row["candidates"]])
    assert [c["reward"] for c in row["candidates"]] == pytest.approx(want, abs=1e-5)
    assert row["best_reward"] == max(want) == pytest.approx(row["candidates"][0]["reward"])


def test_bad_prompts_file_row_gives_a_one_line_error(policy_dir, capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "sort: ab\\n"}\n{"text": "no prompt here"}\n')
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["generate", "--policy", str(policy_dir), "--reward-fn", "test_best_of_n.length_reward",
                  "--prompts-file", str(prompts)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {prompts}:2: ") and "\n" not in err


@pytest.mark.parametrize(
    "args, culprit",
    [(["--reward-fn", "no_such_module.fn"], "no_such_module.fn"), (["--reward", "/nonexistent/rm"], "/nonexistent/rm"),
     (["--reward-fn", "test_best_of_n.length_reward", "-n", "0"], "-n 0")],
)
def test_bad_arguments_name_the_culprit(policy_dir, capsys, args, culprit):
    with pytest.raises(SystemExit):
        cli_main(["generate", "--policy", str(policy_dir), "--prompt", "sort: ab\\n", *args])
    assert culprit in capsys.readouterr().err


def test_unescape():
    assert best_of_n.unescape(r"a\nb\tc\\n") == "a\nb\tc\\n"
    assert best_of_n.unescape(r"C:\path é") == r"C:\path é"
