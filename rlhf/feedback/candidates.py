"""Candidates: the prompts and model responses people are asked to judge.

A candidates file is JSONL (optionally gzipped), one row per prompt::

    {"prompt": str, "responses": [str, ...], "model": str (optional), "checkpoint": str (optional)}

`make_items` turns rows into the *items* the page shows: in compare mode every pair of distinct
responses of a row is one item; in rate mode every response is one item. An item's id is a hash
of its content, so loading the same file twice gives the same ids (and ratings resume).
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf.errors import DataError
from rlhf.files import new_file_mode

MODES = ("compare", "rate")


@dataclass(frozen=True)
class Candidate:
    prompt: str
    responses: tuple[str, ...]
    model: str | None = None
    checkpoint: str | None = None
    source: str | None = field(default=None, compare=False)  # "path:line", for error messages

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {"prompt": self.prompt, "responses": list(self.responses)}
        if self.model is not None:
            row["model"] = self.model
        if self.checkpoint is not None:
            row["checkpoint"] = self.checkpoint
        return row


@dataclass(frozen=True)
class Item:
    """One thing to judge: a prompt with 2 responses (compare) or 1 response (rate)."""

    id: str
    mode: str
    prompt: str
    responses: tuple[str, ...]
    indices: tuple[int, ...]  # where each response sits in its candidate row's "responses"
    model: str | None = None
    checkpoint: str | None = None


# ------------------------------------------------------------------------------------ reading


def _optional_str(row: dict, key: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{key!r} must be a string or null, got {type(value).__name__}")
    return value


def _parse_row(row: Any) -> Candidate:
    if not isinstance(row, dict):
        raise ValueError(f"row must be a JSON object, got {type(row).__name__}")
    prompt = row.get("prompt")
    if not isinstance(prompt, str):
        raise ValueError("missing or non-string 'prompt'")
    responses = row.get("responses")
    if not isinstance(responses, list) or not responses:
        raise ValueError("'responses' must be a non-empty list of strings")
    for i, text in enumerate(responses):
        if not isinstance(text, str):
            raise ValueError(f"responses[{i}] is not a string")
        if not text.strip():
            raise ValueError(f"responses[{i}] is empty")
    return Candidate(
        prompt=prompt,
        responses=tuple(responses),
        model=_optional_str(row, "model"),
        checkpoint=_optional_str(row, "checkpoint"),
    )


def load_candidates(path: str | os.PathLike) -> list[Candidate]:
    """Read a candidates JSONL file (`.jsonl` or `.jsonl.gz`); blank lines are skipped.

    Raises `DataError("path:line: what is wrong")` on the first bad row, or when the file is
    missing or has no rows.
    """
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    out: list[Candidate] = []
    try:
        with opener(path, "rt", encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    cand = _parse_row(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{where}: invalid JSON ({err.msg} at column {err.colno})") from None
                except ValueError as err:
                    raise DataError(f"{where}: {err}") from None
                out.append(Candidate(cand.prompt, cand.responses, cand.model, cand.checkpoint, where))
    except FileNotFoundError:
        raise DataError(f"{path}: candidates file not found") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 ({err.reason})") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read ({getattr(err, 'strerror', None) or err})") from None
    if not out:
        raise DataError(f"{path}: no candidate rows (empty file?)")
    return out


def write_candidates(path: str | os.PathLike, candidates: Iterable[Candidate]) -> Path:
    """Write candidates as JSONL, atomically (a temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_lines(path, (json.dumps(c.to_row(), ensure_ascii=False) for c in candidates))
    return path


def atomic_write_lines(path: Path, lines: Iterable[str]) -> int:
    """Write `lines` (one per line) to `path` via a fsynced temp file + os.replace; -> count."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, new_file_mode())  # as if written in place, not mkstemp's 0600
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for line in lines:
                fh.write(line)
                fh.write("\n")
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return count


# -------------------------------------------------------------------------------------- items


def item_id(mode: str, prompt: str, responses: Sequence[str], model: str | None, checkpoint: str | None) -> str:
    key = json.dumps([mode, prompt, list(responses), model, checkpoint], ensure_ascii=False)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:20]


def make_items(candidates: Iterable[Candidate], mode: str) -> list[Item]:
    """Items to show, in file order, without duplicates.

    compare: every pair (i < j) of distinct responses of a row; a row with fewer than 2 distinct
    responses raises `DataError`. rate: every response.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    items: dict[str, Item] = {}
    for cand in candidates:
        if mode == "compare":
            pairs = [
                (i, j)
                for i, j in itertools.combinations(range(len(cand.responses)), 2)
                if cand.responses[i] != cand.responses[j]
            ]
            if not pairs:
                where = f"{cand.source}: " if cand.source else ""
                raise DataError(f"{where}compare mode needs at least 2 different responses per row")
            groups = [(i, j) for i, j in pairs]
        else:
            groups = [(i,) for i in range(len(cand.responses))]
        for idx in groups:
            texts = tuple(cand.responses[i] for i in idx)
            iid = item_id(mode, cand.prompt, texts, cand.model, cand.checkpoint)
            items.setdefault(iid, Item(iid, mode, cand.prompt, texts, idx, cand.model, cand.checkpoint))
    return list(items.values())


# ----------------------------------------------------------------------------------- sampling


def sample_candidates(
    stage_dir: str | os.PathLike,
    prompts: Iterable[str],
    n: int = 2,
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    model: str | None = None,
    device: str | None = None,
    out: str | os.PathLike | None = None,
) -> list[Candidate]:
    """Sample `n` responses per prompt from the policy a finished stage saved in `stage_dir`.

    Uses `rlhf.models.load_policy` and the project's batched, KV-cached sampler; seeded, so
    the same call gives the same candidates. Each candidate records `model` (default: the stage
    folder's name) and `checkpoint` (the stage folder). Empty responses are dropped, and with
    n >= 2 so are prompts left with fewer than 2 different responses (they could not be
    compared); a warning on the `rlhf` logger says how many. `out`: also write the candidates
    JSONL there (atomically), ready for `feedback serve --candidates`.
    """
    import logging

    import torch

    from rlhf.models import load_policy
    from rlhf.sampling import generate_text
    from rlhf.sampling import SamplingConfig

    prompts = list(prompts)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not prompts:
        raise ValueError("no prompts to sample from")
    stage_dir = Path(stage_dir)
    policy, tokenizer = load_policy(stage_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    policy.to(dev)
    generator = torch.Generator(device=dev).manual_seed(seed)
    cfg = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    texts = generate_text(policy, tokenizer, [p for p in prompts for _ in range(n)], cfg, batch_size, generator=generator)
    name = model or stage_dir.name
    out_rows: list[Candidate] = []
    dropped = 0
    for i, prompt in enumerate(prompts):
        responses = tuple(t for t in texts[i * n : (i + 1) * n] if t.strip())
        if not responses or (n >= 2 and len(set(responses)) < 2):
            dropped += 1
            continue
        out_rows.append(Candidate(prompt, responses, name, str(stage_dir)))
    if dropped:
        logging.getLogger("rlhf").warning(
            "sample_candidates: dropped %d of %d prompts (empty or identical responses)", dropped, len(prompts)
        )
    if out is not None:
        write_candidates(out, out_rows)
    return out_rows


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a JSONL file of rows with a "prompt" key (SFT / eval files work as they are)."""
    path = Path(path)
    prompts = []
    try:
        with open(path, encoding="utf-8-sig") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({err.msg})") from None
                if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                    raise DataError(f"{path}:{lineno}: expected an object with a string 'prompt'")
                prompts.append(row["prompt"])
    except FileNotFoundError:
        raise DataError(f"{path}: prompts file not found") from None
    if not prompts:
        raise DataError(f"{path}: no prompts")
    return prompts
