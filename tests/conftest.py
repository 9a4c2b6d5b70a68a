import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# small, fast defaults for end-to-end runs of the CLI
TINY = ["model=tiny", "logger=none", "eval.num_prompts=8", "trainer.progress_bar=false", "trainer.num_threads=1"]


def run_cli(*args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m rlhf ...` in a subprocess (Lightning's DDP must not re-launch pytest)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def cli_in_process(capfd, monkeypatch):
    """run_cli's interface, but `rlhf.cli.main` runs in this process: the same code from the
    argument list on, less the ~6 s interpreter and import start of each call. Not for DDP
    (Lightning's launcher would re-run pytest) or signals. A traceback, which a user would see,
    is an exception here and fails the test."""
    import torch

    from rlhf.cli import main

    def call(*args: str, check: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        # a run sets trainer.num_threads and Hydra points the root logger at stdout: both are
        # per-process settings, put back so that the next call starts as a fresh process would
        threads, root = torch.get_num_threads(), logging.getLogger()
        handlers, level = list(root.handlers), root.level
        monkeypatch.setattr(sys, "argv", [sys.argv[0]])  # Hydra reads and rewrites it
        capfd.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        finally:
            torch.set_num_threads(threads)
            root.handlers[:] = handlers
            root.setLevel(level)
        out, err = capfd.readouterr()
        proc = subprocess.CompletedProcess(["rlhf", *args], code, out, err)
        if check and code != 0:
            raise AssertionError(f"exit {code}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-5000:]}")
        return proc

    return call
