"""The feedback page (Django): escaping, token, CSRF, body limits, flows, accounts, the CLI,
and 50 raters at once over HTTP against the real server (gunicorn) on SQLite and PostgreSQL.

Most checks use Django's test client in this process (with CSRF checks on); the CLI and the
concurrency tests start `python -m rlhf feedback serve` and talk HTTP to it.
"""

from __future__ import annotations

import html
import http.client
import json
import re
import secrets
import threading
import time
from urllib.parse import urlencode, urlsplit

import pytest

pytest.importorskip("django")
pytest.importorskip("gunicorn")

from conftest import add_raters  # noqa: E402

from rlhf.feedback.candidates import Candidate, load_candidates, make_items  # noqa: E402
from rlhf.feedback.export import export  # noqa: E402

XSS = "<script>alert(1)</script>"
CANDIDATES = [
    Candidate("Say hi " + XSS, ("hello " + XSS, 'plain "quoted" & <b>bold</b>'), "m1", "ck-1"),
    Candidate("Count to three", ("1 2 3", "one two"), "m1", "ck-1"),
    Candidate("Capital of France?", ("Paris", "Lyon", "Nice")),
]
HOST = "127.0.0.1:8000"


# ------------------------------------------------------------------ in-process Django site


@pytest.fixture(scope="module")
def django_db(tmp_path_factory):
    from django.conf import settings

    from rlhf.feedback.web.serve import configure, migrate

    if not settings.configured:
        db = tmp_path_factory.mktemp("fbweb") / "fb.sqlite"
        configure({"db": str(db), "fast_hashing": True, "quiet": True})
        migrate()
    return settings.DATABASES["default"]["NAME"]


@pytest.fixture
def site(django_db):
    """site(mode=..., scale=..., token=..., rater=...) -> a fresh database with CANDIDATES' items."""
    from django.contrib.auth import get_user_model
    from django.test.utils import override_settings

    from rlhf.feedback.web import models, records

    overrides = []

    def start(mode="compare", scale="stars", token=None, rater="ann", trainer_key=None, ratings_per_item=None):
        models.Rating.objects.all().delete()
        models.Item.objects.all().delete()
        get_user_model().objects.all().delete()
        records.add_items(make_items(CANDIDATES, mode))
        hosts = ["*"] if token else ["localhost", "127.0.0.1", "[::1]"]
        o = override_settings(FEEDBACK={"mode": mode, "scale": scale, "token": token, "rater": rater,
                                        "trainer_key": trainer_key, "ratings_per_item": ratings_per_item},
                              ALLOWED_HOSTS=hosts)
        o.enable()
        overrides.append(o)
        return records

    yield start
    for o in overrides:
        o.disable()


def client():
    from django.test import Client

    return Client(enforce_csrf_checks=True, HTTP_HOST=HOST)


def text(response) -> str:
    return response.content.decode("utf-8")


def form_fields(page: str, action: str) -> dict[str, str]:
    """Hidden inputs of the form posting to `action`."""
    form = re.search(rf'<form[^>]*action="{action}".*?</form>', page, re.S).group(0)
    return dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)">', form))


def shown(page: str) -> list[str]:
    return [html.unescape(t) for t in re.findall(r'<article class="response"[^>]*>.*?<div class="text">(.*?)</div></article>', page, re.S)]


def post(c, path, fields, fetch=True):
    headers = {"HTTP_HX_REQUEST": "true"} if fetch else {}
    return c.post(path, urlencode(fields), content_type="application/x-www-form-urlencoded", **headers)


# -------------------------------------------------------------------------------- the page


def test_page_escapes_model_and_user_text(site):
    site(rater='ev"il<i>')
    r = client().get("/")
    page = text(r)
    assert r.status_code == 200
    assert XSS not in page and "<b>bold</b>" not in page and "<i>" not in page
    assert "Say hi &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "hello &lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "plain &quot;quoted&quot; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "ev&quot;il&lt;i&gt;" in page
    csp = r["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "default-src 'none'" in csp
    scripts = re.findall(r"<script[^>]*>", page)
    assert scripts == ['<script src="/static/feedback/htmx.min.js" defer>', '<script src="/static/feedback/feedback.js" defer>']
    assert r["X-Content-Type-Options"] == "nosniff" and r["X-Frame-Options"] == "DENY"


def test_static_files_and_unknown_paths(site):
    site()
    c = client()
    r = c.get("/static/feedback/feedback.js")
    assert r.status_code == 200 and r["Content-Type"].startswith("text/javascript")
    assert b"keydown" in b"".join(r.streaming_content)
    assert c.get("/static/feedback/feedback.css").status_code == 200
    r = c.get("/static/feedback/htmx.min.js")  # htmx ships in the package: no CDN
    assert r.status_code == 200 and b"htmx" in b"".join(r.streaming_content)[:200]
    assert c.get("/static/admin/css/base.css").status_code == 200  # the admin's own assets
    for path in ("/nope", "/static/../settings.py", "/static/feedback/", "/static/%2e%2e/web/settings.py", "/favicon.ico"):
        assert c.get(path).status_code == 404, path


def test_host_header_must_be_loopback_without_token(site):
    site()
    c = client()
    assert c.get("/", HTTP_HOST="localhost:1234").status_code == 200
    assert c.get("/", HTTP_HOST="[::1]:8000").status_code == 200
    assert c.get("/", HTTP_HOST="evil.example:8000").status_code == 400  # DNS rebinding


def test_token_required_then_cookie(site):
    from rlhf.feedback.web.middleware import token_cookie_name

    token = secrets.token_urlsafe(16)
    site(token=token)
    anon = client()
    for path in ("/", "/static/feedback/feedback.js", "/nope", "/?token=wrong", "/admin/", "/login/"):
        assert anon.get(path).status_code == 403, path
    assert anon.post("/rate", {}).status_code == 403
    assert anon.get("/", HTTP_HOST="evil.example").status_code == 403

    c = client()
    r = c.get(f"/?token={token}")
    assert r.status_code == 303 and r["Location"] == "/"  # token dropped from the URL
    cookie = r.cookies[token_cookie_name()]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and token not in cookie.value
    assert c.get("/").status_code == 200  # the cookie alone is enough now
    assert c.get("/static/feedback/feedback.css").status_code == 200
    assert c.get("/nope").status_code == 404


def test_csrf_missing_or_wrong_is_403(site):
    records = site()
    c = client()
    page = text(c.get("/"))
    fields = form_fields(page, "/rate") | {"choice": "A"}
    bad = [
        {k: v for k, v in fields.items() if k != "csrfmiddlewaretoken"},
        fields | {"csrfmiddlewaretoken": "0" * 64},
    ]
    for body in bad:
        r = post(c, "/rate", body)
        assert r.status_code == 403 and "CSRF" in text(r)
    other = client()  # another browser: its own CSRF cookie, our page's token does not match it
    other.get("/")
    assert post(other, "/rate", fields).status_code == 403
    assert post(client(), "/rate", fields).status_code == 403  # no cookie at all
    assert records.ratings() == []
    assert post(c, "/rate", fields).status_code == 200
    assert len(records.ratings()) == 1


def test_body_limits(site):
    from django.conf import settings

    records = site()
    c = client()
    fields = form_fields(text(c.get("/")), "/rate") | {"choice": "A"}
    big = fields | {"pad": "x" * settings.DATA_UPLOAD_MAX_MEMORY_SIZE}
    assert post(c, "/rate", big).status_code == 400
    r = c.post("/rate", "{}", content_type="application/json", HTTP_X_CSRFTOKEN=fields["csrfmiddlewaretoken"])
    assert r.status_code == 415
    assert records.ratings() == []


def test_rate_flow_with_plain_forms_and_fetch(site):
    records = site()
    c = client()
    page = text(c.get("/"))
    assert "0 / 5 rated" in page
    first = form_fields(page, "/rate")
    a_text, b_text = shown(page)
    # plain form post (no JS): 303 back to the page
    r = post(c, "/rate", first | {"choice": "B"}, fetch=False)
    assert r.status_code == 303 and r["Location"] == "/?m=saved" and r["X-Feedback-Status"] == "saved"
    # the browser retries the same submission (say the response was lost): stored once
    r = post(c, "/rate", first | {"choice": "B"})
    fragment = text(r)
    assert r.status_code == 200 and r["X-Feedback-Status"] == "duplicate"
    assert "1 / 5 rated" in fragment and "<html" not in fragment
    [row] = records.ratings()
    assert (row.rater, row.choice, row.shown) == ("ann", "B", (a_text, b_text))
    assert (row.model, row.checkpoint) == ("m1", "ck-1")

    # undo via fetch shows the undone item again
    undo = form_fields(fragment, "/undo")
    r = post(c, "/undo", undo)
    assert r["X-Feedback-Status"] == "undone" and "0 / 5 rated" in text(r)
    assert form_fields(text(r), "/rate")["item_id"] == first["item_id"]
    assert post(c, "/undo", undo)["X-Feedback-Status"] == "duplicate"  # retried undo: no 2nd undo

    for bad in ({"choice": "Z"}, {"item_id": "nope"}, {"submission_id": "x"}, {"order": "0,0"}, {"order": "a"}):
        assert post(c, "/rate", first | {"choice": "A"} | bad).status_code == 400, bad
    assert len(records.ratings()) == 0 and len(records.ratings(include_undone=True)) == 1
    assert c.get("/rate").status_code == 405


def test_accounts_login_and_admin(site):
    from django.contrib.auth import get_user_model

    records = site(rater=None)
    users = get_user_model().objects
    users.create_user("zoë", password="correct-horse")
    users.create_superuser("boss", password="correct-horse")
    c = client()
    r = c.get("/")
    assert r.status_code == 302 and r["Location"].startswith("/login/")
    login = text(c.get("/login/"))
    csrf = form_fields(login, "/login/")["csrfmiddlewaretoken"]
    bad = post(c, "/login/", {"csrfmiddlewaretoken": csrf, "username": "zoë", "password": "nope"}, fetch=False)
    assert bad.status_code == 200 and "Wrong name or password" in text(bad)
    r = post(c, "/login/", {"csrfmiddlewaretoken": csrf, "username": "zoë", "password": "correct-horse", "next": "/"}, fetch=False)
    assert r.status_code == 302 and r["Location"] == "/"
    page = text(c.get("/"))
    assert "rating as <b>zoë</b>" in page
    post(c, "/rate", form_fields(page, "/rate") | {"choice": "tie"})
    assert records.ratings()[0].rater == "zoë"
    # raters cannot use the admin; an admin account browses the ratings there
    assert c.get("/admin/feedback/rating/").status_code == 302
    admin = client()
    admin.force_login(users.get(username="boss"))
    r = admin.get("/admin/feedback/rating/")
    assert r.status_code == 200 and "zoë" in text(r) and XSS not in text(r)
    assert admin.get("/admin/feedback/item/").status_code == 200


@pytest.mark.parametrize("scale, choices", [("stars", ["5", "1", "3"]), ("thumbs", ["up", "down", "up"])])
def test_rate_mode(site, tmp_path, scale, choices):
    records = site(mode="rate", scale=scale)
    c = client()
    page = text(c.get("/"))
    assert "0 / 7 rated" in page and len(shown(page)) == 1
    wrong = "up" if scale == "stars" else "5"
    assert post(c, "/rate", form_fields(page, "/rate") | {"choice": wrong}).status_code == 400
    for choice in choices:
        page = text(post(c, "/rate", form_fields(page, "/rate") | {"choice": choice}))
    assert "3 / 7 rated" in page
    export(None, tmp_path / "out", rows=records.ratings(include_undone=True))
    rows = [json.loads(x) for x in (tmp_path / "out" / "ratings.jsonl").read_text().splitlines()]
    assert [r["rating"] for r in rows] == [int(c) if c.isdigit() else c for c in choices]
    assert [r["response"] for r in rows] == ["hello " + XSS, 'plain "quoted" & <b>bold</b>', "1 2 3"]


def test_done_page(site):
    site()
    c = client()
    page = text(c.get("/"))
    for _ in range(5):
        page = text(post(c, "/rate", form_fields(page, "/rate") | {"choice": "A"}))
    assert "All done" in page and "5 / 5 rated" in page


def test_page_shows_model_and_round(site):
    site()
    page = text(client().get("/"))
    assert '<p class="source muted">by <b>m1</b> · ck-1</p>' in page


def test_ratings_per_item_shares_the_work(site):
    """With ratings_per_item=1 an item one rater judged is not shown to the next."""
    site(ratings_per_item=1)
    ann, bob = client(), client()
    first = form_fields(text(ann.get("/")), "/rate")
    assert post(ann, "/rate", first | {"choice": "A"})["X-Feedback-Status"] == "saved"
    with override_rater("bob"):
        page = text(bob.get("/"))
        assert form_fields(page, "/rate")["item_id"] != first["item_id"]
        assert "0 / 4 rated" in page  # 5 items, one done by ann


def override_rater(name):
    from django.conf import settings
    from django.test.utils import override_settings

    return override_settings(FEEDBACK={**settings.FEEDBACK, "rater": name})


API = {"HTTP_AUTHORIZATION": "Bearer " + "k" * 4}


def api_items(c, rows, **headers):
    return c.post("/api/items", json.dumps({"items": rows}), content_type="application/json", **headers)


def test_online_page_serves_the_newest_round_first(site):
    """With the trainer API on, a rater gets the newest items first (the round a trainer waits on)."""
    records = site(trainer_key="k" * 4)
    c = client()
    new = api_items(c, [{"mode": "compare", "prompt": "new", "responses": ["x", "y"], "model": "m", "checkpoint": "round 1"}], **API).json()
    assert form_fields(text(c.get("/")), "/rate")["item_id"] == new["ids"][0]
    assert records.open_items("ann", "compare").first().prompt == CANDIDATES[0].prompt  # oldest first otherwise


def test_trainer_api_publishes_and_reads(site):
    """Publish is idempotent per content; ratings are read per model; undone ones are not."""
    records = site(trainer_key="k" * 4, token="t" * 20)  # the API is exempt from the page's token
    c = client()
    rows = [{"mode": "compare", "prompt": "sort: cba\n", "responses": ["abc", "cba"], "model": "run/online", "checkpoint": "round 0"}]
    first = api_items(c, rows, **API).json()
    assert first["new"] == 1 and api_items(c, rows, **API).json() == {"ids": first["ids"], "new": 0}
    item = records.get_item(first["ids"][0], "compare")
    assert item.model == "run/online" and item.indices == (0, 1)
    assert records.record(submission_id="s" * 10, rater="ann", item=item, choice="B", order=(1, 0)).status == "saved"
    got = c.get("/api/ratings?model=run/online", **API).json()["ratings"]
    assert [(r["rater"], r["choice"], r["shown"], r["checkpoint"]) for r in got] == [("ann", "B", ["cba", "abc"], "round 0")]
    assert c.get("/api/ratings?model=other", **API).json()["ratings"] == []
    records.undo_last(submission_id="u" * 10, rater="ann", mode="compare")
    assert c.get("/api/ratings?model=run/online", **API).json()["ratings"] == []


def test_trainer_api_refusals(site):
    site(trainer_key="k" * 4)
    c = client()
    ok = [{"mode": "compare", "prompt": "p", "responses": ["a", "b"]}]
    assert api_items(c, ok).status_code == 403
    assert api_items(c, ok, HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
    assert c.get("/api/ratings?model=m").status_code == 403
    assert c.get("/api/ratings", **API).status_code == 400
    for bad in ([{"mode": "compare", "prompt": "p", "responses": ["a"]}], [{"mode": "x", "prompt": "p", "responses": ["a", "b"]}],
                [{"mode": "compare", "prompt": 3, "responses": ["a", "b"]}], ["not an object"]):
        r = api_items(c, bad, **API)
        assert r.status_code == 400 and "bad items" in r.json()["error"]
    assert c.post("/api/items", "{", content_type="application/json", **API).status_code == 400
    assert c.post("/api/items", "[" * 200_000, content_type="application/json", **API).status_code == 400  # too deep
    assert api_items(c, ok, HTTP_AUTHORIZATION="k" * 4).status_code == 403  # the key without "Bearer "
    for bad, why in (([{"mode": "rate", "prompt": "p", "responses": ["a"]}], "serves compare items, not rate"),
                     ([{"mode": "compare", "prompt": "p", "responses": ["a", "a"]}], "are the same"),
                     ([{"mode": "compare", "prompt": "p\x00", "responses": ["a", "b"]}], "NUL"),
                     ([{"mode": "compare", "prompt": "p", "responses": ["a", "b"], "indices": [True, False]}], "indices")):
        r = api_items(c, bad, **API)
        assert r.status_code == 400 and why in r.json()["error"], r.json()
    site()  # no trainer key: the API is off
    assert api_items(client(), ok, **API).status_code == 404


def test_online_page_waits_for_the_next_round(site):
    """With the trainer API on, the done card polls for new items instead of saying goodbye."""
    site(trainer_key="k" * 4)
    c = client()
    page = text(c.get("/"))
    for _ in range(5):
        page = text(post(c, "/rate", form_fields(page, "/rate") | {"choice": "A"}))
    assert "Nothing to rate right now" in page and 'hx-get="/" hx-trigger="every 3s"' in page
    fragment = text(c.get("/", HTTP_HX_REQUEST="true"))
    assert "<html" not in fragment and "Nothing to rate right now" in fragment


# ------------------------------------------------------------------- the real server (CLI)


class Http:
    """A tiny cookie-keeping HTTP client (one connection per request, like a browser tab)."""

    def __init__(self, base_url: str):
        url = urlsplit(base_url)
        self.host, self.port = url.hostname, url.port
        self.cookies: dict[str, str] = {}

    def request(self, method, path, body: bytes | None = None, headers: dict | None = None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        hdrs = dict(headers or {})
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

    def get(self, path="/"):
        return self.request("GET", path)

    def post(self, path, fields: dict, fetch=True):
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        if fetch:
            headers["HX-Request"] = "true"
        return self.request("POST", path, body=urlencode(fields).encode(), headers=headers)

    def login(self, name: str, password: str) -> None:
        page = self.get("/login/")[2]
        csrf = form_fields(page, "/login/")["csrfmiddlewaretoken"]
        status, headers, _ = self.post(
            "/login/", {"csrfmiddlewaretoken": csrf, "username": name, "password": password, "next": "/"}, fetch=False
        )
        assert status == 302, (status, name)


def write_candidates(path):
    path.write_text("".join(json.dumps({"prompt": c.prompt, "responses": list(c.responses)}) + "\n" for c in CANDIDATES))
    return path


def test_cli_serve_end_to_end(tmp_path, feedback_server):
    """`feedback serve` (gunicorn) prints the URL with the token and serves it; export reads its DB."""
    cands = write_candidates(tmp_path / "c.jsonl")
    token = secrets.token_urlsafe(16)
    db = tmp_path / "fb.sqlite"
    server = feedback_server("--candidates", str(cands), "--db", str(db), "--token", token, "--rater", "ann")
    assert server.lines[0].startswith("Serving 5 compare items"), server.lines
    assert f"?token={token}" in server.lines[1]
    c = Http(server.url)
    assert c.get()[0] == 403
    assert c.get(f"/?token={token}")[0] == 303
    status, headers, page = c.get()
    assert status == 200 and "0 / 5 rated" in page and headers["Server"].startswith("gunicorn")
    status, headers, _ = c.post("/rate", form_fields(page, "/rate") | {"choice": "A"})
    assert status == 200 and headers["X-Feedback-Status"] == "saved"
    counts = export(db, tmp_path / "out")  # the SQLite file keeps the schema export reads
    assert counts["pairs"] == 1


def test_cli_serves_a_database_from_the_earlier_page(tmp_path, feedback_server):
    """A SQLite file the standard-library page wrote (FeedbackStore) is migrated, rows kept."""
    from rlhf.feedback.store import FeedbackStore

    db = tmp_path / "old.sqlite"
    store = FeedbackStore(db)
    items = make_items(CANDIDATES, "compare")
    store.add_items(items)
    store.record(submission_id="old-sub-0001", rater="ann", item=items[0], choice="A", order=(1, 0))
    store.record(submission_id="old-sub-0002", rater="ann", item=items[1], choice="B", order=(0, 1))
    store.undo_last(submission_id="old-undo-001", rater="ann", mode="compare")
    before = export(db, tmp_path / "before")
    server = feedback_server("--db", str(db), "--rater", "ann")  # no --candidates: the stored items
    assert "Serving 5 compare items" in server.lines[0]
    c = Http(server.url)
    page = c.get()[2]
    assert "1 / 5 rated" in page and form_fields(page, "/rate")["item_id"] == items[1].id  # file order, resumed
    status, headers, _ = c.post("/rate", form_fields(page, "/rate") | {"choice": "tie"})
    assert headers["X-Feedback-Status"] == "saved"
    rows = FeedbackStore(db).ratings(include_undone=True)
    assert [(r.submission_id, r.choice, r.undone_at is not None) for r in rows[:2]] == [
        ("old-sub-0001", "A", False), ("old-sub-0002", "B", True)]
    assert export(db, tmp_path / "after") == before | {"ties": 1}


def test_cli_refuses_open_bind_without_token(tmp_path):
    from rlhf.feedback.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--db", str(tmp_path / "fb.sqlite")]) == 2
    assert not (tmp_path / "fb.sqlite").exists()


# ----------------------------------------------------------------------------- concurrency


def many_raters(url: str, items: list, n_raters=50, per_rater=4, n_retries=2) -> tuple[list[str], float]:
    """50 logged-in raters post at the same moment, some retry. -> statuses, seconds."""
    barrier = threading.Barrier(n_raters)
    errors: list[str] = []
    statuses: list[str] = []
    lock = threading.Lock()

    def rater(k: int) -> None:
        try:
            client = Http(url)
            client.login(f"rater{k:02d}", "correct-horse")
            page = client.get()[2]
            csrf = form_fields(page, "/rate")["csrfmiddlewaretoken"]
            posts = [
                {"csrfmiddlewaretoken": csrf, "submission_id": f"r{k:02d}-item{i}-{secrets.token_hex(4)}",
                 "item_id": items[i].id, "order": "1,0", "choice": "AB"[(k + i) % 2]}
                for i in range(per_rater)
            ]
            posts += posts[:n_retries]  # retried duplicates
            barrier.wait(timeout=60)
            for body in posts:
                status, headers, text_ = client.post("/rate", body)
                with lock:
                    if status != 200:
                        errors.append(f"rater{k}: {status} {text_[:80]}")
                    statuses.append(headers.get("X-Feedback-Status"))
        except Exception as err:  # noqa: BLE001 -- reported below
            with lock:
                errors.append(f"rater{k}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=rater, args=(k,)) for k in range(n_raters)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "clients hung"
    assert errors == []
    assert statuses.count("saved") == n_raters * per_rater
    assert statuses.count("duplicate") == n_raters * n_retries
    return statuses, time.perf_counter() - start


def check_rows(rows, items, n_raters=50, per_rater=4):
    assert len(rows) == n_raters * per_rater
    assert len({r.submission_id for r in rows}) == len(rows)
    assert len({(r.rater, r.item_id) for r in rows}) == len(rows)
    for r in rows:
        k, i = int(r.rater[5:]), next(i for i, it in enumerate(items) if it.id == r.item_id)
        assert r.choice == "AB"[(k + i) % 2]


RATERS = [f"rater{k:02d}" for k in range(50)]


def test_many_raters_at_once_sqlite(tmp_path, feedback_server):
    cands = write_candidates(tmp_path / "c.jsonl")
    db = tmp_path / "fb.sqlite"
    add_raters(["--db", str(db)], RATERS)
    server = feedback_server("--candidates", str(cands), "--db", str(db))
    items = make_items(load_candidates(cands), "compare")
    _, elapsed = many_raters(server.url, items)
    from rlhf.feedback.store import FeedbackStore

    check_rows(FeedbackStore(db).ratings(include_undone=True), items)
    assert export(db, tmp_path / "out")["pairs"] == 200
    print(f"\nSQLite: 50 raters x (4 + 2 retried) posts at once: {elapsed:.2f}s")


def test_many_raters_at_once_postgres(tmp_path, feedback_server, postgres_url):
    cands = write_candidates(tmp_path / "c.jsonl")
    add_raters(["--database-url", postgres_url], RATERS)
    server = feedback_server("--candidates", str(cands), "--database-url", postgres_url)
    items = make_items(load_candidates(cands), "compare")
    _, elapsed = many_raters(server.url, items)
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "rlhf", "feedback", "export", "--database-url", postgres_url,
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    pairs = [json.loads(x) for x in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) == 200
    print(f"\nPostgreSQL: 50 raters x (4 + 2 retried) posts at once: {elapsed:.2f}s")
