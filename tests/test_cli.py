"""End-to-end CLI runs: artifacts, bad input, sweeps, 2-process DDP."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY


def test_sft_run_writes_a_complete_stage(cli, tmp_path):
    run = tmp_path / "run"
    cli("run", "recipe=sft", *TINY, "stages.sft.max_steps=6", f"hydra.run.dir={run}")
    stage = run / "stages" / "00_sft"
    assert sorted(p.name for p in stage.iterdir()) == [
        "COMPLETE", "config.yaml", "metrics.json", "model.yaml", "policy.safetensors", "samples.jsonl", "tokenizer.json",
    ]
    metrics = json.loads((stage / "metrics.json").read_text())
    assert {"eval/task_score", "eval/exact_match", "eval/response_length"} <= set(metrics)
    assert 0.0 <= metrics["eval/task_score"] <= 1.0
    assert (run / "config.yaml").exists()
    assert load_file(str(stage / "policy.safetensors"))


def test_evaluate_command_repeats_the_stage_evaluation_and_scores_more_prompts(cli_in_process, tmp_path):
    run = tmp_path / "run"
    cli_in_process("run", "recipe=sft", *TINY, "stages.sft.max_steps=6", "eval.num_prompts=40", "task.num_eval_prompts=40", f"hydra.run.dir={run}")
    stage = run / "stages" / "00_sft"
    saved = json.loads((stage / "metrics.json").read_text())
    same, more = (json.loads(cli_in_process("evaluate", str(stage), *extra).stdout) for extra in ([], ["--prompts", "90"]))
    assert same["prompts"] == 40 and same["eval/task_score"] == pytest.approx(saved["eval/task_score"])
    assert more["prompts"] == 90
    from rlhf.tasks import TaskConfig
    from rlhf.tasks.builtin import BuiltinTask

    prompts = BuiltinTask(TaskConfig(num_eval_prompts=90)).eval_prompts()
    counts = {f: sum(p.startswith(f) for p in prompts) for f in ("sort", "add")}
    assert {k for k in more if k.startswith("eval/task_score/")} == {"eval/task_score/sort", "eval/task_score/add"}
    weighted = sum(counts[f] * more[f"eval/task_score/{f}"] for f in counts) / 90
    assert weighted == pytest.approx(more["eval/task_score"])
    # a paired comparison with itself: the baseline's line first, then a zero difference
    base_line, self_line = (json.loads(line) for line in cli_in_process("evaluate", str(stage), "--baseline", str(stage)).stdout.splitlines())
    assert base_line["eval/task_score"] == self_line["eval/task_score"] == same["eval/task_score"]
    assert self_line["vs_baseline"] == {"difference": 0.0, "standard_error": 0.0}
    proc = cli_in_process("evaluate", str(run / "stages"), check=False)
    assert proc.returncode == 2 and "stages" in proc.stderr and "Traceback" not in proc.stderr


def test_paired_difference_against_hand_computed_numbers():
    from rlhf.errors import ConfigError
    from rlhf.evaluation import paired_difference

    # differences 0.5, 0, -0.5, 1: mean 0.25, squared deviations 1/16 + 1/16 + 9/16 + 9/16 = 1.25,
    # sample sd sqrt(1.25 / 3), standard error sd / sqrt(4)
    out = paired_difference([1.0, 0.5, 0.0, 1.0], [0.5, 0.5, 0.5, 0.0])
    assert out["difference"] == pytest.approx(0.25) and out["standard_error"] == pytest.approx((1.25 / 3) ** 0.5 / 2)
    with pytest.raises(ConfigError, match="baseline"):
        paired_difference([1.0, None], [0.0, 0.0])


def test_wandb_offline_run_per_stage(cli, tmp_path):
    run = tmp_path / "run"
    cli("run", "recipe=pretrain_sft", *[a for a in TINY if not a.startswith("logger")], "logger=wandb",
        "stages.pretrain.max_steps=2", "stages.sft.max_steps=2", f"hydra.run.dir={run}")
    runs = sorted((run / "wandb").glob("offline-run-*"))
    assert len(runs) == 2  # one wandb run per stage


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["recipe=no_such_recipe"], "no_such_recipe"),
        (["recipe=sft", "order=[sft,ghost]"], "ghost"),
        (["recipe=sft", "stages.sft.lr=fast"], "lr"),
        (["recipe=sft", "stages.sft.betaa=1"], "betaa"),
        (["recipe=sft", "stages.sft.kind=alchemy"], "alchemy"),
        (["resume=/nonexistent/run"], "/nonexistent/run"),
        (["recipe=sft", "task.families=[poetry]"], "families"),
        # checked before the first stage trains: no SFT is lost to a mistake in a later stage
        (["recipe=dpo", "stages.dpo.beta=0"], "stages.dpo.beta must be > 0"),
        (["recipe=sft", "stages.sft.batch_size=0"], "stages.sft.batch_size must be >= 1, got 0"),
        (["recipe=sft", "stages.sft.lr=-1"], "stages.sft.lr must be a finite number > 0, got -1"),
        (["recipe=sft", "stages.sft.max_steps=-3"], "stages.sft.max_steps must be >= 1, got -3"),
        (["recipe=spin", "stages.spin_iter2.previous_slot=spin_iter3"], "stages.spin_iter2.previous_slot='spin_iter3'"),
        pytest.param(["recipe=sft", "trainer=gpu"], "trainer.accelerator=gpu: no CUDA GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
    ],
)
def test_bad_input_gives_one_clear_error(cli_in_process, tmp_path, args, culprit):
    run = tmp_path / "run"
    proc = cli_in_process("run", *args, *TINY, f"hydra.run.dir={run}", check=False)
    assert proc.returncode != 0
    assert culprit in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (run / "stages").exists() or not any((run / "stages").rglob("policy.safetensors"))


def test_non_finite_loss_stops_with_a_clear_error(cli_in_process, tmp_path):
    run = tmp_path / "run"
    proc = cli_in_process("run", "recipe=sft", *TINY, "stages.sft.lr=1e12", "stages.sft.warmup_steps=1", "stages.sft.max_steps=30",
                          f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2
    assert "error: stage 'sft': loss is" in proc.stderr
    assert not (run / "stages" / "00_sft" / "COMPLETE").exists()
    # the stage is not complete: resume=DIR may lower its learning rate, and the record says so
    cli_in_process("run", f"resume={run}", "stages.sft.lr=1e-3", "stages.sft.max_steps=2")
    assert (run / "stages" / "00_sft" / "COMPLETE").exists()
    assert "lr: 0.001" in (run / "config.yaml").read_text()
    # once complete, its settings are fixed
    proc = cli_in_process("run", f"resume={run}", "stages.sft.lr=1e-4", check=False)
    assert proc.returncode == 2 and "stages.sft.lr: 0.001 -> 0.0001" in proc.stderr


def test_sweep_runs_each_value(cli, tmp_path):
    sweep = tmp_path / "sweep"
    cli("run", "-m", "recipe=sft", *TINY, "stages.sft.max_steps=2,3", f"hydra.sweep.dir={sweep}")
    configs = sorted(sweep.glob("*/stages/00_sft/config.yaml"))
    assert len(configs) == 2
    assert {"max_steps: 2", "max_steps: 3"} <= {line for c in configs for line in c.read_text().splitlines()}


@pytest.mark.slow
def test_sft_under_two_process_ddp(cli, tmp_path):
    run = tmp_path / "run"
    proc = cli("run", "recipe=sft", *TINY, "trainer=ddp_cpu", "stages.sft.max_steps=4", f"hydra.run.dir={run}")
    assert "GLOBAL_RANK: 1" in proc.stdout + proc.stderr  # really two processes
    stage = run / "stages" / "00_sft"
    assert (stage / "COMPLETE").exists()
    # rank 1 wrote no artifacts of its own: no stray temp files, one set of files
    assert not list(run.rglob("*.tmp"))
    assert json.loads((stage / "metrics.json").read_text())["eval/task_score"] >= 0


def test_a_run_dir_continues_only_with_its_own_settings(cli_in_process, tmp_path):
    run = tmp_path / "run"
    command = ["run", "recipe=sft", *TINY, "stages.sft.max_steps=2", "stages.sft.batch_size=8", "task=easy"]
    cli_in_process(*command, f"hydra.run.dir={run}")
    record = (run / "config.yaml").read_text()
    # the same command again (a requeued job): the run is continued, here already complete
    proc = cli_in_process(*command, f"hydra.run.dir={run}")
    assert "stage sft: complete on disk, skipped" in proc.stdout + proc.stderr
    # other settings into the same dir: an error naming the changed key; the record is untouched
    proc = cli_in_process(*command, "stages.sft.max_steps=7", f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "stages.sft.max_steps: 2 -> 7" in proc.stderr.strip().splitlines()[-1]
    assert (run / "config.yaml").read_text() == record
    # resume=DIR with the command the run was started with (config groups and all) is accepted
    cli_in_process("run", f"resume={run}", *command[1:])
    proc = cli_in_process("run", f"resume={run}", *command[1:], "model=small", check=False)
    assert proc.returncode == 2 and "model." in proc.stderr and "Traceback" not in proc.stderr
    # environment settings may differ
    cli_in_process("run", f"resume={run}", "trainer.num_threads=2")


def test_ctrl_c_says_how_to_resume(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "run", "recipe=sft", *TINY, "stages.sft.max_steps=100000", f"hydra.run.dir={run}"],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 120
    while not (run / "stages" / "00_sft").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # inside training
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == f"error: interrupted; continue the run with: python -m rlhf run resume={run}"
    assert "Traceback" not in err
