"""The feedback page as a Django app: models (ratings, items), views, templates, admin.

Configured in code (`settings.py`) from one JSON blob in $RLHF_FEEDBACK_CONFIG, which
`feedback serve` writes before it starts gunicorn. Tests set it the same way.
"""
