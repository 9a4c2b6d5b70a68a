"""A small local web page for collecting human feedback on model outputs.

`python -m rlhf feedback serve --candidates FILE.jsonl` shows prompts with two responses (compare
mode) or one response (rate mode); `python -m rlhf feedback export --db FILE --out DIR` writes the
judgements as the `pairs.jsonl` / `ratings.jsonl` files the training stages read. See
docs/feedback.md.

Standard library only: `http.server` + SQLite (WAL) + a few lines of vanilla JS.
"""
