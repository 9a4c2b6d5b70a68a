"""`python -m rlhf feedback serve|export` (also `python -m rlhf.feedback ...`)."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from urllib.parse import quote

from rlhf.errors import RLHFError

TOKEN_ENV = "RLHF_FEEDBACK_TOKEN"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf feedback",
        description="Collect human feedback on model responses in a local web page, and export it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,export,sample}")

    serve = sub.add_parser("serve", help="start the feedback web page")
    serve.add_argument("--candidates", metavar="FILE.jsonl",
                       help='rows {"prompt", "responses": [...], "model"?, "checkpoint"?}; '
                            "without it, the items already stored in --db are served")
    serve.add_argument("--db", default="feedback.sqlite", help="SQLite file for ratings (default: %(default)s)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default: %(default)s); any non-loopback address needs --token")
    serve.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 = any free port)")
    serve.add_argument("--token", default=None,
                       help=f"shared secret every request must carry (default: ${TOKEN_ENV} if set)")
    serve.add_argument("--rater", default=None,
                       help="default rater name (otherwise the page asks each person for one)")
    serve.add_argument("--mode", choices=("compare", "rate"), default="compare",
                       help="compare: pick the better of two responses; rate: score one (default: %(default)s)")
    serve.add_argument("--scale", choices=("stars", "thumbs"), default="stars",
                       help="rate mode: 1-5 stars or thumbs up/down (default: %(default)s)")
    serve.add_argument("--quiet", action="store_true", help="do not log requests")

    export = sub.add_parser("export", help="write pairs.jsonl / ratings.jsonl for training")
    export.add_argument("--db", required=True, help="the SQLite file `serve` wrote")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return {"serve": _serve, "export": _export, "sample": _sample}[args.command](args)
    except (RLHFError, OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from rlhf.feedback.candidates import load_candidates, make_items
    from rlhf.feedback.server import FeedbackApp, is_loopback, make_server
    from rlhf.feedback.store import FeedbackStore

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

    store = FeedbackStore(args.db)
    if args.candidates:
        items = make_items(load_candidates(args.candidates), args.mode)
        new = store.add_items(items)
        source = f"{args.candidates} ({new} new to {args.db})"
    else:
        items = store.load_items(args.mode)
        source = args.db
        if not items:
            print(f"error: no {args.mode} items in {args.db} yet: pass --candidates FILE.jsonl", file=sys.stderr)
            return 2
    app = FeedbackApp(store, items, args.mode, scale=args.scale, token=token, rater=args.rater, quiet=args.quiet)
    try:
        server = make_server(app, args.host, args.port)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            print(f"error: port {args.port} is already in use (try --port 0 for any free port)", file=sys.stderr)
        else:
            print(f"error: cannot bind {args.host}:{args.port}: {err.strerror or err}", file=sys.stderr)
        return 2
    url = server.url + (f"?token={quote(token, safe='')}" if token else "")
    print(f"Serving {len(items)} {args.mode} items from {source}", file=sys.stderr)
    print(f"Open {url}   (ratings go to {args.db}; Ctrl+C stops)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0


def _export(args: argparse.Namespace) -> int:
    from rlhf.feedback.export import export

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


if __name__ == "__main__":
    sys.exit(main())
