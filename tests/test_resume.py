"""After `kill -9` at any point, `resume=DIR` finishes with the same weights as an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, TINY, run_cli

ARGS = ["recipe=pretrain_sft", *TINY, "stages.pretrain.max_steps=8", "stages.sft.max_steps=8", "trainer.checkpoint_every=2"]


def _final_weights(run):
    return load_file(str(run / "stages" / "01_sft" / "policy.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_cli("run", *ARGS, f"hydra.run.dir={run}")
    return _final_weights(run)


def _run_and_kill_when(run, path_appears, timeout=240):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf", "run", *ARGS, f"hydra.run.dir={run}"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while not (run / path_appears).exists():
            assert proc.poll() is None, "run finished before the kill point"
            assert time.time() < deadline
            time.sleep(0.01)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kill_point",
    [
        "stages/00_pretrain/checkpoints/last.ckpt",  # mid first stage
        "stages/00_pretrain/COMPLETE",  # between stages
        "stages/01_sft/checkpoints/last.ckpt",  # mid second stage
    ],
)
def test_kill_and_resume_matches_uninterrupted(tmp_path, uninterrupted, kill_point):
    run = tmp_path / "run"
    _run_and_kill_when(run, kill_point)
    assert not (run / "stages" / "01_sft" / "COMPLETE").exists()
    proc = run_cli("run", f"resume={run}")
    assert (run / "stages" / "01_sft" / "COMPLETE").exists()
    resumed = _final_weights(run)
    assert resumed.keys() == uninterrupted.keys()
    for key in resumed:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    if kill_point.endswith("COMPLETE"):
        assert "stage pretrain: complete on disk, skipped" in proc.stderr + proc.stdout


def test_resume_rejects_slot_changes(cli_in_process, tmp_path):
    proc = cli_in_process("run", f"resume={tmp_path}", "+stage@stages.x=sft", check=False)
    assert proc.returncode == 2 and "resume" in proc.stderr
