"""Django settings for the feedback page, built from $RLHF_FEEDBACK_CONFIG (JSON).

Keys: db (SQLite file), database_url (postgres://... wins over db), mode, scale, token, rater
(a name used when nobody is logged in; for one person on their own machine), port (names the
cookies, so two pages on one machine do not clash), ratings_per_item, secret_key,
fast_hashing (tests only). The trainer API's key comes from $RLHF_FEEDBACK_TRAINER_KEY.
"""

from __future__ import annotations

import json
import os
import secrets

CONFIG = json.loads(os.environ.get("RLHF_FEEDBACK_CONFIG") or "{}")


def database(config: dict) -> dict:
    url = config.get("database_url")
    if url:
        import dj_database_url

        return dj_database_url.parse(url, conn_max_age=0)
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": os.path.abspath(config.get("db") or "feedback.sqlite"),
        # The write lock is taken at BEGIN, so two writers never deadlock on a lock upgrade;
        # WAL lets readers run beside the one writer; a busy writer waits up to 30 s.
        "OPTIONS": {
            "transaction_mode": "IMMEDIATE",
            "timeout": 30,
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;",
        },
    }


SECRET_KEY = CONFIG.get("secret_key") or secrets.token_urlsafe(50)
DEBUG = False
TOKEN = CONFIG.get("token") or None
# Without a token only loopback Host headers are served (a DNS-rebinding page gets 400).
ALLOWED_HOSTS = ["*"] if TOKEN else ["localhost", "127.0.0.1", "[::1]"]

FEEDBACK = {
    "mode": CONFIG.get("mode", "compare"),
    "scale": CONFIG.get("scale", "stars"),
    "rater": CONFIG.get("rater") or None,
    "token": TOKEN,
    # show a rater only items with fewer live ratings than this (None: every rater rates every item)
    "ratings_per_item": CONFIG.get("ratings_per_item") or None,
    # the trainer API's key (views.py): from the environment, not a command line `ps` shows
    "trainer_key": os.environ.get("RLHF_FEEDBACK_TRAINER_KEY") or None,
}
PORT = int(CONFIG.get("port") or 0)

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rlhf.feedback.web",
]
MIDDLEWARE = [
    "rlhf.feedback.web.middleware.SecurityHeaders",
    "rlhf.feedback.web.middleware.TokenGate",
    "django.middleware.common.CommonMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]
ROOT_URLCONF = "rlhf.feedback.web.urls"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,  # autoescape is on (Django's default)
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    }
]
WSGI_APPLICATION = None
DATABASES = {"default": database(CONFIG)}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "/static/"
LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/login/"

# Cookies: HttpOnly, SameSite=Strict, named per port (cookies ignore ports).
SESSION_COOKIE_NAME = f"rlhf_session_{PORT}"
CSRF_COOKIE_NAME = f"rlhf_csrf_{PORT}"
SESSION_COOKIE_SAMESITE = CSRF_COOKIE_SAMESITE = "Strict"
SESSION_COOKIE_HTTPONLY = CSRF_COOKIE_HTTPONLY = True
SESSION_COOKIE_AGE = 30 * 86400
CSRF_FAILURE_VIEW = "rlhf.feedback.web.views.csrf_failure"
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
# "same-origin", not "no-referrer": under no-referrer Chromium sends `Origin: null` with form
# POSTs, which Django's CSRF check rightly refuses.
SECURE_REFERRER_POLICY = "same-origin"

# Bounded bodies: a form larger than this is refused (400) before it is parsed.
DATA_UPLOAD_MAX_MEMORY_SIZE = 64 * 1024
DATA_UPLOAD_MAX_NUMBER_FIELDS = 100

if CONFIG.get("fast_hashing") or os.environ.get("RLHF_FEEDBACK_FAST_HASHING"):  # tests only: cheap hashes
    PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"stderr": {"class": "logging.StreamHandler"}},
    "loggers": {"django": {"handlers": ["stderr"], "level": "WARNING" if CONFIG.get("quiet") else "INFO"}},
}
