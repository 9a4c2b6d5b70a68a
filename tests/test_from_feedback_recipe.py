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
