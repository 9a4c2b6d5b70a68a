"""Start the page: configure Django, migrate the database, and serve it with gunicorn.

gunicorn (a pre-fork WSGI server) runs `workers` processes with `threads` threads each. We bind
the listening socket ourselves (so `--port 0` can pick a free port and print it before the
server starts) and hand it to gunicorn as `fd://N`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket

SETTINGS = "rlhf.feedback.web.settings"


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def configure(config: dict) -> None:
    """Set up Django for `config` (see settings.py for its keys) in this process."""
    import django
    from django.conf import settings

    blob = json.dumps(config)
    if settings.configured and os.environ.get("RLHF_FEEDBACK_CONFIG") != blob:
        raise RuntimeError("Django is already set up for another feedback database in this process")
    os.environ["RLHF_FEEDBACK_CONFIG"] = blob
    os.environ["DJANGO_SETTINGS_MODULE"] = SETTINGS
    django.setup()


def migrate() -> None:
    """Apply the migrations; a SQLite file written by the earlier standard-library page
    (tables `items` and `ratings`, no Django) is carried over first, every row kept."""
    from django.core.management import call_command
    from django.db import connection

    tables = set(connection.introspection.table_names())
    legacy = connection.vendor == "sqlite" and "ratings" in tables and "django_migrations" not in tables
    if legacy:
        with connection.cursor() as cur:
            cur.execute("ALTER TABLE ratings RENAME TO legacy_ratings")
            for index in ("ratings_one_live", "ratings_by_rater"):
                cur.execute(f"DROP INDEX IF EXISTS {index}")
    call_command("migrate", interactive=False, verbosity=0)
    if legacy:
        _copy_legacy(connection, has_items="items" in tables)


def _copy_legacy(connection, has_items: bool) -> None:
    from django.db import transaction

    columns = ("id, submission_id, rater, created_at, mode, item_id, prompt, shown, shown_order, choice, "
               "model, checkpoint, undone_at, undone_by")
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(f"INSERT INTO ratings ({columns}) SELECT {columns} FROM legacy_ratings ORDER BY id")
        cur.execute("DROP TABLE legacy_ratings")
        if has_items:
            cur.execute(
                "INSERT INTO feedback_item (key, mode, prompt, responses, indices, model, checkpoint, added_at) "
                "SELECT id, mode, prompt, responses, indices, model, checkpoint, added_at FROM items ORDER BY rowid"
            )
            cur.execute("DROP TABLE items")


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host.strip("[]"), port))
    sock.listen(256)
    sock.set_inheritable(True)
    return sock


def url_for(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def run_gunicorn(sock: socket.socket, *, workers: int = 2, threads: int = 8, quiet: bool = False) -> None:
    from django.core.wsgi import get_wsgi_application
    from django.db import connections
    from gunicorn.app.base import BaseApplication

    application = get_wsgi_application()
    connections.close_all()  # never share a database connection across the fork

    class App(BaseApplication):
        def load_config(self):
            options = {
                "bind": [f"fd://{sock.fileno()}"],
                "workers": workers,
                "worker_class": "gthread",
                "threads": threads,
                "accesslog": None if quiet else "-",
                "errorlog": "-",
                "loglevel": "warning" if quiet else "info",
                "timeout": 60,
                "graceful_timeout": 5,
                "limit_request_line": 8190,
                "limit_request_fields": 100,
                "proc_name": "rlhf-feedback",
                "control_socket_disable": True,
            }
            for key, value in options.items():
                self.cfg.set(key, value)

        def load(self):
            return application

    App().run()
