"""The built-in task: short instructions whose answers a program can check.

Two families, both "easy to check, harder to produce" for a small model:

  sort: qwhfkdmz\n   ->  dfhkmqwz     (sort the letters)
  add: 48213+937\n   ->  49150        (add two numbers)

`score(prompt, response)` is the verifier: 1.0 for an exact answer, otherwise the
fraction of characters in the right place (right-aligned for numbers), divided by the
longer of answer and response, so partial answers earn partial credit and padding a
response with junk does not pay. Difficulty is set by the length ranges.

Everything is a pure function of a seed: training examples for step s come from
`random.Random(hash(seed, s))`, the held-out prompts from their own seed, and training
never yields a held-out prompt.
"""

from __future__ import annotations

import random
import re
import string
from rlhf.data.examples import PreferencePair, SFTExample
from rlhf.data.tokenizer import CharTokenizer
from rlhf.tasks import TaskConfig

# printable ASCII plus newline: any judge template or user text in plain English fits
ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"

DEFAULT_JUDGE_TEMPLATE = "judge {prompt}answer {response}\nscore:"


_PROMPT = re.compile(r"^(sort): ([a-z]+)\n$|^(add): (\d+)\+(\d+)\n$")


def answer(prompt: str) -> str:
    """The correct response to a task prompt."""
    m = _PROMPT.match(prompt)
    if m is None:
        raise ValueError(f"not a built-in task prompt: {prompt!r}")
    if m.group(1) == "sort":
        return "".join(sorted(m.group(2)))
    return str(int(m.group(4)) + int(m.group(5)))


def score(prompt: str, response: str) -> float:
    """Verifier: 1.0 if exact, else positional overlap with the answer, in [0, 1]."""
    target = answer(prompt)
    if response == target:
        return 1.0
    if not response:
        return 0.0
    if prompt.startswith("add"):
        target, response = target[::-1], response[::-1]
    hits = sum(a == b for a, b in zip(target, response))
    return hits / max(len(target), len(response))


def verifier_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward function by dotted path (`rlhf.tasks.builtin.verifier_reward`) for RL and DPO stages."""
    return [score(p, r) for p, r in zip(prompts, responses)]


class BuiltinTask:
    def __init__(self, cfg: TaskConfig):
        unknown = set(cfg.families) - {"sort", "add"}
        if unknown or not cfg.families:
            from rlhf.errors import ConfigError

            raise ConfigError(f"task.families={list(cfg.families)} must be a non-empty subset of ['sort', 'add']")
        self.cfg = cfg
        self.tokenizer = CharTokenizer(ALPHABET)
        self._eval = self._make_eval_prompts()
        self._eval_set = set(self._eval)

    # -- prompts ---------------------------------------------------------------------------
    def _prompt(self, rng: random.Random) -> str:
        family = rng.choice(list(self.cfg.families))
        if family == "sort":
            n = rng.randint(self.cfg.sort_min_len, self.cfg.sort_max_len)
            return "sort: " + "".join(rng.choice(string.ascii_lowercase) for _ in range(n)) + "\n"
        a = rng.randint(10 ** (self.cfg.add_min_digits - 1), 10 ** rng.randint(self.cfg.add_min_digits, self.cfg.add_max_digits) - 1)
        b = rng.randint(10 ** (self.cfg.add_min_digits - 1), 10 ** rng.randint(self.cfg.add_min_digits, self.cfg.add_max_digits) - 1)
        return f"add: {a}+{b}\n"

    def _make_eval_prompts(self) -> list[str]:
        rng = random.Random(self.cfg.seed)
        prompts: list[str] = []
        seen: set[str] = set()
        while len(prompts) < self.cfg.num_eval_prompts:
            p = self._prompt(rng)
            if p not in seen:
                seen.add(p)
                prompts.append(p)
        return prompts

    def train_prompt(self, rng: random.Random) -> str:
        """A prompt that is never one of the held-out evaluation prompts."""
        while True:
            p = self._prompt(rng)
            if p not in self._eval_set:
                return p

    def eval_prompts(self) -> list[str]:
        return list(self._eval)

    def score(self, prompt: str, response: str) -> float:
        return score(prompt, response)

    def family(self, prompt: str) -> str:
        """The family a prompt belongs to ("sort" or "add"): evaluation reports a score per family."""
        return prompt.split(":", 1)[0]

    # -- data for each kind of stage ---------------------------------------------------------
    def sft_example(self, rng: random.Random) -> SFTExample:
        prompt = self.train_prompt(rng)
        return SFTExample(prompt, answer(prompt))

    def raw_text(self, rng: random.Random, num_examples: int = 8) -> str:
        """Text for plain causal-LM pretraining: whole solved examples run together."""
        return "".join(p + answer(p) + "\n" for p in (self.train_prompt(rng) for _ in range(num_examples)))

    def corrupt(self, prompt: str, response: str, rng: random.Random) -> str:
        """A near miss of the kind a small model makes: a wrong, dropped, doubled or swapped character."""
        chars = list(response)
        pool = string.digits if prompt.startswith("add") else string.ascii_lowercase
        while True:
            edit = rng.choice(["replace", "drop", "double", "swap"])
            i = rng.randrange(len(chars))
            new = list(chars)
            if edit == "replace":
                new[i] = rng.choice(pool)
            elif edit == "drop" and len(new) > 1:
                del new[i]
            elif edit == "double":
                new.insert(i, new[i])
            elif edit == "swap" and len(new) > 1:
                j = min(i + 1, len(new) - 1) if i + 1 < len(new) else i - 1
                new[i], new[j] = new[j], new[i]
            out = "".join(new)
            if out != response:
                return out

    def preference_pair(self, rng: random.Random) -> PreferencePair:
        """Offline preference data: the correct answer over a near miss."""
        prompt = self.train_prompt(rng)
        chosen = answer(prompt)
        return PreferencePair(prompt, chosen, self.corrupt(prompt, chosen, rng))

    def judge_example(self, rng: random.Random, template: str = DEFAULT_JUDGE_TEMPLATE) -> SFTExample:
        """Teaches judging: a candidate answer and its 0-5 score. Candidates: the right answer
        (30%), a near miss (50%), or the right answer to ANOTHER prompt of the same family (20%):
        well-formed but wrong, as a weak model's answers often are, so the judge must check the
        answer against the prompt rather than its form."""
        prompt = self.train_prompt(rng)
        candidate = answer(prompt)
        u = rng.random()
        if u < 0.2:
            other = self.train_prompt(rng)
            while other[:4] != prompt[:4] or answer(other) == candidate:
                other = self.train_prompt(rng)
            candidate = answer(other)
        elif u < 0.7:
            candidate = self.corrupt(prompt, candidate, rng)
            if rng.random() < 0.5:
                candidate = self.corrupt(prompt, candidate, rng)
        judged = template.format(prompt=prompt, response=candidate)
        return SFTExample(judged, f" {round(5 * score(prompt, candidate))}")
