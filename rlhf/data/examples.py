"""The example types every reader, task and stage exchanges."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    # False for a generation cut off at the token limit: it is trained without an EOS, so a
    # truncated text is never taught as a finished one
    chosen_finished: bool = True
    rejected_finished: bool = True


@dataclass(frozen=True)
class Rating:
    """One rated response. `label` is a bin index in [0, num_levels): 1-5 stars -> 0..4, thumbs down/up -> 0/1."""

    prompt: str
    response: str
    label: int
    num_levels: int
