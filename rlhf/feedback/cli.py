"""`python -m rlhf feedback serve|export|sample|add-rater|simulate` (also `python -m rlhf.feedback ...`)."""

from __future__ import annotations

import argparse
import errno
import getpass
import os
import sys
from urllib.parse import quote

from rlhf.errors import RLHFError

TOKEN_ENV = "RLHF_FEEDBACK_TOKEN"
PASSWORD_ENV = "RLHF_FEEDBACK_PASSWORD"
TRAINER_KEY_ENV = "RLHF_FEEDBACK_TRAINER_KEY"
DATABASE_URL_HELP = "postgres://USER:PASSWORD@HOST:PORT/NAME: use this PostgreSQL database instead of --db"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf feedback",
        description="Collect human feedback on model responses in a local web page, and export it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,export,sample,add-rater,simulate}")

    serve = sub.add_parser("serve", help="start the feedback web page")
    serve.add_argument("--candidates", metavar="FILE.jsonl",
                       help='rows {"prompt", "responses": [...], "model"?, "checkpoint"?}; '
                            "without it, the items already stored in --db are served")
    serve.add_argument("--db", default="feedback.sqlite", help="SQLite file for ratings (default: %(default)s)")
    serve.add_argument("--database-url", default=None, help=DATABASE_URL_HELP)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: %(default)s); any non-loopback address needs --token")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 = any free port)")
    serve.add_argument("--token", default=None,
                       help=f"shared secret every request must carry (default: ${TOKEN_ENV} if set)")
    serve.add_argument("--rater", default=None,
                       help="rate as NAME without logging in (one person on their own machine); "
                            "otherwise each rater logs in with an account from `add-rater`")
    serve.add_argument("--mode", choices=("compare", "rate"), default="compare",
                       help="compare: pick the better of two responses; rate: score one (default: %(default)s)")
    serve.add_argument("--scale", choices=("stars", "thumbs"), default="stars",
                       help="rate mode: 1-5 stars or thumbs up/down (default: %(default)s)")
    serve.add_argument("--ratings-per-item", type=int, default=None, metavar="K",
                       help="show a rater only items rated fewer than K times so far (raters share the work; "
                            "default: every rater rates every item)")
    serve.add_argument("--quiet", action="store_true", help="do not log requests")
    serve.add_argument("--workers", type=int, default=2, help="gunicorn worker processes (default: %(default)s)")
    serve.add_argument("--threads", type=int, default=8, help="threads per worker (default: %(default)s)")

    export = sub.add_parser("export", help="write pairs.jsonl / ratings.jsonl for training")
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--db", help="the SQLite file `serve` wrote")
    source.add_argument("--database-url", help="the PostgreSQL database `serve --database-url` wrote")
    export.add_argument("--out", required=True, metavar="DIR", help="output folder")

    sample = sub.add_parser("sample", help="write candidates by sampling a trained stage's policy")
    sample.add_argument("--stage", required=True, metavar="DIR", help="a finished stage folder (runs/.../stages/NN_slot)")
    sample.add_argument("--prompts", required=True, metavar="FILE.jsonl", help='rows with a "prompt" key')
    sample.add_argument("--out", required=True, metavar="FILE.jsonl", help="candidates file to write")
    sample.add_argument("--n", type=int, default=2, help="responses per prompt (default: %(default)s)")
    sample.add_argument("--max-new-tokens", type=int, default=64)
    sample.add_argument("--temperature", type=float, default=1.0)
    sample.add_argument("--top-p", type=float, default=1.0)
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--model", default=None, help="model name to record (default: the stage folder's name)")

    rater = sub.add_parser("add-rater", help="create (or reset the password of) a rater account")
    rater.add_argument("names", nargs="+", metavar="NAME",
                       help="the name a rater logs in with; ratings are stored under it")
    rater.add_argument("--db", default="feedback.sqlite", help="SQLite file (default: %(default)s)")
    rater.add_argument("--database-url", default=None, help=DATABASE_URL_HELP)
    rater.add_argument("--admin", action="store_true", help="also let this account use /admin (browse ratings)")
    rater.add_argument("--password-env", action="store_true",
                       help=f"read the password from ${PASSWORD_ENV} instead of asking for it")

    sim = sub.add_parser("simulate", help="rate through the page as simulated raters (a judge function plus noise)")
    sim.add_argument("--url", required=True, help="the page's address as `serve` printed it (with its ?token=..., if any)")
    sim.add_argument("--rater", action="append", required=True, metavar="NAME",
                     help="an account from `add-rater` to rate as; repeat it or separate names by commas "
                          "(one thread each)")
    sim.add_argument("--password-env", action="store_true", required=True,
                     help=f"read the raters' password from ${PASSWORD_ENV} (required: there is no prompt)")
    sim.add_argument("--judge", default="rlhf.tasks.builtin.verifier_reward", metavar="MODULE.FUNCTION",
                     help="fn(prompts, responses) -> scores in [0, 1] (default: %(default)s)")
    sim.add_argument("--noise", type=float, default=0.0, help="chance of flipping a judgement (default: %(default)s)")
    sim.add_argument("--seed", type=int, default=0, help="noise seed, mixed with each rater's name (default: %(default)s)")
    sim.add_argument("--good", type=float, default=1.0, help="thumbs: up at a score >= this (default: %(default)s)")
    sim.add_argument("--poll", type=float, default=0.5, metavar="SECONDS",
                     help="with nothing to rate, look for new items this often (default: %(default)s)")
    sim.add_argument("--idle-exit", type=float, default=None, metavar="SECONDS",
                     help="stop after this long with nothing to rate (default: never)")
    sim.add_argument("--max-ratings", type=int, default=None, metavar="N", help="stop each rater after N ratings")
    sim.add_argument("--exit-with-parent", action="store_true",
                     help="stop when the process that started this one ends (a training stage's child)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return {"serve": _serve, "export": _export, "sample": _sample, "add-rater": _add_rater,
                "simulate": _simulate}[args.command](args)
    except (RLHFError, OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from rlhf.feedback.candidates import load_candidates, make_items
    from rlhf.feedback.web.serve import bind, configure, is_loopback, migrate, run_gunicorn, url_for

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if not is_loopback(args.host) and not token:
        print(
            f"error: refusing to bind {args.host or 'all interfaces'} without --token "
            "(anyone on the network could read and write ratings); pass --token SECRET or use --host 127.0.0.1",
            file=sys.stderr,
        )
        return 2
    if token is not None and len(token) < 16:
        print("warning: a --token shorter than 16 characters is easy to guess", file=sys.stderr)
    if not 0 <= args.port <= 65535:
        print(f"error: --port {args.port} is not a port number", file=sys.stderr)
        return 2
    if args.rater is not None and not (0 < len(args.rater) <= 150 and args.rater.isprintable()):
        print("error: --rater must be 1-150 printable characters", file=sys.stderr)
        return 2
    if args.ratings_per_item is not None and args.ratings_per_item < 1:
        print("error: --ratings-per-item must be >= 1", file=sys.stderr)
        return 2
    where = _where(args)
    # with the trainer API on, a training run publishes the items: an empty start is fine
    online = bool(os.environ.get(TRAINER_KEY_ENV))
    items = make_items(load_candidates(args.candidates), args.mode) if args.candidates else None
    if items is None and not online and not args.database_url and not os.path.exists(args.db):
        print(f"error: no {args.mode} items in {where} yet: pass --candidates FILE.jsonl", file=sys.stderr)
        return 2
    try:
        sock = bind(args.host, args.port)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            print(f"error: port {args.port} is already in use (try --port 0 for any free port)", file=sys.stderr)
        else:
            print(f"error: cannot bind {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 2
    url = url_for(sock)
    configure(_config(args, mode=args.mode, scale=args.scale, token=token, rater=args.rater,
                      port=sock.getsockname()[1], quiet=args.quiet, ratings_per_item=args.ratings_per_item))
    migrate()
    from rlhf.feedback.web import records

    if items is not None:
        new = records.add_items(items)
        source = f"{args.candidates} ({new} new to {where})"
    else:
        items = records.load_items(args.mode)
        source = where
        if not items and not online:
            sock.close()
            print(f"error: no {args.mode} items in {where} yet: pass --candidates FILE.jsonl", file=sys.stderr)
            return 2
    url += f"?token={quote(token, safe='')}" if token else ""
    print(f"Serving {len(items)} {args.mode} items from {source}"
          + ("; the trainer API is on (a training run publishes more)" if online else ""), file=sys.stderr)
    print(f"Open {url}   (ratings go to {where}; Ctrl+C stops)", file=sys.stderr, flush=True)
    run_gunicorn(sock, workers=args.workers, threads=args.threads, quiet=args.quiet)
    return 0


def _config(args: argparse.Namespace, **extra) -> dict:
    return {"db": args.db, "database_url": args.database_url, **extra}


def _where(args: argparse.Namespace) -> str:
    if args.database_url:
        from urllib.parse import urlsplit

        url = urlsplit(args.database_url)
        return f"{url.scheme}://{url.hostname or ''}{':' if url.port else ''}{url.port or ''}{url.path}"
    return args.db


def _add_rater(args: argparse.Namespace) -> int:
    from rlhf.feedback.web.serve import configure, migrate

    if args.password_env:
        password = os.environ.get(PASSWORD_ENV, "")
    else:
        password = getpass.getpass(f"password for {', '.join(args.names)}: ")
        if password != getpass.getpass("again: "):
            print("error: the passwords differ", file=sys.stderr)
            return 2
    if len(password) < 8:
        print("error: use a password of at least 8 characters", file=sys.stderr)
        return 2
    configure(_config(args, quiet=True))
    migrate()
    from django.contrib.auth import get_user_model

    for name in args.names:
        user, created = get_user_model().objects.get_or_create(username=name)
        user.set_password(password)
        if args.admin:
            user.is_staff = user.is_superuser = True
        user.save()
        what = "created" if created else "updated"
        print(f"{what} rater {name!r} in {_where(args)}" + (" (admin)" if args.admin else ""))
    return 0


def _export(args: argparse.Namespace) -> int:
    from rlhf.feedback.export import export

    if args.database_url:
        from rlhf.feedback.web.serve import configure

        configure(_config(args, quiet=True))
        from rlhf.feedback.web import records

        counts = export(None, args.out, rows=records.ratings(include_undone=True))
    else:
        counts = export(args.db, args.out)
    ratings = counts["ratings_stars"] + counts["ratings_thumbs"]
    print(
        f"wrote {os.path.join(args.out, 'pairs.jsonl')}: {counts['pairs']} pairs "
        f"(skipped {counts['ties']} ties, {counts['both_bad']} both-bad); "
        f"{os.path.join(args.out, 'ratings.jsonl')}: {ratings} ratings; "
        f"left out {counts['undone']} undone"
    )
    thumbs = os.path.join(args.out, "ratings_thumbs.jsonl" if counts["ratings_stars"] else "ratings.jsonl")
    if counts["ratings_stars"] and counts["ratings_thumbs"]:
        print(f"note: stars and thumbs are mixed; the thumbs went to {thumbs}")
    if counts["pairs"]:
        print(f"train on the pairs: python -m rlhf run recipe=from_feedback task.data={os.path.join(args.out, 'pairs.jsonl')}")
    if counts["ratings_thumbs"]:
        print(f"train on the thumbs (KTO): python -m rlhf run recipe=from_thumbs task.data={thumbs}")
    return 0


def _sample(args: argparse.Namespace) -> int:
    from rlhf.feedback.candidates import read_prompts, sample_candidates

    prompts = read_prompts(args.prompts)
    cands = sample_candidates(
        args.stage, prompts, args.n, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed, model=args.model, out=args.out,
    )
    print(f"wrote {args.out}: {len(cands)} prompts x {args.n} responses from {args.stage}")
    return 0


def _simulate(args: argparse.Namespace) -> int:
    import time

    from rlhf.feedback.simulate import run_raters

    password = os.environ.get(PASSWORD_ENV, "")
    if not password:
        print(f"error: set ${PASSWORD_ENV} to the raters' password", file=sys.stderr)
        return 2
    raters = [name.strip() for arg in args.rater for name in arg.split(",") if name.strip()]
    start = time.monotonic()

    def progress(counts) -> None:
        saved = sum(c["saved"] + c["duplicate"] for c in counts.values())
        flipped = sum(c["flipped"] for c in counts.values())
        print(f"simulate: {saved} ratings ({flipped} flipped) by {len(counts)} raters in {time.monotonic() - start:.0f} s",
              file=sys.stderr, flush=True)

    counts = run_raters(args.url, raters, password, judge=args.judge, noise=args.noise, seed=args.seed, good=args.good,
                        poll_s=args.poll, idle_exit_s=args.idle_exit, max_ratings=args.max_ratings,
                        exit_with_parent=args.exit_with_parent, progress=progress)
    for name, c in counts.items():
        print(f"rater {name}: saved {c['saved'] + c['duplicate']} (flipped {c['flipped']}), "
              f"already rated {c['already_rated']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
