"""Security headers on every answer, and the shared-token gate for non-loopback use."""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import urlencode

from django.conf import settings
from django.http import HttpResponse, HttpResponseRedirect

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


class SecurityHeaders:
    """A strict CSP (no inline scripts: even a missed escape could not run code)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        response.setdefault("Content-Security-Policy", CSP)
        response.setdefault("X-Content-Type-Options", "nosniff")
        response.setdefault("Referrer-Policy", "same-origin")
        response.setdefault("Cache-Control", "no-store")
        return response


def token_cookie_name() -> str:
    return f"rlhf_token_{settings.PORT}"


def token_cookie_value(token: str) -> str:
    return hashlib.sha256(b"rlhf-feedback-token\0" + token.encode("utf-8")).hexdigest()


class TokenGate:
    """With a token, every request needs it: as `?token=` once (answered with an HttpOnly,
    SameSite=Strict cookie holding its hash, and a redirect that drops it from the URL), then
    as that cookie. Anything else gets 403 before any view runs."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        token = settings.FEEDBACK.get("token")
        if not token or request.path.startswith("/api/"):  # the trainer API checks its own key
            return self.get_response(request)
        expected = token_cookie_value(token)
        given = request.GET.get("token")
        if given is not None and request.method == "GET":
            if not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode("utf-8")):
                return HttpResponse("Forbidden: wrong token.", status=403, content_type="text/plain")
            rest = urlencode([(k, v) for k, v in request.GET.items() if k != "token"])
            response = HttpResponseRedirect(request.path + (f"?{rest}" if rest else ""))
            response.status_code = 303
            response.set_cookie(token_cookie_name(), expected, httponly=True, samesite="Strict",
                                max_age=30 * 86400)
            return response
        cookie = request.COOKIES.get(token_cookie_name(), "")
        if not hmac.compare_digest(cookie.encode("ascii", "replace"), expected.encode()):
            return HttpResponse("Forbidden: this page needs the link with its token.", status=403,
                                content_type="text/plain")
        return self.get_response(request)
