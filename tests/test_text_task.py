"""The text task: a BPE tokenizer trained once per run and reused, seeded held-out prompts, no verifier."""

from __future__ import annotations

import json
import threading
import time

import pytest

from rlhf.errors import ConfigError
from rlhf.models import BPETokenizer
from rlhf.tasks import TaskConfig, build_task
from rlhf.tasks import text as text_task

TOPICS = ["bread", "the moon", "chess", "tea", "rivers", "bicycles", "jazz", "volcanoes", "owls", "paper", "maps", "glass"]


def hh_rows() -> list[dict]:
    """hh-rlhf style transcript pairs, one multi-turn; plus an identical pair and other row formats."""
    rows = []
    for i, topic in enumerate(TOPICS):
        prompt = f"\n\nHuman: Tell me about {topic}.\n\nAssistant:"
        if i == 0:
            prompt = "\n\nHuman: hi\n\nAssistant: Hello! How can I help?" + prompt
        rows.append({"chosen": prompt + f" Here is a clear answer about {topic}.",
                     "rejected": prompt + f" I will not talk about {topic}."})
    rows.append({"chosen": "\n\nHuman: same\n\nAssistant: same", "rejected": "\n\nHuman: same\n\nAssistant: same"})
    rows.append({"prompt": "Write a haiku.", "response": "Leaves fall on still ponds."})
    rows.append({"text": "Plain text works too."})
    return rows


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in hh_rows()))
    return path


def cfg_for(data, **kw) -> TaskConfig:
    return TaskConfig(name="text", data=str(data), vocab_size=300, num_eval_prompts=4, **kw)


def test_tokenizer_is_trained_once_per_run_and_reused(data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    first = build_task(cfg_for(data), run_dir)
    saved = run_dir / "tokenizer.json"
    assert saved.exists() and not list(run_dir.glob("*.tmp"))
    text = "\n\nHuman: Tell me about owls.\n\nAssistant: Owls hunt at night."
    ids = first.tokenizer.encode(text)
    assert first.tokenizer.decode(ids) == text

    # a resumed run (or another rank) loads the file instead of training a new tokenizer
    monkeypatch.setattr(BPETokenizer, "train", classmethod(lambda *a, **k: pytest.fail("trained twice")))
    second = build_task(cfg_for(data), run_dir)
    assert second.tokenizer.encode(text) == ids
    assert second.tokenizer.vocab_size == first.tokenizer.vocab_size


def test_held_out_prompts_are_fixed_by_the_task_seed(data, tmp_path):
    a = build_task(cfg_for(data), tmp_path / "a")
    b = build_task(cfg_for(data), tmp_path / "b")
    # 4 asked, but at most a fifth of the 13 distinct prompts are held out: 2
    assert a.eval_prompts() == b.eval_prompts() and len(a.eval_prompts()) == 2
    c = build_task(cfg_for(data, seed=7), tmp_path / "c")
    assert set(c.eval_prompts()) != set(a.eval_prompts())
    assert a.score(a.eval_prompts()[0], "anything") is None
    # training prompts never include a held-out one
    import random

    rng = random.Random(0)
    seen = {a.train_prompt(rng) for _ in range(200)}
    assert seen and not seen & set(a.eval_prompts())
    assert all(not a.is_held_out(p) for p in seen)


def test_long_prompts_are_shortened_to_their_last_turns():
    turns = "".join(f"\n\nHuman: question {i} " + "x" * 50 + f"\n\nAssistant: answer {i}" for i in range(40))
    prompt = turns + "\n\nHuman: last one?\n\nAssistant:"
    short = text_task.shorten_prompt(prompt, max_chars=300)
    assert len(short) <= 300 and short.startswith("\n\nHuman:") and prompt.endswith(short)
    assert text_task.shorten_prompt("short", max_chars=300) == "short"


def test_text_task_needs_data(tmp_path):
    with pytest.raises(ConfigError, match="task.data"):
        build_task(TaskConfig(name="text"), tmp_path)


def test_other_ranks_wait_for_rank_zeros_tokenizer(data, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    reference = build_task(cfg_for(data), tmp_path / "rank0")  # what rank 0 will write
    monkeypatch.setattr(BPETokenizer, "train", classmethod(lambda *a, **k: pytest.fail("rank 1 trained")))

    def rank_zero_writes_later():
        time.sleep(0.5)
        reference.tokenizer.save(run_dir / "tokenizer.json")

    writer = threading.Thread(target=rank_zero_writes_later)
    writer.start()
    task = build_task(cfg_for(data), run_dir, rank=1)
    writer.join()
    assert task.tokenizer.encode("owls and tea") == reference.tokenizer.encode("owls and tea")


def test_reward_model_recipe_on_text(data, tmp_path):
    """The README's hh-rlhf recipe, on a tiny file and model: the tokenizer goes with the run and the stage."""
    from hydra import compose, initialize_config_dir

    from conftest import TINY
    from rlhf.config import CONF_DIR, register_configs
    from rlhf.orchestrator import run_recipe
    from rlhf.reward import load_reward_model, model_reward_fn

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[
            "recipe=reward_model", *TINY, f"task.data={data}", f"stages.rm.data={data}", "task.vocab_size=300",
            "task.num_eval_prompts=4", "model.dim=32", "model.depth=1", "model.heads=2",
            "stages.rm.max_steps=3", "stages.rm.batch_size=4", "stages.rm.max_len=24", "eval.max_new_tokens=4",
        ])
    assert cfg.task.name == "text"
    run_dir = tmp_path / "run"
    results = run_recipe(cfg, run_dir)
    metrics = results["rm"]
    assert metrics["data/skipped_rows"] == 3  # the identical pair and the two rows that are not pairs
    assert metrics["data/valid_rows"] == 1 and {"eval/pair_accuracy", "eval/reward_margin"} <= set(metrics)
    stage = run_dir / "stages" / "00_rm"
    assert (stage / "tokenizer.json").read_text() == (run_dir / "tokenizer.json").read_text()
    model, tok = load_reward_model(stage)
    assert model.max_len == 24
    long_prompt = "\n\nHuman: " + "tell me more " * 50 + "\n\nAssistant:"
    assert len(model_reward_fn(model, tok)([long_prompt], [" Sure, " * 30])) == 1
    from rlhf.evaluation import evaluate_stage

    evaluated, _ = evaluate_stage(stage)  # the run's own held-out prompts, as many as it has
    # 4 asked, at most a fifth of the 13 distinct prompts held out: 2
    assert evaluated["prompts"] == 2 and "eval/response_length" in evaluated and "eval/task_score" not in evaluated  # no verifier
    with pytest.raises(ConfigError, match="--prompts 5"):  # past them would be training prompts
        evaluate_stage(stage, num_prompts=5)


def test_a_stage_never_trains_on_the_prompts_held_out_for_evaluation(data, tmp_path, caplog):
    from omegaconf import OmegaConf

    from rlhf.data.jsonl import read_preference_pairs
    from rlhf.stage_context import StageContext

    task = build_task(cfg_for(data), tmp_path)
    ctx = StageContext(slot="dpo", cfg=None, run_cfg=OmegaConf.create({"task": {"name": "text"}}), stage_dir=tmp_path, policy=None,
                       task=task, tokenizer=task.tokenizer, seed=0, logger=None, completed={})
    pairs = read_preference_pairs(data, skip_bad_rows=True)
    kept = ctx.training_rows(pairs)
    # the same file as task.data: the pairs whose prompt is held out are left out
    assert len(pairs) == 12 and len(kept) == sum(not task.is_held_out(p.prompt) for p in pairs) < 12
    assert not any(task.is_held_out(p.prompt) for p in kept)
    # on the built-in task the run says plainly that its evaluation is not of this data
    builtin = build_task(TaskConfig(), tmp_path / "b")
    ctx = StageContext(slot="dpo", cfg=None, run_cfg=OmegaConf.create({"task": {"name": "builtin"}}), stage_dir=tmp_path, policy=None,
                       task=builtin, tokenizer=builtin.tokenizer, seed=0, logger=None, completed={})
    with caplog.at_level("WARNING", logger="rlhf"):
        assert ctx.training_rows(pairs) == pairs
    assert "evaluates on the builtin task's own prompts, not on it" in caplog.text
