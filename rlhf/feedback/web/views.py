"""Views: the page, the rate / undo posts, login, static files, and the CSRF failure answer.

A POST from htmx (header `HX-Request: true`) is answered with the fragment
(`feedback/main.html`) it swaps into `#app`; a plain form POST (no JS) with a 303 back to `/`.
The header `X-Feedback-Status` says what a write did: saved | duplicate | already_rated |
undone | nothing_to_undo.

The trainer API (on when the page is started with $RLHF_FEEDBACK_TRAINER_KEY set; the online
feedback stage's way in, from this machine or another): `POST /api/items` publishes items to
rate, `GET /api/ratings?model=NAME&after=ID` reads the live ratings of the items published under NAME. Both
need `Authorization: Bearer KEY`; they answer JSON.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import mimetypes
import secrets
from dataclasses import asdict

from django.conf import settings
from django.contrib.staticfiles import finders
from django.core.exceptions import SuspiciousFileOperation
from django.http import FileResponse, Http404, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import render
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from rlhf.feedback.candidates import MODES, Item, item_id
from rlhf.feedback.web import records

FLASH = {
    "saved": "Saved.",
    "duplicate": "Saved.",
    "already_rated": "You had already rated that one; your first answer was kept.",
    "undone": "Undid your last rating.",
    "nothing_to_undo": "Nothing to undo.",
}
COMPARE_BUTTONS = (  # value, label, key
    ("A", "A is better", "1"),
    ("B", "B is better", "2"),
    ("tie", "Tie", "t"),
    ("both_bad", "Both bad", "b"),
)
STAR_BUTTONS = tuple((str(i), "★" * i, str(i)) for i in range(1, 6))
THUMB_BUTTONS = (("up", "👍 Good", "u"), ("down", "👎 Bad", "d"))
UNDO_KEY = "z"


def buttons_for(mode: str, scale: str) -> tuple[tuple[str, str, str], ...]:
    if mode == "compare":
        return COMPARE_BUTTONS
    return STAR_BUTTONS if scale == "stars" else THUMB_BUTTONS


def new_id() -> str:
    return secrets.token_urlsafe(16)


def order_for(item: Item, rater: str) -> tuple[int, ...]:
    """Display order of an item's responses: a stable per-(rater, item) coin flip for A/B."""
    if len(item.responses) < 2:
        return tuple(range(len(item.responses)))
    flip = hashlib.sha256(f"{rater}\0{item.id}".encode("utf-8")).digest()[0] & 1
    return (1, 0) if flip else (0, 1)


def rater_for(request) -> str | None:
    """The logged-in account's name; else the server's default rater (`--rater`), if any."""
    if request.user.is_authenticated:
        return request.user.get_username()
    return settings.FEEDBACK.get("rater")


def _next_item(todo, rater: str, per_item: int | None):
    """The first open item; when raters share the work, a stable per-rater pick among the
    first few, so raters who load the page at once mostly get different items."""
    if not per_item:
        return todo.first()
    keys = list(todo.values_list("key", flat=True)[:32])
    if not keys:
        return None
    key = min(keys, key=lambda k: hashlib.sha256(f"{rater}\0{k}".encode("utf-8")).digest())
    return todo.filter(key=key).first()


def _context(rater: str, flash: str | None = None, focus: str | None = None) -> dict:
    mode, scale = settings.FEEDBACK["mode"], settings.FEEDBACK["scale"]
    per_item = settings.FEEDBACK.get("ratings_per_item")
    online = bool(settings.FEEDBACK.get("trainer_key"))
    # a trainer waits on its newest round: those items first, leftovers of earlier rounds after
    todo = records.open_items(rater, mode, per_item, newest_first=online)
    item = (todo.filter(key=focus).first() if focus else None) or _next_item(todo, rater, per_item)
    item = item.as_item() if item else None
    rated = records.rated_count(rater, mode)
    total = rated + todo.count()
    order = order_for(item, rater) if item else ()
    if item is None:
        responses = []
    elif mode == "compare":
        responses = [(label, item.responses[k]) for label, k in zip("AB", order)]
    else:
        responses = [("Response", item.responses[order[0]])]
    if mode == "compare":
        question = "Which response is better?"
    else:
        question = "How good is this response?" if scale == "stars" else "Is this response good?"
    return {
        "mode": mode, "scale": scale, "rater": rater, "item": item, "order": ",".join(map(str, order)),
        "responses": responses, "n_shown": len(responses), "question": question,
        "buttons": [(v, label, key, key.upper()) for v, label, key in buttons_for(mode, scale)],
        "rated": rated, "total": total, "total_or_1": max(total, 1),
        "pct": 100 * rated // total if total else 100,
        "flash": FLASH.get(flash or ""), "submission_id": new_id(), "undo_id": new_id(),
        "undo_key": UNDO_KEY, "undo_key_upper": UNDO_KEY.upper(),
        "online": online,  # a trainer publishes more items
    }


def _text(status: int, message: str) -> HttpResponse:
    return HttpResponse(message, status=status, content_type="text/plain; charset=utf-8")


@require_GET
def index(request):
    rater = rater_for(request)
    if rater is None:
        return HttpResponseRedirect(f"{settings.LOGIN_URL}?next=/")
    ctx = _context(rater, flash=request.GET.get("m"), focus=request.GET.get("item"))
    # htmx polling the "waiting for the next round" card gets the fragment only
    template = "feedback/main.html" if request.headers.get("HX-Request") == "true" else "feedback/page.html"
    return render(request, template, ctx)


def _form(request) -> dict[str, str] | HttpResponse:
    ctype = request.content_type or ""
    if ctype not in ("application/x-www-form-urlencoded", "multipart/form-data"):
        return _text(415, "Send the form as application/x-www-form-urlencoded.")
    return request.POST  # parsing a body over DATA_UPLOAD_MAX_MEMORY_SIZE raises -> 400


def _respond(request, rater: str, status: str, focus: str | None = None) -> HttpResponse:
    if request.headers.get("HX-Request") == "true":
        response = render(request, "feedback/main.html", _context(rater, flash=status, focus=focus))
    else:
        response = HttpResponseRedirect(f"/?m={status}" + (f"&item={focus}" if focus else ""))
        response.status_code = 303
    response["X-Feedback-Status"] = status
    return response


def _rater_and_form(request):
    """(rater, form) of a POST, or the response refusing it (not logged in, a bad body)."""
    rater = rater_for(request)
    if rater is None:
        return _text(403, "Log in first.")
    form = _form(request)
    return form if isinstance(form, HttpResponse) else (rater, form)


@require_POST
def rate(request):
    posted = _rater_and_form(request)
    if isinstance(posted, HttpResponse):
        return posted
    rater, form = posted
    mode = settings.FEEDBACK["mode"]
    item = records.get_item(form.get("item_id", ""), mode)
    if item is None:
        return _text(400, "Unknown item.")
    if form.get("choice") not in {v for v, _, _ in buttons_for(mode, settings.FEEDBACK["scale"])}:
        return _text(400, "That choice is not valid here.")
    try:
        order = tuple(int(k) for k in form.get("order", "").split(","))
        outcome = records.record(submission_id=form.get("submission_id", ""), rater=rater, item=item,
                                 choice=form["choice"], order=order)
    except ValueError as err:
        return _text(400, f"Bad request: {err}")
    return _respond(request, rater, outcome.status)


@require_POST
def undo(request):
    posted = _rater_and_form(request)
    if isinstance(posted, HttpResponse):
        return posted
    rater, form = posted
    try:
        outcome = records.undo_last(submission_id=form.get("submission_id", ""), rater=rater,
                                    mode=settings.FEEDBACK["mode"])
    except ValueError as err:
        return _text(400, f"Bad request: {err}")
    return _respond(request, rater, outcome.status, focus=outcome.item_id if outcome.status == "undone" else None)


@require_GET
def static(request, path: str):
    """The page's CSS/JS and the admin's assets, straight from the installed packages."""
    try:
        found = finders.find(path)
    except SuspiciousFileOperation:
        found = None
    if not found or path.endswith("/"):
        raise Http404(path)
    ctype = mimetypes.guess_type(found)[0] or "application/octet-stream"
    if ctype.startswith("text/") or ctype.endswith("javascript"):
        ctype += "; charset=utf-8"
    response = FileResponse(open(found, "rb"), content_type=ctype)
    response["Cache-Control"] = "no-cache"
    return response


def csrf_failure(request, reason: str = "") -> HttpResponse:
    return _text(403, "CSRF check failed: reload the page and try again.")


# ------------------------------------------------------------------------------ trainer API

API_MAX_BODY = 16 * 1024 * 1024  # one publish request; the page's own forms stay at 64 KiB


def _api_refusal(request) -> JsonResponse | None:
    key = settings.FEEDBACK.get("trainer_key")
    if not key:
        return JsonResponse({"error": "the trainer API is off: start the page with $RLHF_FEEDBACK_TRAINER_KEY set"}, status=404)
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme != "Bearer":
        given = ""
    if not hmac.compare_digest(given.encode("utf-8", "replace"), key.encode("utf-8")):
        return JsonResponse({"error": "wrong or missing trainer key (Authorization: Bearer KEY)"}, status=403)
    return None


def _item_from_json(row, page_mode: str) -> Item:
    if not isinstance(row, dict):
        raise ValueError("each item must be an object")
    mode, prompt, responses = row.get("mode"), row.get("prompt"), row.get("responses")
    if mode not in MODES or not isinstance(prompt, str):
        raise ValueError(f"item needs a mode in {MODES} and a string prompt")
    if mode != page_mode:  # stored, it would never be shown, and a trainer would wait for nothing
        raise ValueError(f"this page serves {page_mode} items, not {mode} (start it with --mode {mode})")
    if not isinstance(responses, list) or len(responses) != (2 if mode == "compare" else 1) or not all(isinstance(t, str) and t.strip() for t in responses):
        raise ValueError("item needs 2 (compare) or 1 (rate) non-empty string responses")
    if mode == "compare" and responses[0] == responses[1]:
        raise ValueError("a compare item's two responses are the same")
    model, checkpoint = row.get("model"), row.get("checkpoint")
    if not all(v is None or isinstance(v, str) for v in (model, checkpoint)):
        raise ValueError("model and checkpoint must be strings or null")
    if any("\x00" in t for t in (prompt, *responses, model or "", checkpoint or "")):
        raise ValueError("text holds a NUL character")  # PostgreSQL cannot store it
    indices = row.get("indices", list(range(len(responses))))
    if not isinstance(indices, list) or len(indices) != len(responses) or not all(type(k) is int and 0 <= k < 2**31 for k in indices):
        raise ValueError("indices must be a list of non-negative integers, one per response")
    # the id is the content's hash, so a retried publish stores nothing twice
    key = item_id(mode, prompt, responses, model, checkpoint)
    return Item(key, mode, prompt, tuple(responses), tuple(indices), model, checkpoint)


@csrf_exempt  # no cookies: the bearer key is the credential, so a cross-site form cannot use it
@require_POST
def api_items(request):
    """Publish items: body {"items": [{"mode", "prompt", "responses", "indices"?, "model"?,
    "checkpoint"?}, ...]} -> {"ids": [...], "new": count}. Idempotent per item content."""
    refused = _api_refusal(request)
    if refused:
        return refused
    body = request.read(API_MAX_BODY + 1)
    if not body:
        return JsonResponse({"error": "empty body (send it with a Content-Length)"}, status=400)
    if len(body) > API_MAX_BODY:
        return JsonResponse({"error": f"body over {API_MAX_BODY} bytes: publish in parts"}, status=413)
    try:
        rows = json.loads(body).get("items")
        if not isinstance(rows, list):
            raise ValueError('the body needs "items": [...]')
        items = [_item_from_json(row, settings.FEEDBACK["mode"]) for row in rows]
    except (ValueError, AttributeError, RecursionError) as err:
        return JsonResponse({"error": f"bad items: {err}"}, status=400)
    new = records.add_items(items)
    return JsonResponse({"ids": [it.id for it in items], "new": new})


@require_GET
def api_ratings(request):
    """Live ratings of the items published under `model` (required), with an id above `after`
    (default 0), oldest first: {"ratings": [RatingRow as an object, ...]}."""
    refused = _api_refusal(request)
    if refused:
        return refused
    model = request.GET.get("model")
    try:
        after = int(request.GET.get("after", "0"))
    except ValueError:
        after = -1
    if not model or after < 0:
        return JsonResponse({"error": "pass model=NAME (and after=ID >= 0)"}, status=400)
    rows = records.ratings(model=model, after=after)
    return JsonResponse({"ratings": [asdict(r) for r in rows]})
