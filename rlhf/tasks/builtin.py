"""The built-in task: short instructions whose answers a program can check.

Five families, all "easy to check, harder to produce" for a small model:

  sort: qwhfkdmz\n        ->  dfhkmqwz     (sort the letters)
  add: 48213+937\n        ->  49150        (add two numbers)
  path: bc ab ad de a>e\n ->  ade          (walk the edges from start to goal)
  arrange: ABCD\n         ->  bdac         (no alphabet neighbours side by side)
  climb: c....j\n         ->  cfghij       (6 letters from c to j, steps of 1-3 along a..zA..Z)

`score(prompt, response)` is the verifier: 1.0 for an exact answer (for path, arrange and
climb: any right one), otherwise partial credit that padding with junk does not earn (see
`score`). Difficulty is set by the length ranges.

Everything is a pure function of a seed: training examples for step s come from
`random.Random(hash(seed, s))`, the held-out prompts from their own seed, and training
never yields a held-out prompt.
"""

from __future__ import annotations

import random
import re
import string
from rlhf.data.examples import PreferencePair, SFTExample
from rlhf.errors import ConfigError
from rlhf.models import CharTokenizer
from rlhf.tasks.config import TaskConfig

# printable ASCII plus newline: any judge template or user text in plain English fits
ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"

FAMILIES = ("sort", "add", "path", "arrange", "climb")
DEFAULT_JUDGE_TEMPLATE = "judge {prompt}answer {response}\n"
MAX_PROMPT_MISSES = 10_000  # draws in a row that find no new prompt: the families are exhausted
MAX_MARKED_HOPS = 8  # a path answer longer than this is judged without marks (no walk here is that long)


def judge_label(score: float) -> int:
    """The 0-5 judge label of a verifier score: 5 for an exact answer ONLY, otherwise
    5 x score rounded half up and capped at 4, so a near miss never shares the exact label."""
    return 5 if score == 1.0 else min(4, int(5 * score + 0.5))


def mark(ok: bool) -> str:
    """A judge check's mark: `+` holds, `-` fails."""
    return "+" if ok else "-"


def judge_verdict(prompt: str, response: str) -> str:
    """What the built-in task's judge writes after the template: `score: N` (N = judge_label).

    It first checks the answer step by step where a check is local: for path the first node
    against the start, each hop against the edge list, the last node against the goal
    (`a+ ab+ bf- f+`); for arrange each pair of neighbours (`ab-`: alphabet neighbours side
    by side), then each prompt letter as the prompt writes it (a capital) and whether the answer
    holds it in lower case (`C-`: it does not), then
    whether the answer has as many letters as the prompt (`=+`): all of these together mean
    "the prompt's letters, once each", which a small judge did not learn as one check (`=`
    alone passed every swapped-in letter), and each is a local one. `+` holds, `-` fails.
    Then the score."""
    label = judge_label(score(prompt, response))
    if prompt.startswith("path") and response.isalpha() and response.islower() and 0 < len(response) <= MAX_MARKED_HOPS + 1:
        _, start, goal = parse_path_prompt(prompt)
        checks = [response[0] + mark(response[0] == start)]
        checks += [hop + mark(ok) for hop, ok in path_hops(prompt, response)]
        checks.append(response[-1] + mark(response[-1] == goal))
        return " ".join(checks) + f"\nscore: {label}"
    if prompt.startswith("climb") and 0 < len(response) <= MAX_CLIMB_LEN:
        return " ".join(tok + mark(ok) for tok, ok in climb_checks(prompt, response)) + f"\nscore: {label}"
    if prompt.startswith("arrange") and 0 < len(response) <= 16:
        shown = prompt[len("arrange: ") : -1]  # as the prompt writes them: capitals
        checks = [a + b + mark(abs(ord(a) - ord(b)) != 1) for a, b in zip(response, response[1:])]
        checks += [c + mark(c.lower() in response) for c in shown]
        checks.append("=" + mark(len(response) == len(shown)))
        return " ".join(checks) + f"\nscore: {label}"
    return f"score: {label}"


_PROMPT = re.compile(r"^(sort): ([a-z]+)\n$|^(add): (\d+)\+(\d+)\n$")
_PATH = re.compile(r"^path: ((?:[a-z]{2} )+)([a-z])>([a-z])\n$")


def parse_path_prompt(prompt: str) -> tuple[set[str], str, str]:
    """(edges as two-letter strings, start, goal) of a path prompt."""
    m = _PATH.match(prompt)
    if m is None:
        raise ValueError(f"not a path prompt: {prompt!r}")
    return set(m.group(1).split()), m.group(2), m.group(3)


def path_hops(prompt: str, response: str) -> list[tuple[str, bool]]:
    """Each hop (two consecutive nodes) of a path response and whether it is an edge of the prompt."""
    edges, _, _ = parse_path_prompt(prompt)
    return [(response[i : i + 2], response[i : i + 2] in edges) for i in range(len(response) - 1)]


def path_score(prompt: str, response: str) -> float:
    """1.0 for a walk from start to goal along the prompt's edges; otherwise half the share of
    hops that are edges (0 if it does not begin at the start): a walk down the wrong branch
    earns 0.5, a wrong turn followed by the goal 0.25."""
    _, start, goal = parse_path_prompt(prompt)
    if len(response) < 2 or response[0] != start:
        return 0.0
    hops = path_hops(prompt, response)
    valid = sum(ok for _, ok in hops)
    if valid == len(hops) and response[-1] == goal:
        return 1.0
    return 0.5 * valid / len(hops)


CLIMB_LETTERS = string.ascii_lowercase + string.ascii_uppercase  # a climb's alphabet, in this order
CLIMB_STEPS = (1, 2, 3)  # each step of a climb goes up CLIMB_LETTERS by one of these
MAX_CLIMB_LEN = 16  # a longer climb answer is judged without marks
_CLIMB = re.compile(r"^climb: ([a-zA-Z])(\.+)([a-zA-Z])\n$")


def parse_climb_prompt(prompt: str) -> tuple[str, str, int]:
    """(first letter, last letter, number of letters) of a climb prompt: `climb: c....j` asks
    for 6 letters from c to j, each 1 to 3 places further along `CLIMB_LETTERS` (a..z, then A..Z).

    Raises:
        ValueError: not a climb prompt."""
    m = _CLIMB.match(prompt)
    if m is None:
        raise ValueError(f"not a climb prompt: {prompt!r}")
    return m.group(1), m.group(3), len(m.group(2)) + 2


def climb_step(a: str, b: str) -> int | None:
    """How many places b is after a in `CLIMB_LETTERS` (negative: before); None if either is not in it."""
    if a not in CLIMB_LETTERS or b not in CLIMB_LETTERS:
        return None
    return CLIMB_LETTERS.index(b) - CLIMB_LETTERS.index(a)


def climb_checks(prompt: str, response: str) -> list[tuple[str, bool]]:
    """The local checks of a climb answer, in the order the judge writes them: the first letter
    against the start (`c`), each step (`cf`: 1 to 3 places up?), the last letter against the
    goal, the length (`=`). Each is (what is checked, holds); empty for an empty response."""
    if not response:
        return []
    start, goal, n = parse_climb_prompt(prompt)
    checks = [(response[0], response[0] == start)]
    checks += [(a + b, climb_step(a, b) in CLIMB_STEPS) for a, b in zip(response, response[1:])]
    checks += [(response[-1], response[-1] == goal), ("=", len(response) == n)]
    return checks


def climb_score(prompt: str, response: str) -> float:
    """1.0 when every check of `climb_checks` holds; otherwise half the share that hold (0 for
    an empty response), so a climb that ends one letter off earns more than a scramble."""
    checks = climb_checks(prompt, response)
    if not checks:
        return 0.0
    held = sum(ok for _, ok in checks)
    return 1.0 if held == len(checks) else 0.5 * held / len(checks)


def climb(start: str, goal: str, n: int) -> str:
    """The climb the SFT data teaches: each step as long as it can be (at most 3) while the goal
    stays reachable with steps of 1: `climb("c", "j", 6)` = `cfghij` (a rise of 7 in 5 steps)."""
    out, at, end = start, CLIMB_LETTERS.index(start), CLIMB_LETTERS.index(goal)
    for left in range(n - 1, 0, -1):  # steps still to take, this one included
        at += min(max(CLIMB_STEPS), end - at - (left - 1))
        out += CLIMB_LETTERS[at]
    return out


def arrange_letters(prompt: str) -> str:
    """The letters an arrange prompt asks for, in lower case as the answer writes them. The
    prompt writes them in capitals so that a letter of the prompt and the same letter in an
    answer are different tokens: "is `u` in the answer?" is then "is `u` anywhere?", a lookup
    the judge learns, where with one case it must also tell the prompt's `u` from the
    answer's (after SFT it marked 1 of 190 missing letters; docs/results_self_reward.md)."""
    return prompt[len("arrange: ") : -1].lower()


def arrangement(letters: str, prefix: str = "") -> str | None:
    """The alphabetically first ordering of `letters` (distinct, sorted) in which no two
    neighbours are neighbours in the alphabet, by depth-first search; None if there is none."""
    if len(prefix) == len(letters):
        return prefix
    for c in letters:
        if c not in prefix and not (prefix and abs(ord(c) - ord(prefix[-1])) == 1):
            found = arrangement(letters, prefix + c)
            if found is not None:
                return found
    return None


def arrange_score(prompt: str, response: str) -> float:
    """1.0 for an ordering of the prompt's letters with no two alphabet neighbours side by side;
    an ordering with some: half the share of good neighbour pairs; anything else: a quarter of
    the letters it shares with the prompt over the longer of the two."""
    letters = arrange_letters(prompt)
    if sorted(response) == sorted(letters):
        good = [abs(ord(a) - ord(b)) != 1 for a, b in zip(response, response[1:])]
        return 1.0 if all(good) else 0.5 * sum(good) / max(1, len(good))
    shared = sum(min(response.count(c), 1) for c in letters)
    return 0.25 * shared / max(len(letters), len(response), 1)


def answer(prompt: str) -> str:
    """The correct response to a task prompt (for path: the shortest path, unique in this task's graphs)."""
    if prompt.startswith("arrange: "):
        return arrangement(arrange_letters(prompt))
    if prompt.startswith("climb"):
        return climb(*parse_climb_prompt(prompt))
    if prompt.startswith("path"):
        edges, start, goal = parse_path_prompt(prompt)
        parent, frontier = {start: ""}, [start]
        while frontier and goal not in parent:  # breadth first
            step = []
            for node in frontier:
                for e in sorted(edges):
                    if e[0] == node and e[1] not in parent:
                        parent[e[1]] = node
                        step.append(e[1])
            frontier = step
        if goal not in parent:
            raise ValueError(f"no path from {start} to {goal}: {prompt!r}")
        path = goal
        while parent[path[0]]:
            path = parent[path[0]] + path
        return path
    m = _PROMPT.match(prompt)
    if m is None:
        raise ValueError(f"not a built-in task prompt: {prompt!r}")
    if m.group(1) == "sort":
        return "".join(sorted(m.group(2)))
    return str(int(m.group(4)) + int(m.group(5)))


def careless_answer(prompt: str) -> str:
    """What a careless demonstrator writes (`task.careless_demo_rate`): for add the digit sums
    without carrying (`48+57` -> `95`), for sort the letters in reverse order (`bca` -> `cba`:
    the right answer's letters and length, so no pair can be told apart by length); for the
    other families, and where no carry occurs, the right answer."""
    m = _PROMPT.match(prompt)
    if m is None:
        return answer(prompt)
    if m.group(1) == "sort":
        return "".join(sorted(m.group(2), reverse=True))
    a, b = m.group(4), m.group(5)
    width = max(len(a), len(b))
    digits = [(int(x) + int(y)) % 10 for x, y in zip(a.zfill(width), b.zfill(width))]
    return str(int("".join(map(str, digits))))


def score(prompt: str, response: str) -> float:
    """Verifier in [0, 1]: 1.0 if exact; for sort and add otherwise the positional overlap with
    the answer (right-aligned for numbers) over the longer of the two; for path `path_score`,
    for arrange `arrange_score`, for climb `climb_score` (any right answer scores 1.0, not only `answer`'s)."""
    if prompt.startswith("path"):
        return path_score(prompt, response)
    if prompt.startswith("arrange"):
        return arrange_score(prompt, response)
    if prompt.startswith("climb"):
        return climb_score(prompt, response)
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
        unknown = set(cfg.families) - set(FAMILIES)
        if unknown or not cfg.families:
            raise ConfigError(f"task.families={list(cfg.families)} must be a non-empty subset of {list(FAMILIES)}")
        if "climb" in cfg.families and not 3 <= cfg.climb_min_len <= cfg.climb_max_len <= MAX_CLIMB_LEN:
            raise ConfigError(f"task.climb_min_len={cfg.climb_min_len}, climb_max_len={cfg.climb_max_len}: need 3 <= min <= max <= {MAX_CLIMB_LEN}")
        if not 0.0 <= cfg.careless_demo_rate <= 1.0:  # NaN fails too
            raise ConfigError(f"task.careless_demo_rate={cfg.careless_demo_rate} must be in [0, 1]")
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
        if family == "path":
            return self._path_prompt(rng)
        if family == "climb":
            n = rng.randint(self.cfg.climb_min_len, self.cfg.climb_max_len)
            rise = rng.randint(n - 1, min(max(CLIMB_STEPS) * (n - 1), len(CLIMB_LETTERS) - 1))
            start = rng.randrange(len(CLIMB_LETTERS) - rise)
            return f"climb: {CLIMB_LETTERS[start]}{'.' * (n - 2)}{CLIMB_LETTERS[start + rise]}\n"
        if family == "arrange":
            while True:  # distinct letters from a narrow window, so neighbours are common
                n = rng.randint(self.cfg.arrange_min_len, self.cfg.arrange_max_len)
                first = rng.randrange(26 - (n + n // 2) + 1)
                letters = "".join(sorted(rng.sample(string.ascii_lowercase[first : first + n + n // 2], n)))
                if arrangement(letters) is not None:
                    return f"arrange: {letters.upper()}\n"
        a = rng.randint(10 ** (self.cfg.add_min_digits - 1), 10 ** rng.randint(self.cfg.add_min_digits, self.cfg.add_max_digits) - 1)
        b = rng.randint(10 ** (self.cfg.add_min_digits - 1), 10 ** rng.randint(self.cfg.add_min_digits, self.cfg.add_max_digits) - 1)
        return f"add: {a}+{b}\n"

    def _path_prompt(self, rng: random.Random) -> str:
        """A star of `branches` chains of `hops` edges each from the start; the goal ends one
        chain. Producing the path means choosing the branch that reaches the goal (a lookahead
        over the edge list); checking one needs only "is each hop an edge?"."""
        cfg = self.cfg
        branches = rng.randint(cfg.path_min_branches, cfg.path_max_branches)
        hops = rng.randint(cfg.path_min_hops, cfg.path_max_hops)
        nodes = rng.sample(string.ascii_lowercase, 1 + branches * hops)
        start, chains = nodes[0], [nodes[1 + b * hops : 1 + (b + 1) * hops] for b in range(branches)]
        edges = [a + b for chain in chains for a, b in zip([start] + chain, chain)]
        rng.shuffle(edges)
        return f"path: {' '.join(edges)} {start}>{rng.choice(chains)[-1]}\n"

    def _make_eval_prompts(self) -> list[str]:
        rng = random.Random(self.cfg.seed)
        prompts: list[str] = []
        seen: set[str] = set()
        misses = 0
        while len(prompts) < self.cfg.num_eval_prompts:
            p = self._prompt(rng)
            if p not in seen:
                seen.add(p)
                prompts.append(p)
                misses = 0
            elif (misses := misses + 1) > MAX_PROMPT_MISSES:  # the families hold fewer prompts than asked
                raise ConfigError(
                    f"task: only about {len(prompts)} distinct prompts in families {list(self.cfg.families)} with these "
                    f"lengths, {self.cfg.num_eval_prompts} held-out ones asked (task.num_eval_prompts or --prompts)"
                )
        return prompts

    def train_prompt(self, rng: random.Random) -> str:
        """A prompt that is never one of the held-out evaluation prompts.

        Raises:
            ConfigError: the held-out prompts are (nearly) all the families hold."""
        for _ in range(MAX_PROMPT_MISSES):
            p = self._prompt(rng)
            if p not in self._eval_set:
                return p
        raise ConfigError(f"task: the {len(self._eval)} held-out prompts leave no training prompts in families {list(self.cfg.families)}")

    def eval_prompts(self) -> list[str]:
        return list(self._eval)

    def score(self, prompt: str, response: str) -> float:
        return score(prompt, response)

    def family(self, prompt: str) -> str:
        """The family a prompt belongs to ("sort", "add", "path", ...): evaluation reports a score per family."""
        return prompt.split(":", 1)[0]

    # -- data for each kind of stage ---------------------------------------------------------
    def sft_example(self, rng: random.Random) -> SFTExample:
        """A demonstration: the right answer, or with probability task.careless_demo_rate the
        careless one (`careless_answer`)."""
        prompt = self.train_prompt(rng)
        # no draw at rate 0: the default data stream stays what it was
        if self.cfg.careless_demo_rate > 0 and rng.random() < self.cfg.careless_demo_rate:
            return SFTExample(prompt, careless_answer(prompt))
        return SFTExample(prompt, answer(prompt))

    def raw_text(self, rng: random.Random, num_examples: int = 8) -> str:
        """Text for plain causal-LM pretraining: whole solved examples run together."""
        return "".join(p + answer(p) + "\n" for p in (self.train_prompt(rng) for _ in range(num_examples)))

    def corrupt(self, prompt: str, response: str, rng: random.Random) -> str:
        """A near miss of the kind a small model makes: a wrong, dropped, doubled or swapped character;
        for arrange also (two thirds of the time) the slips its policy writes, `letter_slip` and
        `neighbour_slip`: a reward model trained on random edits alone scored two alphabet
        neighbours side by side like the right answer (5.92 vs 6.08), and PPO climbed it."""
        if prompt.startswith("arrange") and (u := rng.random()) < 2 / 3:
            slipped = self.letter_slip(prompt, response, rng) if u < 1 / 3 else self.neighbour_slip(response, rng)
            if slipped != response:
                return slipped
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

    def letter_slip(self, prompt: str, response: str, rng: random.Random) -> str:
        """An arrange answer with the letter mistakes the SFT model makes (measured on its own
        samples: 601 of 806 wrong-letter answers keep the length): a letter swapped for an
        alphabet neighbour that is not in the prompt (`n` -> `o`), a letter written twice in
        place of another, a letter dropped, or one written twice more."""
        letters, chars = arrange_letters(prompt), list(response)
        i = rng.randrange(len(chars))
        edit = rng.choice(["outside", "outside", "twice", "twice", "drop", "double"])
        if edit == "outside":
            near = [c for c in (chr(ord(chars[i]) - 1), chr(ord(chars[i]) + 1)) if "a" <= c <= "z" and c not in letters]
            chars[i] = rng.choice(near or [c for c in string.ascii_lowercase if c not in letters])
        elif edit == "twice" and len(chars) > 1:
            chars[i] = rng.choice([c for j, c in enumerate(chars) if j != i])
        elif edit == "drop" and len(chars) > 1:
            del chars[i]
        else:
            chars.insert(i, chars[i])
        return "".join(chars)

    def neighbour_slip(self, response: str, rng: random.Random) -> str:
        """An arrange answer with two alphabet neighbours moved side by side, in either order (a
        judge trained only on shuffles passed 75 of 85 such answers of its own, `nm` and `rq`
        among them); the response unchanged if no two of its letters are alphabet neighbours."""
        chars = list(response)
        pairs = [(a, b) for a in chars for b in chars if abs(ord(a) - ord(b)) == 1]
        if not pairs:
            return response
        a, b = rng.choice(pairs)
        chars.remove(b)
        chars.insert(chars.index(a) + 1, b)
        return "".join(chars)

    def preference_pair(self, rng: random.Random) -> PreferencePair:
        """Offline preference data: the correct answer over a near miss (one the verifier scores
        below 1: in arrange a swap can give another right ordering); with careless
        demonstrators (task.careless_demo_rate > 0) over the careless answer where it differs."""
        prompt = self.train_prompt(rng)
        chosen = answer(prompt)
        if self.cfg.careless_demo_rate > 0 and (careless := careless_answer(prompt)) != chosen:
            return PreferencePair(prompt, chosen, careless)
        rejected = self.corrupt(prompt, chosen, rng)
        while score(prompt, rejected) == 1.0:
            rejected = self.corrupt(prompt, chosen, rng)
        return PreferencePair(prompt, chosen, rejected)

    def judge_candidate(self, prompt: str, rng: random.Random) -> str:
        """A candidate answer of the kind a small model writes, for judging examples: for sort
        and add the right answer (30%), a near miss (50%) or the right answer to ANOTHER prompt
        of the same family (20%: well-formed but wrong); for path the right path (30%), a wrong
        turn followed by the goal (40%: a model that has learned to copy the goal but not to
        choose the branch writes these, and a judge that only checks the form would pass them),
        a walk down another branch (15%) or a near miss (15%); for arrange the first right
        ordering (30%), a shuffle of it (10%: right or wrong by chance), two alphabet neighbours
        brought together (15%, `neighbour_slip`) or a letter slip (45%, `letter_slip`, of the
        right ordering or of a shuffle), with a second slip of either kind in 40% of these: a
        judge trained on single slips wrote `+` for every check it was unsure of; for climb
        `climb_candidate`."""
        right, u = answer(prompt), rng.random()
        if u < 0.3:
            return right
        if prompt.startswith("path"):
            edges, start, goal = parse_path_prompt(prompt)
            if u < 0.85:
                wrong = rng.choice(sorted(e[1] for e in edges if e[0] == start and e[1] != right[1]))
                walk = start + wrong
                while u < 0.45 and (nxt := [e[1] for e in edges if e[0] == walk[-1]]):
                    walk += nxt[0]
                return walk if u < 0.45 else walk + right[2:]
            return self.corrupt(prompt, right, rng)
        if prompt.startswith("climb"):
            return self.climb_candidate(prompt, right, u, rng)
        if prompt.startswith("arrange"):
            if u < 0.4:
                return "".join(rng.sample(right, len(right)))  # an ordering, usually with neighbours
            if u < 0.55:
                return self.neighbour_slip(right, rng)
            slipped = self.letter_slip(prompt, right if u < 0.85 else "".join(rng.sample(right, len(right))), rng)
            # a second slip in 40%: more failing marks per example, so `+` is not the judge's every mark
            if rng.random() < 0.4:
                slipped = self.letter_slip(prompt, slipped, rng) if rng.random() < 0.5 else self.neighbour_slip(slipped, rng)
            return slipped
        if u < 0.5:
            other = self.train_prompt(rng)
            while other[:4] != prompt[:4] or answer(other) == right:
                other = self.train_prompt(rng)
            return answer(other)
        near = self.corrupt(prompt, right, rng)
        return self.corrupt(prompt, near, rng) if rng.random() < 0.5 else near

    def climb_candidate(self, prompt: str, right: str, u: float, rng: random.Random) -> str:
        """A wrong-or-right climb for judging data (u in [0.3, 1)): steps of 1 to 3 chosen at random
        (30%: ends at the goal only by chance), that climb with the goal written last whatever the
        step (15%: what a model that copies the goal writes), the right climb with a step of 0 or
        4 (15%), or with one letter dropped or added (10%)."""
        start, goal, n = parse_climb_prompt(prompt)
        top = len(CLIMB_LETTERS) - 1
        up = lambda c, d: CLIMB_LETTERS[min(top, CLIMB_LETTERS.index(c) + d)]  # noqa: E731
        if u < 0.75:
            out = start
            for _ in range(n - 1):
                out += up(out[-1], rng.choice(CLIMB_STEPS))
            return out if u < 0.6 else out[:-1] + goal
        chars = list(right)
        i = rng.randrange(1, len(chars))
        if u < 0.9:
            chars[i] = up(chars[i - 1], rng.choice([0, max(CLIMB_STEPS) + 1]))
        elif rng.random() < 0.5:
            del chars[i]
        else:
            chars.insert(i, up(chars[i - 1], rng.choice(CLIMB_STEPS)))
        return "".join(chars)

    def judge_example(self, rng: random.Random, template: str = DEFAULT_JUDGE_TEMPLATE) -> SFTExample:
        """Teaches judging: the judge template filled with a prompt and a candidate
        (`judge_candidate`), and the verdict `judge_verdict` writes for it."""
        prompt = self.train_prompt(rng)
        return self.judging_example(prompt, self.judge_candidate(prompt, rng), template)

    def judging_example(self, prompt: str, candidate: str, template: str = DEFAULT_JUDGE_TEMPLATE) -> SFTExample:
        """The judging example for a given candidate (one of the model's own answers, say): the
        template filled with prompt and candidate, and the verdict `judge_verdict` writes."""
        return SFTExample(template.format(prompt=prompt, response=candidate), judge_verdict(prompt, candidate))


def solved_texts(n: int = 2000, seed: int = 0) -> list[str]:
    """`n` demonstrations (prompt + answer) of the default task, for a tokenizer to train on so
    task prompts tokenise compactly (rlhf.models.make_tiny_checkpoint)."""
    task, rng = BuiltinTask(TaskConfig()), random.Random(seed)
    return [e.prompt + e.response for e in (task.sft_example(rng) for _ in range(n))]
