"""The training side of online feedback: talk to the feedback page's trainer API, and start the
page (and simulated raters) as child processes of a training stage.

`TrainerClient` publishes items and reads ratings over HTTP (`POST /api/items`,
`GET /api/ratings`, views.py), so the page may run on this machine or on another one, on SQLite
or PostgreSQL; training never opens the database itself. Every call is idempotent (items are
keyed by their content's hash; reads change nothing), so a call that failed half-way is simply
repeated: connection errors are retried for `retry_s` seconds (a page being restarted).

`LocalPage` runs `python -m rlhf feedback serve` (gunicorn) and, if asked, `feedback simulate`
as child processes that die with the training process (Linux: PR_SET_PDEATHSIG), logging to
files in the stage folder.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path
from typing import Optional
from urllib.parse import urlencode, urlsplit, urlunsplit

from rlhf.errors import RLHFError
from rlhf.feedback.candidates import Item

TRAINER_KEY_ENV = "RLHF_FEEDBACK_TRAINER_KEY"
PASSWORD_ENV = "RLHF_FEEDBACK_PASSWORD"
TOKEN_ENV = "RLHF_FEEDBACK_TOKEN"
PUBLISH_BYTES = 4 * 1024 * 1024  # per request: well under the API's 16 MiB limit
log = logging.getLogger("rlhf")


class FeedbackPageError(RLHFError):
    """The feedback page cannot be reached, refused the trainer, or could not be started."""


class TrainerClient:
    """The trainer API of a feedback page at `url` (its `?token=` part, if any, is dropped:
    the API checks only `key`)."""

    def __init__(self, url: str, key: str, retry_s: float = 120.0, timeout_s: float = 60.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise FeedbackPageError(f"feedback page URL {url!r} is not an http(s) URL")
        self.base = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        self.key, self.retry_s, self.timeout_s = key, retry_s, timeout_s

    def _call(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        headers = {"Authorization": f"Bearer {self.key}", "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        deadline = time.monotonic() + self.retry_s
        wait = 0.2
        while True:
            request = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    return json.loads(response.read())
            except urllib.error.HTTPError as err:
                if err.code < 500:  # a refusal: retrying cannot help
                    try:
                        reason = json.loads(err.read()).get("error", "")
                    except (ValueError, AttributeError):
                        reason = err.reason
                    raise FeedbackPageError(f"feedback page {self.base} refused {method} {path.split('?')[0]}: {err.code} {reason}") from None
                problem = f"{err.code} {err.reason}"
            except (urllib.error.URLError, OSError) as err:
                problem = str(getattr(err, "reason", err))
            if time.monotonic() > deadline:
                raise FeedbackPageError(f"feedback page {self.base} unreachable for {self.retry_s:.0f} s ({problem})")
            time.sleep(wait)
            wait = min(2 * wait, 5.0)

    def publish(self, items: list[Item]) -> int:
        """Store `items` on the page (those stored already are left as they are); -> how many were new."""
        new, part, size = 0, [], 0
        rows = [{k: v for k, v in asdict(it).items() if k != "id"} for it in items]
        for row in rows + [None]:
            length = len(json.dumps(row, ensure_ascii=False).encode("utf-8")) if row else 0
            if part and (row is None or size + length > PUBLISH_BYTES):
                new += int(self._call("POST", "/api/items", {"items": part})["new"])
                part, size = [], 0
            if row is not None:
                part.append(row)
                size += length
        return new

    def ratings(self, model: str) -> list[dict]:
        """Every live rating of the items published under `model`, oldest first (RatingRow fields)."""
        return self._call("GET", "/api/ratings?" + urlencode({"model": model}))["ratings"]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class LocalPage:
    """The feedback page (and simulated raters) as child processes of this training process.

    start(): creates the rater accounts for simulated raters, starts `feedback serve` on `db`
    (or `database_url`) with a fresh trainer key, waits for its URL, then starts the raters.
    stop(): ends them all. Raises FeedbackPageError if the page does not come up in 120 s.
    """

    def __init__(self, log_dir: Path, *, mode: str, db: str, database_url: Optional[str], host: str, port: int,
                 ratings_per_item: int, simulated_raters: int = 0, noise: float = 0.0, judge: Optional[str] = None,
                 seed: int = 0):
        self.log_dir = Path(log_dir)
        self.mode, self.db, self.database_url, self.host, self.port = mode, db, database_url, host, port
        self.ratings_per_item, self.simulated_raters, self.noise, self.judge, self.seed = ratings_per_item, simulated_raters, noise, judge, seed
        self.key = secrets.token_urlsafe(32)
        self.url: Optional[str] = None
        self.procs: list[subprocess.Popen] = []
        self.server: Optional[subprocess.Popen] = None
        self.raters: Optional[subprocess.Popen] = None

    def _where(self) -> list[str]:
        return ["--database-url", self.database_url] if self.database_url else ["--db", self.db]

    def _spawn(self, args: list[str], log_name: str, env: dict) -> subprocess.Popen:
        out = open(self.log_dir / log_name, "ab")
        try:
            proc = subprocess.Popen([sys.executable, "-m", "rlhf.feedback", *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, preexec_fn=_die_with_parent)
        finally:
            out.close()
        self.procs.append(proc)
        return proc

    def start(self) -> str:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, TRAINER_KEY_ENV: self.key}
        names = [f"simulated-{k + 1}" for k in range(self.simulated_raters)]
        password = secrets.token_urlsafe(16)
        if names:
            done = subprocess.run([sys.executable, "-m", "rlhf.feedback", "add-rater", *names, "--password-env", *self._where()],
                                  env={**env, PASSWORD_ENV: password}, capture_output=True, text=True, timeout=300)
            if done.returncode:
                raise FeedbackPageError(f"could not create the simulated raters' accounts: {done.stderr.strip().splitlines()[-1:]}")
        page_log = self.log_dir / "feedback_page.log"
        start_at = page_log.stat().st_size if page_log.exists() else 0
        args = ["serve", *self._where(), "--host", self.host, "--port", str(self.port), "--mode", self.mode,
                "--ratings-per-item", str(self.ratings_per_item), "--quiet"]
        if self.mode == "rate":
            args += ["--scale", "thumbs"]
        server = self.server = self._spawn(args, page_log.name, env)
        deadline = time.monotonic() + 120
        while self.url is None:
            with open(page_log, "rb") as fh:
                fh.seek(start_at)
                for line in fh.read().decode("utf-8", "replace").splitlines():
                    if line.startswith("Open "):
                        self.url = line.split()[1]
            if self.url is None:
                if server.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    tail = page_log.read_text(errors="replace").strip().splitlines()[-1:] if page_log.exists() else []
                    raise FeedbackPageError(f"the feedback page did not start (see {page_log}): {' '.join(tail)}")
                time.sleep(0.1)
        if names:
            sim = ["simulate", "--url", self.url, "--password-env", "--noise", str(self.noise), "--seed", str(self.seed),
                   "--exit-with-parent", *[a for name in names for a in ("--rater", name)]]
            if self.judge:
                sim += ["--judge", self.judge]
            self.raters = self._spawn(sim, "simulated_raters.log", {**env, PASSWORD_ENV: password})
        return self.url

    def check(self) -> None:
        """Raises FeedbackPageError if the page has stopped; warns once if the simulated raters have."""
        if self.server is not None and self.server.poll() is not None:
            raise FeedbackPageError(f"the feedback page stopped (exit {self.server.returncode}); see {self.log_dir / 'feedback_page.log'}")
        if self.raters is not None and self.raters.poll() is not None:
            log.warning("the simulated raters stopped (exit %s); see %s", self.raters.returncode, self.log_dir / "simulated_raters.log")
            self.raters = None

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs = []
