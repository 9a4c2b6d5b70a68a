"""A small local web page for collecting human feedback on model outputs.

`python -m rlhf feedback serve --candidates FILE.jsonl` shows prompts with two responses (compare
mode) or one response (rate mode); `python -m rlhf feedback export --db FILE --out DIR` writes the
judgements as the `pairs.jsonl` / `ratings.jsonl` files the training stages read. See
docs/feedback.md.

The page is a Django app (rlhf/feedback/web/) served by gunicorn, on SQLite by default or
PostgreSQL (`--database-url`), with htmx shipped as a static file. `store.py` reads and writes the same
`ratings` table without Django (export, tests).
"""
