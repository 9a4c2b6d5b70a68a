"""Feedback web server over real HTTP: escaping, token, CSRF, limits, flows and concurrency."""

from __future__ import annotations

import http.client
import json
import re
import secrets
import threading
import time
from urllib.parse import urlencode, urlsplit

import pytest

from rlhf.feedback.candidates import Candidate, make_items
from rlhf.feedback.export import export
from rlhf.feedback.server import FeedbackApp, make_server, start_in_thread
from rlhf.feedback.store import FeedbackStore

XSS = "<script>alert(1)</script>"
CANDIDATES = [
    Candidate("Say hi " + XSS, ("hello " + XSS, 'plain "quoted" & <b>bold</b>'), "m1", "ck-1"),
    Candidate("Count to three", ("1 2 3", "one two"), "m1", "ck-1"),
    Candidate("Capital of France?", ("Paris", "Lyon", "Nice")),
]


class Client:
    """A tiny cookie-keeping HTTP client (one connection per request, like a browser tab)."""

    def __init__(self, base_url: str):
        url = urlsplit(base_url)
        self.host, self.port = url.hostname, url.port
        self.cookies: dict[str, str] = {}

    def request(self, method, path, body: bytes | None = None, headers: dict | None = None, host=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        hdrs = dict(headers or {})
        if host is not None:
            hdrs["Host"] = host
        if self.cookies:
            hdrs["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        try:
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            data = resp.read().decode("utf-8")
            for cookie in resp.headers.get_all("Set-Cookie") or []:
                name, _, value = cookie.split(";")[0].partition("=")
                self.cookies[name] = value
            return resp.status, resp.headers, data
        finally:
            conn.close()

    def get(self, path="/", **kw):
        return self.request("GET", path, **kw)

    def post(self, path, fields: dict, fetch=True, **kw):
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if fetch:
            headers["X-Requested-With"] = "fetch"
        return self.request("POST", path, body=urlencode(fields).encode(), headers=headers, **kw)


def form_fields(page: str, action: str) -> dict[str, str]:
    """Hidden inputs of the form posting to `action`."""
    form = re.search(rf'<form[^>]*action="{action}".*?</form>', page, re.S).group(0)
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form))


def shown(page: str) -> list[str]:
    import html

    return [html.unescape(t) for t in re.findall(r'<article class="response"[^>]*>.*?<div class="text">(.*?)</div></article>', page, re.S)]


@pytest.fixture
def serve(tmp_path):
    servers = []

    def start(mode="compare", token=None, rater="ann", scale="stars", **kw):
        store = FeedbackStore(tmp_path / f"fb{len(servers)}.sqlite")
        items = make_items(CANDIDATES, mode)
        store.add_items(items)
        app = FeedbackApp(store, items, mode, scale=scale, token=token, rater=rater, quiet=True, **kw)
        server = start_in_thread(app)
        servers.append(server)
        return server, app

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


# -------------------------------------------------------------------------------- the page


def test_page_escapes_model_and_user_text(serve):
    server, _ = serve(rater='ev"il<i>')
    status, headers, page = Client(server.url).get()
    assert status == 200
    assert XSS not in page and "<b>bold</b>" not in page and "<i>" not in page
    assert "Say hi &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "hello &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "plain &quot;quoted&quot; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "ev&quot;il&lt;i&gt;" in page
    csp = headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert headers["X-Content-Type-Options"] == "nosniff"


def test_static_files_and_unknown_paths(serve):
    server, _ = serve()
    client = Client(server.url)
    status, headers, body = client.get("/static/feedback.js")
    assert status == 200 and headers["Content-Type"].startswith("text/javascript") and "keydown" in body
    assert client.get("/static/feedback.css")[0] == 200
    for path in ("/nope", "/static/../server.py", "/static/", "/favicon.ico"):
        assert client.get(path)[0] == 404, path
    client.get()  # session
    assert client.post("/nope", {"csrf": "x"})[0] == 404


def test_host_header_must_be_loopback_without_token(serve):
    server, _ = serve()
    client = Client(server.url)
    assert client.get(host="localhost:1234")[0] == 200
    assert client.get(host="[::1]:8000")[0] == 200
    assert client.get(host="evil.example:8000")[0] == 403  # DNS rebinding


def test_token_required_then_cookie(serve):
    token = secrets.token_urlsafe(16)
    server, app = serve(token=token)
    anon = Client(server.url)
    for path in ("/", "/static/feedback.js", "/nope", "/?token=wrong"):
        assert anon.get(path)[0] == 403, path
    assert anon.post("/rate", {"csrf": "x"})[0] == 403
    assert anon.get(host="evil.example")[0] == 403

    client = Client(server.url)
    status, headers, _ = client.get(f"/?token={token}")
    assert status == 303 and headers["Location"] == "/"  # token dropped from the URL
    cookie = next(c for c in headers.get_all("Set-Cookie") if c.startswith(app.cookie("token")))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie
    assert client.get()[0] == 200  # the cookie alone is enough now
    assert client.get("/static/feedback.css")[0] == 200
    assert client.get("/nope")[0] == 404
    # another server on the same machine does not clash: cookies are named per port
    assert app.cookie("token").endswith(str(server.server_address[1]))


def test_csrf_missing_or_wrong_is_403(serve):
    server, app = serve()
    client = Client(server.url)
    _, _, page = client.get()
    fields = form_fields(page, "/rate") | {"choice": "A"}
    bad = [
        {k: v for k, v in fields.items() if k != "csrf"},
        fields | {"csrf": "0" * 64},
        fields | {"csrf": app.csrf_for("another-session-id-123456")},
    ]
    for body in bad:
        status, _, text = client.post("/rate", body)
        assert status == 403 and "CSRF" in text
    no_session = Client(server.url)
    assert no_session.post("/rate", fields)[0] == 403
    assert app.store.ratings() == []
    assert client.post("/rate", fields)[0] == 200
    assert len(app.store.ratings()) == 1


def test_body_limits(serve):
    server, app = serve()
    client = Client(server.url)
    _, _, page = client.get()
    fields = form_fields(page, "/rate") | {"choice": "A", "pad": "x" * (app.max_body + 1)}
    status, headers, _ = client.post("/rate", fields)
    assert status == 413
    huge = b"a=" + b"x" * (4 << 20)  # 4 MiB: cut off, still answered 413 (or the socket is closed)
    try:
        status = client.request("POST", "/rate", body=huge, headers={"Content-Type": "application/x-www-form-urlencoded"})[0]
        assert status == 413
    except (ConnectionResetError, BrokenPipeError):
        pass
    assert client.request("POST", "/rate", body=b"{}", headers={"Content-Type": "application/json"})[0] == 415
    assert app.store.ratings() == []


def test_rate_flow_with_plain_forms_and_fetch(serve):
    server, app = serve()
    client = Client(server.url)
    _, _, page = client.get()
    assert "0 / 5 rated" in page
    first = form_fields(page, "/rate")
    a_text, b_text = shown(page)
    # plain form post (no JS): 303 back to the page
    status, headers, _ = client.post("/rate", first | {"choice": "B"}, fetch=False)
    assert status == 303 and headers["Location"] == "/?m=saved" and headers["X-Feedback-Status"] == "saved"
    # the browser retries the same submission (say the response was lost): stored once
    status, headers, fragment = client.post("/rate", first | {"choice": "B"})
    assert status == 200 and headers["X-Feedback-Status"] == "duplicate"
    assert "1 / 5 rated" in fragment and "<html" not in fragment
    [row] = app.store.ratings()
    assert (row.rater, row.choice, row.shown) == ("ann", "B", (a_text, b_text))
    assert (row.model, row.checkpoint) == ("m1", "ck-1")

    # undo via fetch shows the undone item again
    undo = form_fields(fragment, "/undo")
    status, headers, fragment = client.post("/undo", undo)
    assert headers["X-Feedback-Status"] == "undone" and "0 / 5 rated" in fragment
    assert form_fields(fragment, "/rate")["item_id"] == first["item_id"]
    assert client.post("/undo", undo)[1]["X-Feedback-Status"] == "duplicate"  # retried undo: no 2nd undo

    # bad inputs
    for bad in ({"choice": "Z"}, {"item_id": "nope"}, {"submission_id": "x"}, {"order": "0,0"}, {"order": "a"}):
        assert client.post("/rate", first | {"choice": "A"} | bad)[0] == 400, bad
    assert len(app.store.ratings()) == 0 and len(app.store.ratings(include_undone=True)) == 1


def test_rater_name_form(serve):
    server, app = serve(rater=None)
    client = Client(server.url)
    _, _, page = client.get()
    assert "Who is rating?" in page and 'action="/rate"' not in page
    csrf = form_fields(page, "/rater")["csrf"]
    assert client.post("/rater", {"csrf": csrf, "rater": "  "}, fetch=False)[0] == 400
    status, headers, _ = client.post("/rater", {"csrf": csrf, "rater": " Zoë  Q "}, fetch=False)
    assert status == 303
    _, _, page = client.get(headers["Location"])
    assert "rating as <b>Zoë Q</b>" in page
    fields = form_fields(page, "/rate") | {"choice": "tie"}
    client.post("/rate", fields)
    assert app.store.ratings()[0].rater == "Zoë Q"
    _, _, page = client.get("/?change_rater=1")
    assert 'value="Zoë Q"' in page


@pytest.mark.parametrize("scale, choices", [("stars", ["5", "1", "3"]), ("thumbs", ["up", "down", "up"])])
def test_rate_mode(serve, tmp_path, scale, choices):
    server, app = serve(mode="rate", scale=scale)
    client = Client(server.url)
    _, _, page = client.get()
    assert "0 / 7 rated" in page and len(shown(page)) == 1
    wrong = "up" if scale == "stars" else "5"
    assert client.post("/rate", form_fields(page, "/rate") | {"choice": wrong})[0] == 400
    for choice in choices:
        page = client.post("/rate", form_fields(page, "/rate") | {"choice": choice})[2]
    assert "3 / 7 rated" in page
    export(app.store.path, tmp_path / "out")
    rows = [json.loads(x) for x in (tmp_path / "out" / "ratings.jsonl").read_text().splitlines()]
    assert [r["rating"] for r in rows] == [int(c) if c.isdigit() else c for c in choices]
    assert [r["response"] for r in rows] == ["hello " + XSS, 'plain "quoted" & <b>bold</b>', "1 2 3"]


def test_done_page(serve):
    server, _ = serve()
    client = Client(server.url)
    page = client.get()[2]
    for _ in range(5):
        page = client.post("/rate", form_fields(page, "/rate") | {"choice": "A"})[2]
    assert "All done" in page and "5 / 5 rated" in page


def test_cli_serve_end_to_end(tmp_path):
    """`python -m rlhf.feedback serve` prints the URL (with the token) and serves it."""
    import subprocess
    import sys

    cands = tmp_path / "c.jsonl"
    cands.write_text("".join(json.dumps({"prompt": c.prompt, "responses": list(c.responses)}) + "\n" for c in CANDIDATES))
    token = secrets.token_urlsafe(16)
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhf.feedback", "serve", "--candidates", str(cands), "--db", str(tmp_path / "fb.sqlite"),
         "--port", "0", "--token", token, "--rater", "ann", "--quiet"],
        stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = [proc.stderr.readline(), proc.stderr.readline()]
        assert lines[0].startswith("Serving 5 compare items"), lines
        url = re.search(r"(http://127\.0\.0\.1:\d+/)\?token=(\S+)", lines[1])
        assert url and url.group(2) == token
        client = Client(url.group(1))
        assert client.get()[0] == 403
        assert client.get(f"/?token={token}")[0] == 303
        status, _, page = client.get()
        assert status == 200 and "0 / 5 rated" in page
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_make_server_refuses_open_bind_without_token(tmp_path):
    app = FeedbackApp(FeedbackStore(tmp_path / "fb.sqlite"), [], "compare", quiet=True)
    with pytest.raises(PermissionError, match="refusing to bind 0.0.0.0 without --token"):
        make_server(app, "0.0.0.0", 0)


# ----------------------------------------------------------------------------- concurrency


def test_many_raters_at_once(serve, tmp_path):
    """50 raters post at the same moment, some retry; every rating is stored exactly once."""
    n_raters, per_rater, n_retries = 50, 4, 2
    server, app = serve(rater=None)
    items = app.items
    assert len(items) >= per_rater
    barrier = threading.Barrier(n_raters)
    errors: list[str] = []
    statuses: list[str] = []
    lock = threading.Lock()

    def rater(k: int) -> None:
        try:
            client = Client(server.url)
            client.cookies[app.cookie("rater")] = f"rater{k:02d}"
            page = client.get()[2]
            csrf = form_fields(page, "/rate")["csrf"]
            posts = [
                {"csrf": csrf, "submission_id": f"r{k:02d}-item{i}-{secrets.token_hex(4)}",
                 "item_id": items[i].id, "order": "1,0", "choice": "AB"[(k + i) % 2]}
                for i in range(per_rater)
            ]
            posts += posts[:n_retries]  # retried duplicates
            barrier.wait(timeout=30)
            for body in posts:
                status, headers, text = client.post("/rate", body)
                with lock:
                    if status != 200:
                        errors.append(f"rater{k}: {status} {text[:80]}")
                    statuses.append(headers.get("X-Feedback-Status"))
        except Exception as err:  # noqa: BLE001 -- reported below
            with lock:
                errors.append(f"rater{k}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=rater, args=(k,)) for k in range(n_raters)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    elapsed = time.perf_counter() - start
    assert not any(t.is_alive() for t in threads), "clients hung"
    assert errors == []
    assert statuses.count("saved") == n_raters * per_rater
    assert statuses.count("duplicate") == n_raters * n_retries

    rows = app.store.ratings(include_undone=True)
    assert len(rows) == n_raters * per_rater
    assert len({r.submission_id for r in rows}) == len(rows)
    assert len({(r.rater, r.item_id) for r in rows}) == len(rows)
    for r in rows:
        k, i = int(r.rater[5:]), next(i for i, it in enumerate(items) if it.id == r.item_id)
        assert r.choice == "AB"[(k + i) % 2]
    counts = export(app.store.path, tmp_path / "out")
    assert counts["pairs"] == n_raters * per_rater
    print(f"\n{n_raters} raters x ({per_rater} + {n_retries} retried) posts at once: {elapsed:.2f}s")
    assert elapsed < 60
