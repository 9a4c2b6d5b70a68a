"""The text task: real text from JSONL files (Anthropic hh-rlhf, say), with a BPE tokenizer.

`task.data` names the files (a path, a glob or a list). Any row format the data readers know
may appear: hh-rlhf transcript pairs `{"chosen", "rejected"}`, explicit pairs
`{"prompt", "chosen", "rejected"}`, SFT or rating rows `{"prompt", "response", ...}`, their
conversational forms (message lists, `{"messages"}`; rendered with the plain template,
rlhf.data.chat, so on the hf backend, whose stages use the checkpoint's chat template, the
held-out filter misses conversational rows) and raw text `{"text"}`. From them the task takes

- the tokenizer: byte-level BPE (`task.vocab_size`) trained on all their text, ONCE per run,
  and saved as `<run_dir>/tokenizer.json`; a resumed run reloads that file, so token ids never
  change under a checkpoint. Rank 0 trains and writes it (atomically); other ranks wait for it.
- held-out prompts: a fixed slice (`task.num_eval_prompts`, at most a fifth of them; shuffled
  with `task.seed`, so it does not depend on the run's seed) of the distinct non-empty prompts.
  `train_prompt(rng)` never returns one of them, and the SFT, DPO and SPIN stages leave rows
  with these prompts out of their own `data` (StageContext.training_rows).

There is no verifier: `score()` is None, so the evaluation after each stage reports only the
response length. Long multi-turn prompts are shortened for evaluation to their last whole
turns within `MAX_EVAL_PROMPT_CHARS` characters (a small model's context is short, and
generation cost grows with the prompt).
"""

from __future__ import annotations

import logging
import random
import time
from pathlib import Path
from typing import Any, Optional

from rlhf.data.jsonl import HUMAN, BadRow, parse_pair, parse_sft, require_object, stream_rows
from rlhf.errors import ConfigError, RLHFError
from rlhf.files import atomic_path
from rlhf.models import BPETokenizer
from rlhf.tasks.config import TaskConfig

MAX_EVAL_PROMPT_CHARS = 1000
MAX_HELD_OUT_SHARE = 5  # held-out prompts are at most 1/5 of the distinct prompts
TOKENIZER_FILE = "tokenizer.json"
WAIT_FOR_TOKENIZER_S = 600.0


def _parse_any(row: Any) -> tuple[str, list[str]]:
    """(prompt or "", the row's pieces of text) for any row format the task accepts."""
    row = require_object(row)
    if "chosen" in row or "rejected" in row:
        try:
            pair = parse_pair(row)
        except BadRow:
            # a pair a preference stage would reject (identical sides, no shared prompt) still
            # holds good text for the tokenizer; only its prompt is unusable
            texts = [t for key in ("prompt", "chosen", "rejected") for t in _strings(row.get(key))]
            if not any(texts):
                raise
            return "", texts
        return pair.prompt, [pair.prompt, pair.chosen, pair.rejected]
    if "messages" in row or "completion" in row:
        # rendered with the plain template, as the stages render them for this task's tokenizer;
        # the last turn's prompt holds the whole conversation before the final answer
        last = parse_sft(row)[-1]
        return last.prompt, [last.prompt, last.response]
    if "response" in row:
        prompt, response = row.get("prompt", ""), row["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise BadRow("'prompt' and 'response' must be strings")
        return prompt, [prompt, response]
    if "text" in row:
        if not isinstance(row["text"], str):
            raise BadRow("'text' must be a string")
        return "", [row["text"]]
    raise BadRow(f"expected a pair, a prompt/response or a text row (keys: {sorted(row)})")


def _strings(value: Any) -> list[str]:
    """The text in a row's field: a string, or the contents of a message list."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [m["content"] for m in value if isinstance(m, dict) and isinstance(m.get("content"), str)]
    return []


def shorten_prompt(prompt: str, max_chars: int = MAX_EVAL_PROMPT_CHARS) -> str:
    """The last whole "\\n\\nHuman:" turns of `prompt` that fit in max_chars (else its tail)."""
    if len(prompt) <= max_chars:
        return prompt
    start = prompt.find(HUMAN, len(prompt) - max_chars)
    return prompt[start:] if start >= 0 else prompt[-max_chars:]


class TextTask:
    """Real text from `cfg.data`: a BPE tokenizer kept with the run, held-out prompts, no verifier."""

    def __init__(self, cfg: TaskConfig, run_dir: Path, rank: int = 0):
        if cfg.data is None:
            raise ConfigError("task.name=text needs task.data=PATH (JSONL files: pairs, prompt/response or text rows)")
        self.cfg = cfg

        def rows():  # streamed, twice at most, never all held: the files may be large (issue #17 item 9)
            return stream_rows(cfg.data, _parse_any, skip_bad_rows=False, stats=None, what="text task")

        prompts = list(dict.fromkeys(p for p, _ in rows() if p.strip()))  # distinct, in file order
        # the second pass runs only when the tokenizer is trained (not on a resumed run)
        self.tokenizer = self._tokenizer(Path(run_dir), (t for _, texts in rows() for t in texts if t), rank)
        random.Random(cfg.seed).shuffle(prompts)
        # at most a fifth of the distinct prompts (at least one): a small file (a feedback export
        # of 40 ratings, say) keeps most of its prompts to train on
        n = min(cfg.num_eval_prompts, max(1, len(prompts) // MAX_HELD_OUT_SHARE))
        if n < cfg.num_eval_prompts:
            logging.getLogger("rlhf").info("task: %d of %d distinct prompts held out for evaluation (task.num_eval_prompts=%d, at most 1/%d of them)", n, len(prompts), cfg.num_eval_prompts, MAX_HELD_OUT_SHARE)
        held_out = prompts[:n]
        self._held_out = set(held_out)
        self._train_prompts = prompts[n:]
        self._eval = [shorten_prompt(p) for p in held_out]

    def _tokenizer(self, run_dir: Path, texts, rank: int) -> BPETokenizer:
        path = run_dir / TOKENIZER_FILE
        if path.exists():
            return BPETokenizer.load(path)
        if rank == 0:
            tokenizer = BPETokenizer.train(texts, vocab_size=self.cfg.vocab_size)
            with atomic_path(path) as tmp:
                tokenizer.save(tmp)
            return tokenizer
        # another rank trains it: wait for the file rather than train a second, different one
        deadline = time.monotonic() + WAIT_FOR_TOKENIZER_S
        while not path.exists():
            if time.monotonic() > deadline:
                raise RLHFError(f"{path}: rank {rank} waited {WAIT_FOR_TOKENIZER_S:.0f} s for rank 0's tokenizer")
            time.sleep(0.2)
        return BPETokenizer.load(path)

    def eval_prompts(self) -> list[str]:
        return list(self._eval)

    def is_held_out(self, prompt: str) -> bool:
        return prompt in self._held_out

    def train_prompt(self, rng: random.Random) -> str:
        """A prompt from the data that is never a held-out one (for stages that sample)."""
        if not self._train_prompts:
            raise ConfigError("task.data has no prompts left after the held-out ones; lower task.num_eval_prompts")
        return rng.choice(self._train_prompts)

    def score(self, prompt: str, response: str) -> Optional[float]:
        return None
