"""The feedback web server: `http.server.ThreadingHTTPServer`, one thread per request.

Routes
    GET  /                    the page (the next unrated item for this rater)
    GET  /static/<file>       CSS / JS shipped in rlhf/feedback/static/
    POST /rate                csrf, submission_id, item_id, order, choice
    POST /undo                csrf, submission_id
    POST /rater               csrf, rater
    anything else             404

Security
    * Token (`--token`): every request needs it, as `?token=` (first visit; answered with a
      cookie and a redirect that drops it from the URL) or as that HttpOnly, SameSite=Strict
      cookie; otherwise 403. Without a token the server only accepts loopback Host headers
      (a DNS-rebinding page cannot talk to it).
    * CSRF: a random per-session cookie; the page carries HMAC(server secret, session) and every
      POST must send it back (`hmac.compare_digest`), else 403.
    * Bodies over `max_body` bytes: 413. Only form-encoded POST bodies are accepted.
    * All text is HTML-escaped (page.py) and a strict Content-Security-Policy forbids inline
      scripts, so even a missed escape could not run code.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
import secrets
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from rlhf.feedback.candidates import Item
from rlhf.feedback.page import FLASH, View, buttons_for, render_error, render_main, render_page
from rlhf.feedback.store import FeedbackStore, valid_submission_id

MAX_BODY = 64 * 1024
STATIC_DIR = Path(__file__).with_name("static")
STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
_SESSION = re.compile(r"[A-Za-z0-9_-]{20,64}")
_TOKEN_IN_URL = re.compile(r"(token=)[^&\s]*")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def new_id() -> str:
    return secrets.token_urlsafe(16)


def valid_rater(name: str) -> bool:
    return 0 < len(name) <= 64 and name.isprintable() and name == name.strip()


# ----------------------------------------------------------------------------------------- app


class FeedbackApp:
    """Everything a request needs; immutable after construction, shared by all threads."""

    def __init__(
        self,
        store: FeedbackStore,
        items: list[Item],
        mode: str,
        *,
        scale: str = "stars",
        token: str | None = None,
        rater: str | None = None,
        max_body: int = MAX_BODY,
        quiet: bool = False,
    ):
        if mode not in ("compare", "rate"):
            raise ValueError(f"mode must be 'compare' or 'rate', got {mode!r}")
        if scale not in ("stars", "thumbs"):
            raise ValueError(f"scale must be 'stars' or 'thumbs', got {scale!r}")
        if any(it.mode != mode for it in items):
            raise ValueError(f"all items must be {mode} items")
        if rater is not None and not valid_rater(rater):
            raise ValueError("rater name must be 1-64 printable characters")
        self.store = store
        self.items = list(items)
        self.by_id = {it.id: it for it in self.items}
        self.mode = mode
        self.scale = scale
        self.token = token or None
        self.default_rater = rater
        self.max_body = max_body
        self.quiet = quiet
        self.secret = secrets.token_bytes(32)
        self.allowed_choices = {value for value, _, _ in buttons_for(mode, scale)}
        self.static = {
            f"/static/{p.name}": (p.read_bytes(), STATIC_TYPES[p.suffix])
            for p in sorted(STATIC_DIR.iterdir())
            if p.suffix in STATIC_TYPES
        }
        self.port = 0  # set by make_server, used to name cookies (cookies ignore ports)

    # names of cookies, per port so two servers on one machine do not clash
    def cookie(self, kind: str) -> str:
        return f"rlhf_{kind}_{self.port}"

    def token_cookie_value(self) -> str:
        assert self.token is not None
        return hashlib.sha256(b"rlhf-feedback-token\0" + self.token.encode("utf-8")).hexdigest()

    def csrf_for(self, session: str) -> str:
        return hmac.new(self.secret, session.encode("ascii"), hashlib.sha256).hexdigest()

    def order_for(self, item: Item, rater: str) -> tuple[int, ...]:
        """Display order of an item's responses: a stable per-(rater, item) coin flip for A/B."""
        if len(item.responses) == 1:
            return (0,)
        flip = hashlib.sha256(f"{rater}\0{item.id}".encode("utf-8")).digest()[0] & 1
        return (1, 0) if flip else (0, 1)

    def view(self, *, rater: str | None, session: str, flash: str | None = None,
             focus: str | None = None, ask_rater: bool = False) -> View:
        csrf = self.csrf_for(session)
        if rater is None or ask_rater:
            return View(self.mode, self.scale, csrf, rater, None, (), 0, len(self.items),
                        new_id(), new_id(), None, ask_rater=True)
        rated_ids = self.store.rated_item_ids(rater, self.mode)
        rated = sum(1 for it in self.items if it.id in rated_ids)
        item = None
        if focus and focus in self.by_id and focus not in rated_ids:
            item = self.by_id[focus]
        else:
            item = next((it for it in self.items if it.id not in rated_ids), None)
        order = self.order_for(item, rater) if item else ()
        return View(self.mode, self.scale, csrf, rater, item, order, rated, len(self.items),
                    new_id(), new_id(), FLASH.get(flash or ""))


# ------------------------------------------------------------------------------------- handler


class _Reject(Exception):
    def __init__(self, status: int, message: str, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.close = status, message, close


class Handler(BaseHTTPRequestHandler):
    server_version = "rlhf-feedback"
    sys_version = ""
    timeout = 30  # seconds a client may idle mid-request
    app: FeedbackApp  # set on the subclass made by make_server

    def version_string(self) -> str:
        return self.server_version

    # ------------------------------------------------------------------ plumbing

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (stdlib signature)
        if not self.app.quiet:
            line = _TOKEN_IN_URL.sub(r"\1***", format % args)  # never log the token
            sys.stderr.write(f"[feedback] {self.address_string()} {line}\n")

    def _cookies(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for header in self.headers.get_all("Cookie") or []:
            for part in header.split(";"):
                name, sep, value = part.strip().partition("=")
                if sep:
                    out.setdefault(name, value)
        return out

    def _send(self, status: int, body: bytes | str, content_type: str = "text/html; charset=utf-8",
              headers: dict[str, str] | None = None, cookies: list[str] | None = None) -> None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Content-Security-Policy", CSP)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        for cookie in cookies or []:
            self.send_header("Set-Cookie", cookie)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _set_cookie(self, name: str, value: str, max_age: int | None = None) -> str:
        age = f"; Max-Age={max_age}" if max_age else ""
        return f"{name}={value}; Path=/; HttpOnly; SameSite=Strict{age}"

    def _reject(self, err: _Reject) -> None:
        if err.close:
            self.close_connection = True
        wants_fragment = self.headers.get("X-Requested-With") == "fetch"
        if wants_fragment:
            self._send(err.status, err.message, "text/plain; charset=utf-8")
        else:
            self._send(err.status, render_error(err.status, err.message))

    # ------------------------------------------------------------------- checks

    def _check_access(self, query: dict[str, list[str]]) -> bool:
        """Token / Host checks. -> True if the token came in the URL (caller may set the cookie)."""
        app = self.app
        if app.token is None:
            host = (self.headers.get("Host") or "").strip().lower()
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name not in LOOPBACK_NAMES and not is_loopback(name):
                raise _Reject(403, "Forbidden: this server only answers to localhost / 127.0.0.1.")
            return False
        given = (query.get("token") or [""])[0]
        if given and hmac.compare_digest(given.encode("utf-8"), app.token.encode("utf-8")):
            return True
        cookie = self._cookies().get(app.cookie("token"), "")
        if cookie and hmac.compare_digest(cookie.encode("ascii", "replace"), app.token_cookie_value().encode()):
            return False
        raise _Reject(403, "Forbidden: open the link with ?token=… that the server printed when it started.")

    def _session(self) -> str | None:
        value = self._cookies().get(self.app.cookie("session"), "")
        return value if _SESSION.fullmatch(value) else None

    def _rater(self) -> str | None:
        raw = self._cookies().get(self.app.cookie("rater"))
        if raw:
            name = unquote(raw)
            if valid_rater(name):
                return name
        return self.app.default_rater

    def _read_form(self) -> dict[str, str]:
        if self.headers.get("Transfer-Encoding"):
            raise _Reject(411, "Chunked bodies are not accepted; send Content-Length.", close=True)
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            raise _Reject(411, "Content-Length required.", close=True)
        try:
            length = int(length_header)
        except ValueError:
            raise _Reject(400, "Bad Content-Length.", close=True) from None
        if length < 0:
            raise _Reject(400, "Bad Content-Length.", close=True)
        if length > self.app.max_body:
            self._drain(length)
            raise _Reject(413, f"Request body too large (limit {self.app.max_body} bytes).", close=True)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        body = self.rfile.read(length)
        if ctype != "application/x-www-form-urlencoded":
            raise _Reject(415, "Send the form as application/x-www-form-urlencoded.")
        try:
            fields = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=16)
        except (UnicodeDecodeError, ValueError):
            raise _Reject(400, "Malformed form body.") from None
        return {k: v[0] for k, v in fields.items()}

    def _drain(self, length: int, limit: int = 1 << 20) -> None:
        """Read (and drop) up to `limit` bytes of an oversized body, so the client sees our 413
        instead of a connection reset; anything beyond that is cut off by closing."""
        remaining = min(length, limit)
        try:
            self.connection.settimeout(2)
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 65536))
                if not chunk:
                    break
                remaining -= len(chunk)
        except OSError:
            pass

    def _check_csrf(self, form: dict[str, str]) -> str:
        session = self._session()
        if session is None:
            raise _Reject(403, "No session cookie (are cookies blocked?). Reload the page.")
        given = form.get("csrf", "")
        if not hmac.compare_digest(given.encode("utf-8"), self.app.csrf_for(session).encode()):
            raise _Reject(403, "Invalid CSRF token: the page is stale (server restarted?). Reload the page.")
        return session

    # ------------------------------------------------------------------- routes

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        try:
            url = urlsplit(self.path)
            query = parse_qs(url.query, max_num_fields=16)
            token_in_url = self._check_access(query)
            if url.path in self.app.static:
                data, ctype = self.app.static[url.path]
                return self._send(200, data, ctype, headers={"Cache-Control": "no-cache"})
            if url.path != "/":
                raise _Reject(404, "Not found.")
            cookies = []
            if token_in_url:  # swap the token in the URL for a cookie, and drop it from the URL
                cookies.append(self._set_cookie(self.app.cookie("token"), self.app.token_cookie_value()))
                self.send_response(303)
                self.send_header("Location", "/")
                self.send_header("Content-Length", "0")
                self.send_header("Referrer-Policy", "no-referrer")
                self.send_header("Cache-Control", "no-store")
                for c in cookies:
                    self.send_header("Set-Cookie", c)
                self.end_headers()
                return None
            session = self._session()
            if session is None:
                session = new_id() + new_id()
                cookies.append(self._set_cookie(self.app.cookie("session"), session))
            get = lambda key: (query.get(key) or [None])[0]  # noqa: E731
            view = self.app.view(
                rater=self._rater(), session=session, flash=get("m"), focus=get("item"),
                ask_rater=get("change_rater") == "1",
            )
            self._send(200, render_page(view), cookies=cookies)
        except _Reject as err:
            self._reject(err)

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        try:
            url = urlsplit(self.path)
            self._check_access(parse_qs(url.query, max_num_fields=16))
            route = {"/rate": self._post_rate, "/undo": self._post_undo, "/rater": self._post_rater}.get(url.path)
            if route is None:
                self.close_connection = True
                raise _Reject(404, "Not found.")
            form = self._read_form()
            session = self._check_csrf(form)
            route(form, session)
        except _Reject as err:
            self._reject(err)

    def _post_rate(self, form: dict[str, str], session: str) -> None:
        rater = self._require_rater()
        item = self.app.by_id.get(form.get("item_id", ""))
        if item is None:
            raise _Reject(400, "Unknown item (was the server restarted with other candidates?). Reload the page.")
        choice = form.get("choice", "")
        if choice not in self.app.allowed_choices:
            raise _Reject(400, f"Invalid choice {choice!r}.")
        submission_id = form.get("submission_id", "")
        if not valid_submission_id(submission_id):
            raise _Reject(400, "Missing or malformed submission_id.")
        try:
            order = tuple(int(k) for k in form.get("order", "").split(","))
        except ValueError:
            raise _Reject(400, "Malformed order.") from None
        if sorted(order) != list(range(len(item.responses))):
            raise _Reject(400, "Malformed order.")
        outcome = self.app.store.record(
            submission_id=submission_id, rater=rater, item=item, choice=choice, order=order
        )
        self._respond(session, rater, outcome.status)

    def _post_undo(self, form: dict[str, str], session: str) -> None:
        rater = self._require_rater()
        submission_id = form.get("submission_id", "")
        if not valid_submission_id(submission_id):
            raise _Reject(400, "Missing or malformed submission_id.")
        outcome = self.app.store.undo_last(submission_id=submission_id, rater=rater, mode=self.app.mode)
        focus = outcome.item_id if outcome.status in ("undone", "duplicate") else None
        self._respond(session, rater, outcome.status, focus=focus)

    def _post_rater(self, form: dict[str, str], session: str) -> None:
        name = " ".join(form.get("rater", "").split())
        if not valid_rater(name):
            raise _Reject(400, "A name must be 1-64 printable characters.")
        cookie = self._set_cookie(self.app.cookie("rater"), quote(name, safe=""), max_age=365 * 86400)
        self.send_response(303)
        self.send_header("Location", "/?m=rater")
        self.send_header("Content-Length", "0")
        self.send_header("Set-Cookie", cookie)
        self.end_headers()

    def _require_rater(self) -> str:
        rater = self._rater()
        if rater is None:
            raise _Reject(400, "Tell us your name first. Reload the page.")
        return rater

    def _respond(self, session: str, rater: str, status: str, focus: str | None = None) -> None:
        """fetch -> the new fragment; plain form post -> redirect back to the page."""
        if self.headers.get("X-Requested-With") == "fetch":
            view = self.app.view(rater=rater, session=session, flash=status, focus=focus)
            self._send(200, render_main(view), headers={"X-Feedback-Status": status})
            return
        location = f"/?m={quote(status)}" + (f"&item={quote(focus)}" if focus else "")
        self.send_response(303)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.send_header("X-Feedback-Status", status)
        self.end_headers()


# -------------------------------------------------------------------------------------- server


class FeedbackServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # many raters connecting at once must not overflow the backlog

    def __init__(self, address, handler, app: FeedbackApp):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.app = app
        super().__init__(address, handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{port}/"


def make_server(app: FeedbackApp, host: str = "127.0.0.1", port: int = 8000) -> FeedbackServer:
    """Bind (port 0 = any free port) without serving yet. Refuses a non-loopback host without a token."""
    if not is_loopback(host) and not app.token:
        raise PermissionError(
            f"refusing to bind {host or 'all interfaces'} without --token: anyone who can reach it "
            "could read and write ratings (pass --token SECRET, or bind 127.0.0.1)"
        )
    handler = type("BoundHandler", (Handler,), {"app": app})
    server = FeedbackServer((host, port), handler, app)
    app.port = server.server_address[1]
    return server


def start_in_thread(app: FeedbackApp, host: str = "127.0.0.1", port: int = 0) -> FeedbackServer:
    """Start serving in a daemon thread (tests, notebooks); stop with `server.shutdown()`."""
    server = make_server(app, host, port)
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="feedback-server", daemon=True
    )
    thread.start()
    server.thread = thread  # type: ignore[attr-defined]
    return server


__all__ = ["FeedbackApp", "FeedbackServer", "make_server", "start_in_thread", "is_loopback"]
