"""Simulated raters: rate through the feedback page over HTTP, as a person with a browser would.

A rater logs in with its account, reads the page (`GET /`), judges the item shown with a judge
function (by dotted path, `fn(prompts, responses) -> scores in [0, 1]`), and clicks a button
(`POST /rate` with `HX-Request: true`, answered with the next item). It uses no special API, so
it exercises the page itself: login, CSRF, the A/B display order, idempotent retries.

Judgement (`decide`): compare mode picks the response with the higher score (equal: "tie");
thumbs are "up" at a score >= `good`; stars are 1 + 4 * score rounded half up. With probability
`noise` the judgement is flipped (A <-> B, up <-> down, or another star at random; a tie stays a
tie). Each rater draws from its own generator seeded by (seed, name), so runs repeat.

Left out, on purpose: undo (a rater never changes its mind), and raters that disagree with each
other beyond the noise.
"""

from __future__ import annotations

import http.client
import importlib
import math
import os
import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from html.parser import HTMLParser
from urllib.parse import parse_qs, urlencode, urlsplit

from rlhf.errors import ConfigError, RLHFError

DEFAULT_JUDGE = "rlhf.tasks.builtin.verifier_reward"
STARS = ("1", "2", "3", "4", "5")
Judge = Callable[[list[str], list[str]], list[float]]


class RaterError(RLHFError):
    """A simulated rater cannot go on: the page refused its login or token, stayed unreachable,
    or answered something it does not understand."""


class _Stopped(Exception):
    """Internal: the rater was asked to stop (another rater failed, Ctrl+C, the parent died)."""


# ------------------------------------------------------------------------------------ judging


def load_judge(path: str) -> Judge:
    """The function at dotted `path`. Raises ConfigError if it cannot be imported or called."""
    module_name, _, attr = path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"judge={path!r}: cannot import it (expected module.function)") from None
    if not callable(fn):
        raise ConfigError(f"judge={path!r} is not a function")
    return fn


def decide(buttons: Sequence[str], scores: Sequence[float], *, good: float = 1.0, noise: float = 0.0,
           rng: random.Random) -> tuple[str, bool]:
    """The button to press for `scores` (one per response shown, A then B) -> (choice, flipped).

    The kind of judgement follows the buttons offered: A/B (compare), up/down (thumbs) or 1-5
    (stars). Draws one number from `rng` per call (two when a star is flipped), flipped or not,
    so one rater's later judgements do not depend on earlier outcomes.
    Raises RaterError for buttons it does not know."""
    flip = rng.random() < noise
    offered = set(buttons)
    if {"A", "B"} <= offered:
        a, b = scores
        choice = "A" if a > b else "B" if b > a else "tie"
        if choice == "tie" or not flip:
            return choice, False
        return ("B" if choice == "A" else "A"), True
    if {"up", "down"} <= offered:
        choice = "up" if scores[0] >= good else "down"
        return ({"up": "down", "down": "up"}[choice], True) if flip else (choice, False)
    if set(STARS) <= offered:
        star = str(min(5, max(1, math.floor(1 + 4 * scores[0] + 0.5))))  # half up: round() goes to even
        return (rng.choice([s for s in STARS if s != star]), True) if flip else (star, False)
    raise RaterError(f"the page offers the buttons {list(buttons)}; a simulated rater knows A/B, up/down and 1-5")


# -------------------------------------------------------------------------------- the page


class _Page(HTMLParser):
    """What a person sees in `#app`: the /rate form's hidden fields, the prompt, the responses
    (A then B), the buttons; or the "done" card. Text is unescaped and kept exactly."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.fields: dict[str, str] = {}
        self.csrf: str | None = None
        self.prompt: str | None = None
        self.responses: list[str] = []
        self.buttons: list[str] = []
        self.done = False
        self._form: str | None = None
        self._part: str | None = None  # "prompt" | "response": the section we are in
        self._text: list[str] | None = None  # pieces of the current `.text` div
        self._placeholder = False  # a tag inside `.text`: the page's "(empty prompt)" placeholder
        self.feed(html)
        self.close()

    @property
    def has_item(self) -> bool:
        return "item_id" in self.fields

    def handle_starttag(self, tag, attrs):
        attr = {k: v or "" for k, v in attrs}
        classes = attr.get("class", "").split()
        if self._text is not None:
            self._placeholder = True
        elif tag == "form":
            self._form = attr.get("action")
        elif tag == "input" and attr.get("type") == "hidden":
            if attr.get("name") == "csrfmiddlewaretoken" and self.csrf is None:
                self.csrf = attr.get("value")
            if self._form == "/rate":
                self.fields[attr.get("name", "")] = attr.get("value", "")
        elif tag == "button" and self._form == "/rate" and attr.get("name") == "choice":
            self.buttons.append(attr.get("value", ""))
        elif tag == "section" and "prompt" in classes:
            self._part = "prompt"
        elif tag == "article" and "response" in classes:
            self._part = "response"
        elif tag == "div" and "text" in classes and self._form == "/rate":
            self._text, self._placeholder = [], False
        elif tag == "section" and "done" in classes:
            self.done = True

    def handle_data(self, data):
        if self._text is not None and not self._placeholder:
            self._text.append(data)

    def handle_endtag(self, tag):
        if tag == "div" and self._text is not None:
            text = "" if self._placeholder else "".join(self._text)
            if self._part == "prompt":
                self.prompt = text
            else:
                self.responses.append(text)
            self._text = None
        elif tag == "form":
            self._form = None


# ------------------------------------------------------------------------------- one rater


class SimulatedRater:
    """One rater account rating through the page at `url` until a stop condition (see
    `run_raters`). `run()` -> Counter of saved / duplicate / already_rated / flipped.

    A request that fails to connect or gets a 5xx answer is sent again, the same form with the
    same submission id (the page stores a submission once), `tries` times in all with doubling
    waits from `backoff_s`; a page that forgot the login (restarted) gets a new login.
    """

    def __init__(self, url: str, name: str, password: str, judge: Judge, *, noise: float = 0.0, seed: int = 0,
                 good: float = 1.0, poll_s: float = 0.5, idle_exit_s: float | None = None,
                 max_ratings: int | None = None, stop: threading.Event | None = None,
                 parent_pid: int | None = None, tries: int = 6, backoff_s: float = 0.25, timeout_s: float = 60.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"url {url!r}: expected http://HOST:PORT/ as `feedback serve` printed it")
        self.url, self.name, self.password, self.judge = url, name, password, judge
        self.noise, self.good, self.poll_s, self.idle_exit_s, self.max_ratings = noise, good, poll_s, idle_exit_s, max_ratings
        self.rng = random.Random(f"{seed}\0{name}")  # a str seed is hashed the same in every process
        self.stop = stop if stop is not None else threading.Event()
        self.parent_pid, self.tries, self.backoff_s, self.timeout_s = parent_pid, tries, backoff_s, timeout_s
        self._conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._host, self._port = parts.hostname, parts.port
        token = parse_qs(parts.query).get("token")
        self._token_path = "/?" + urlencode({"token": token[0]}) if token else None
        self.cookies: dict[str, str] = {}
        self.counts: Counter[str] = Counter(saved=0, duplicate=0, already_rated=0, flipped=0)

    # -- HTTP ------------------------------------------------------------------------------

    def _send(self, method: str, path: str, body: bytes | None, headers: dict) -> tuple[int, http.client.HTTPMessage, str]:
        conn = self._conn_class(self._host, self._port, timeout=self.timeout_s)  # one per request, like a tab
        if self.cookies:
            headers = {**headers, "Cookie": "; ".join(f"{k}={v}" for k, v in self.cookies.items())}
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        for cookie in resp.headers.get_all("Set-Cookie") or []:
            name, _, value = cookie.split(";")[0].partition("=")
            if value in ("", '""'):
                self.cookies.pop(name.strip(), None)  # deleted
            else:
                self.cookies[name.strip()] = value
        return resp.status, resp.headers, text

    def _request(self, method: str, path: str, fields: dict | None = None, fetch: bool = False):
        """-> (status, headers, text); retried on a connection error or a 5xx answer."""
        body = None if fields is None else urlencode(fields).encode("utf-8")
        headers = {} if body is None else {"Content-Type": "application/x-www-form-urlencoded"}
        if fetch:
            headers["HX-Request"] = "true"
        problem = ""
        for attempt in range(self.tries):
            if attempt:
                self._sleep(min(self.backoff_s * 2 ** (attempt - 1), 5.0))
            try:
                status, answer_headers, text = self._send(method, path, body, headers)
            except OSError as err:  # refused, reset, timed out: the page may be restarting
                problem = f"{type(err).__name__}: {err}"
                continue
            if status < 500:
                return status, answer_headers, text
            problem = f"{status} {text.strip()[:80]}"
        raise RaterError(f"rater {self.name!r}: {method} {path.split('?')[0]} on {self._origin()} failed "
                         f"{self.tries} times ({problem})")

    def _origin(self) -> str:
        return f"{self._host}:{self._port}" if self._port else self._host

    def _sleep(self, seconds: float) -> None:
        if self.stop.wait(seconds):
            raise _Stopped

    # -- session ---------------------------------------------------------------------------

    def log_in(self) -> None:
        """Get the token cookie (if the URL has a token) and log in.
        Raises RaterError if the token or the name/password is refused."""
        if self._token_path:
            status = self._request("GET", self._token_path)[0]
            if status == 403:  # 303 sets the cookie; a page without a token sends us to /login/
                raise RaterError(f"rater {self.name!r}: {self._origin()} refused the URL's token")
        status, _, text = self._request("GET", "/login/")
        csrf = _Page(text).csrf if status == 200 else None
        if csrf is None:
            raise RaterError(f"rater {self.name!r}: {self._origin()}/login/ answered {status} without a login form")
        form = {"csrfmiddlewaretoken": csrf, "username": self.name, "password": self.password, "next": "/"}
        status, _, text = self._request("POST", "/login/", form)
        if status != 302:
            why = "wrong name or password" if "Wrong name or password" in text else f"answer {status}"
            raise RaterError(f"rater {self.name!r}: login at {self._origin()} failed: {why}")

    def page(self) -> _Page:
        """`GET /` -> the page; logs in again if the page asks for it (restarted, say)."""
        for _ in range(2):
            status, _, text = self._request("GET", "/")
            if status == 200:
                page = _Page(text)
                if not (page.has_item or page.done):
                    raise RaterError(f"rater {self.name!r}: {self._origin()}/ shows neither an item nor 'done'")
                return page
            if status in (302, 303, 403):  # to /login/, or a token cookie the page no longer takes
                self.log_in()
                continue
            raise RaterError(f"rater {self.name!r}: GET / on {self._origin()} answered {status}: {text.strip()[:80]}")
        raise RaterError(f"rater {self.name!r}: {self._origin()} still wants a login after a successful one")

    def rate(self, page: _Page, choice: str) -> tuple[str, _Page]:
        """Press `choice` on `page` -> (X-Feedback-Status, the next page)."""
        form = {**page.fields, "choice": choice}
        for _ in range(2):
            status, headers, text = self._request("POST", "/rate", form, fetch=True)
            if status == 200:
                return headers.get("X-Feedback-Status", ""), _Page(text)
            if status != 403:
                raise RaterError(f"rater {self.name!r}: POST /rate on {self._origin()} answered {status}: {text.strip()[:80]}")
            # logged out (the page restarted): log in again, keep the same submission id
            self.log_in()
            form["csrfmiddlewaretoken"] = self.page().csrf or ""
        raise RaterError(f"rater {self.name!r}: POST /rate on {self._origin()} refused (403) after a new login")

    # -- judging ---------------------------------------------------------------------------

    def judge_page(self, page: _Page) -> tuple[str, bool]:
        """-> (choice, flipped) for the item on `page`. Raises ConfigError for bad judge output."""
        n = len(page.responses)
        out = self.judge([page.prompt or ""] * n, list(page.responses))
        try:
            scores = [float(s) for s in out]
        except (TypeError, ValueError):
            scores = []
        if len(scores) != n or not all(0.0 <= s <= 1.0 for s in scores):  # NaN fails too
            name = f"{getattr(self.judge, '__module__', '')}.{getattr(self.judge, '__qualname__', self.judge)}"
            raise ConfigError(f"judge {name} returned {out!r} for {n} response(s): need {n} scores in [0, 1]")
        return decide(page.buttons, scores, good=self.good, noise=self.noise, rng=self.rng)

    # -- the loop --------------------------------------------------------------------------

    def _should_stop(self) -> bool:
        return self.stop.is_set() or (self.parent_pid is not None and os.getppid() != self.parent_pid)

    def run(self) -> Counter:
        """Rate until a stop condition; -> counts. Raises RaterError / ConfigError (see above)."""
        try:
            self.log_in()
            page, last_work = self.page(), time.monotonic()
            while not self._should_stop():
                if not page.has_item:
                    if self.idle_exit_s is not None and time.monotonic() - last_work >= self.idle_exit_s:
                        break
                    self._sleep(self.poll_s)  # new items may be published while we wait
                    page = self.page()
                    continue
                choice, flipped = self.judge_page(page)
                status, page = self.rate(page, choice)
                self.counts[status] += 1
                if status in ("saved", "duplicate"):  # our choice is the stored one
                    self.counts["flipped"] += flipped
                last_work = time.monotonic()
                if self.max_ratings is not None and self.counts["saved"] + self.counts["duplicate"] >= self.max_ratings:
                    break
        except _Stopped:
            pass
        return self.counts


# ------------------------------------------------------------------------------ many raters


def run_raters(url: str, raters: list[str], password: str, *, judge: str = DEFAULT_JUDGE, noise: float = 0.0,
               seed: int = 0, good: float = 1.0, poll_s: float = 0.5, idle_exit_s: float | None = None,
               max_ratings: int | None = None, exit_with_parent: bool = False,
               progress: Callable[[dict[str, Counter]], None] | None = None,
               progress_s: float = 10.0) -> dict[str, Counter]:
    """Rate at `url` (as `feedback serve` printed it, `?token=...` included) as each of `raters`
    (accounts from `feedback add-rater`, all with `password`), one thread per rater.

    Each rater stops after `max_ratings` stored ratings, after `idle_exit_s` seconds with
    nothing to rate (None: never; it polls every `poll_s` for new items), when this process's
    parent dies (`exit_with_parent`), or on Ctrl+C (which stops them all and returns their
    counts). `progress(counts)` is called about every `progress_s` seconds while they run.
    -> {rater: Counter(saved=, duplicate=, already_rated=, flipped=)}.

    Raises ValueError for a bad argument, ConfigError for a judge that cannot be imported or
    returns bad scores, RaterError when a rater cannot log in or reach the page; the first
    rater's error stops the others.
    """
    if not raters or len(set(raters)) != len(raters):
        raise ValueError(f"raters={raters!r}: need one or more distinct names")
    if not 0.0 <= noise <= 1.0:  # NaN fails too
        raise ValueError(f"noise={noise} must be in [0, 1]")
    if not 0.0 <= good <= 1.0:
        raise ValueError(f"good={good} must be in [0, 1] (judge scores are)")
    if not poll_s > 0:
        raise ValueError(f"poll_s={poll_s} must be > 0")
    if idle_exit_s is not None and not idle_exit_s >= 0:
        raise ValueError(f"idle_exit_s={idle_exit_s} must be >= 0 (or None: never)")
    if max_ratings is not None and max_ratings < 1:
        raise ValueError(f"max_ratings={max_ratings} must be >= 1 (or None: no limit)")
    fn = load_judge(judge)
    stop = threading.Event()
    parent = os.getppid() if exit_with_parent else None
    workers = [SimulatedRater(url, name, password, fn, noise=noise, seed=seed, good=good, poll_s=poll_s,
                              idle_exit_s=idle_exit_s, max_ratings=max_ratings, stop=stop, parent_pid=parent)
               for name in raters]
    errors: list[BaseException] = []

    def work(rater: SimulatedRater) -> None:
        try:
            rater.run()
        except BaseException as err:  # noqa: BLE001 -- re-raised in the calling thread
            errors.append(err)
            stop.set()

    threads = [threading.Thread(target=work, args=(w,), name=f"rater-{w.name}", daemon=True) for w in workers]
    for t in threads:
        t.start()
    counts = {w.name: w.counts for w in workers}
    try:
        next_report = time.monotonic() + progress_s
        while alive := [t for t in threads if t.is_alive()]:
            alive[0].join(0.2)
            if progress is not None and time.monotonic() >= next_report:
                progress(counts)
                next_report += progress_s
    except KeyboardInterrupt:
        stop.set()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    return counts
