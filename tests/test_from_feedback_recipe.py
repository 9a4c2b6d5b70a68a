"""`recipe=from_feedback` trains a reward model and DPO on a feedback export's pairs.jsonl."""

import json

import pytest

from conftest import run_cli


@pytest.mark.slow
def test_from_feedback_recipe_runs_on_exported_pairs(tmp_path):
    pairs = tmp_path / "pairs.jsonl"  # the format `python -m rlhf feedback export` writes
    rows = [
        {"prompt": f"Human: what is {i} plus {i}?\n\nAssistant:", "chosen": f" {2 * i}.", "rejected": f" maybe {i}?"}
        for i in range(40)
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    run_cli("run", "recipe=from_feedback", f"task.data={pairs}", "model=tiny", "logger=none", "trainer.progress_bar=false",
            "trainer.num_threads=1", "task.vocab_size=300", "stages.rm.max_steps=3", "stages.dpo.max_steps=3",
            "eval.num_prompts=4", "eval.max_new_tokens=8", f"hydra.run.dir={run}")
    rm_metrics = json.loads((run / "stages" / "00_rm" / "metrics.json").read_text())
    assert "eval/pair_accuracy" in rm_metrics
    assert (run / "stages" / "00_rm" / "reward_model.safetensors").exists()
    assert (run / "stages" / "01_dpo" / "COMPLETE").exists()


def test_from_thumbs_recipe_runs_kto_on_exported_thumbs(cli_in_process, tmp_path):
    ratings = tmp_path / "ratings.jsonl"  # thumbs, as `python -m rlhf feedback export` writes them
    rows = [{"prompt": f"Human: what is {i} plus {i}?\n\nAssistant:", "response": f" {2 * i}." if i % 2 else f" maybe {i}?",
             "rating": "up" if i % 2 else "down"} for i in range(40)]
    ratings.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    cli_in_process("run", "recipe=from_thumbs", f"task.data={ratings}", "model=tiny", "logger=none", "trainer.progress_bar=false",
                   "trainer.num_threads=1", "task.vocab_size=300", "stages.kto.max_steps=3", "stages.kto.batch_size=8",
                   "eval.num_prompts=4", "eval.max_new_tokens=8", f"hydra.run.dir={run}")
    metrics = json.loads((run / "stages" / "00_kto" / "metrics.json").read_text())
    assert (run / "stages" / "00_kto" / "COMPLETE").exists() and "train/reference_point" in metrics
