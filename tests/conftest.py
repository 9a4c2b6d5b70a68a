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


# ---------------------------------------------------------------- the feedback page (Django)


class FeedbackServer:
    """`python -m rlhf feedback serve ...` (gunicorn) in a subprocess; `.url` once it listens."""

    def __init__(self, *args: str, env: dict | None = None):
        import re

        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rlhf", "feedback", "serve", "--port", "0", "--quiet", *args],
            cwd=REPO, env={**os.environ, "RLHF_FEEDBACK_FAST_HASHING": "1", **(env or {})},
            stderr=subprocess.PIPE, text=True,
        )
        self.lines = []
        while len(self.lines) < 2:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"feedback serve exited: {''.join(self.lines)}{self.proc.stderr.read()}")
            self.lines.append(line)
        found = re.search(r"(http://127\.0\.0\.1:\d+/)(\?token=\S+)?", self.lines[1])
        assert found, self.lines
        self.url = found.group(1)
        self._wait()

    def _wait(self) -> None:
        import time
        import urllib.error
        import urllib.request

        for _ in range(200):
            try:
                urllib.request.urlopen(self.url + "static/feedback/feedback.css", timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # answering (403 with a token)
            except OSError:
                time.sleep(0.05)
        raise AssertionError("feedback serve did not answer")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def add_raters(db_args: list[str], names: list[str], admin: bool = False, password: str = "correct-horse") -> None:
    """Rater accounts through the CLI (`feedback add-rater`), cheap hashes for tests."""
    env = {**os.environ, "RLHF_FEEDBACK_FAST_HASHING": "1", "RLHF_FEEDBACK_PASSWORD": password}
    cmd = [sys.executable, "-m", "rlhf", "feedback", "add-rater", *names, "--password-env", *db_args]
    if admin:
        cmd.append("--admin")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def feedback_server():
    servers = []

    def start(*args: str, env: dict | None = None) -> FeedbackServer:
        servers.append(FeedbackServer(*args, env=env))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url():
    """A throwaway PostgreSQL cluster (initdb + pg_ctl from the system's packages) -> its URL;
    skips when the binaries are missing."""
    import shutil
    import socket

    import glob

    dirs = ["/usr/local/bin", *sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]  # Debian's layout
    bindir = next((d for d in dirs if os.path.exists(os.path.join(d, "initdb"))), None)
    if bindir is None and shutil.which("initdb"):
        bindir = os.path.dirname(shutil.which("initdb"))
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")
    pytest.importorskip("psycopg")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))  # not under pytest's 0700 folder: the server's user reads it
    data, sockdir = base / "data", base / "sock"
    sockdir.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: use an unprivileged account
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        os.chmod(base, 0o777)
        os.chmod(sockdir, 0o777)
        run_as = ["runuser", "-u", "nobody", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run([*run_as, f"{bindir}/initdb", "-D", str(data), "-U", "rlhf", "--auth=trust", "-E", "UTF8"],
                   check=True, capture_output=True, timeout=120)
    subprocess.run([*run_as, f"{bindir}/pg_ctl", "-D", str(data), "-w", "-l", str(base / "log"), "-o",
                    f"-p {port} -k {sockdir} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=off",
                    "start"], check=True, capture_output=True, timeout=120)
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=rlhf dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE feedback")
        yield f"postgres://rlhf@127.0.0.1:{port}/feedback"
    finally:
        subprocess.run([*run_as, f"{bindir}/pg_ctl", "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True, timeout=60)
        shutil.rmtree(base, ignore_errors=True)
