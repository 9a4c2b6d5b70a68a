"""LLM-as-judge: the policy scores (prompt, response) pairs itself (Yuan et al. 2024).

A judge is three things:
  template     text with `{prompt}` and `{response}` placeholders; the model continues it
               with its verdict. Default: the built-in task's DEFAULT_JUDGE_TEMPLATE
               ("judge {prompt}answer {response}\\n"), which SFT teaches with
               `judge_fraction`: the model writes `score: N` (N = 5 for an exact answer
               only, else 5 x verifier score rounded, at most 4), on the path family after
               checking each step of the answer (rlhf.tasks.builtin.judge_verdict).
               Optional `{reference}`: the judge's OWN answer to the prompt, sampled
               before judging (reference-guided grading, Zheng et al. 2023). Each of the
               num_samples judge samples of a candidate gets its own reference; the
               candidates of one prompt are judged against the same references, so their
               scores compare fairly. (On the built-in task the 1.5 M model did not learn
               to compare answers this way either: docs/results_self_reward.md.)
  score_regex  a regular expression with exactly ONE capture group holding the number.
               It is searched in the judge's GENERATED text only, never in the prompt, so a
               candidate response that writes "score: 5" into its answer cannot fool it.
               The FIRST match counts: the judge's first stated score is its verdict (what
               follows is usually the model rambling on). Integers and decimals parse.
  range        [min_score, max_score] (inclusive, default 0-5); a number outside it is a
               failed judgement, not a clipped one.

A judgement that does not parse is dropped, never guessed; a candidate's score is the
mean of its parseable judge samples, or None when none parses. Callers count Nones.
"""

from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from rlhf.errors import ConfigError
from rlhf.sampling import SamplingConfig, generate_text

# The built-in judge writes its checks (if any), then `score: N`; the first `score:` counts.
DEFAULT_SCORE_REGEX = r"score: ?(-?\d+(?:\.\d+)?)"


def default_template() -> str:
    from rlhf.tasks.builtin import DEFAULT_JUDGE_TEMPLATE

    return DEFAULT_JUDGE_TEMPLATE


def template_fields(template: str) -> set[str]:
    """The placeholder names in a str.format template ({{ and }} are literal braces)."""
    return {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}


def validate_template(template: str) -> str:
    """The template itself, or ConfigError when it cannot be filled with a prompt and a response
    (and, optionally, the judge's reference answer)."""
    if not isinstance(template, str) or not template:
        raise ConfigError("judge template is empty")
    missing = [name for name in ("{prompt}", "{response}") if name not in template]
    if missing:
        raise ConfigError(f"judge template has no {' or '.join(missing)} placeholder: {template!r}")
    try:
        template.format(prompt="p", response="r", reference="a")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(
            f"judge template {template!r} cannot be filled ({type(err).__name__}: {err}); "
            "only {prompt}, {response} and {reference} are placeholders, write literal braces as {{ and }}"
        ) from None
    return template


def validate_regex(regex: str) -> re.Pattern:
    """The compiled score regex, or ConfigError when it does not compile or has not exactly one group."""
    try:
        pattern = re.compile(regex)
    except (re.error, TypeError) as err:
        raise ConfigError(f"judge score_regex {regex!r} is not a valid regular expression: {err}") from None
    if pattern.groups != 1:
        raise ConfigError(
            f"judge score_regex {regex!r} has {pattern.groups} capture groups; it needs exactly one, "
            "around the number (use (?:...) for other groups)"
        )
    return pattern


def parse_judgement(text: str, regex: str | re.Pattern, lo: float, hi: float) -> Optional[float]:
    """The score in `text` (the judge's generated text), or None when missing, unparseable or outside [lo, hi].

    Several matches: the first one counts.
    """
    pattern = regex if isinstance(regex, re.Pattern) else validate_regex(regex)
    match = pattern.search(text)
    if match is None or match.group(1) is None:
        return None
    try:
        value = float(match.group(1))
    except ValueError:
        return None
    if not math.isfinite(value) or not lo <= value <= hi:
        return None
    return value


def read_template_file(name: str) -> str:
    """A template from a file: a path, or the name of a file in conf/judge/. Editors end files
    with a newline the template did not mean to have, so one trailing newline is dropped."""
    from rlhf.config import CONF_DIR

    path = Path(name).expanduser()
    if not path.is_file() and (CONF_DIR / "judge" / name).is_file():
        path = CONF_DIR / "judge" / name
    if not path.is_file():
        raise ConfigError(f"judge.template_file={name!r}: no such file (nor in {CONF_DIR / 'judge'})")
    text = path.read_text()
    return text[:-1] if text.endswith("\n") else text


@dataclass
class JudgeConfig:
    """How the model judges: template, score regex, range and sampling. Checked when the config is built."""

    template: Optional[str] = None  # inline template; None: template_file, else the built-in default
    template_file: Optional[str] = None  # a text file (a path, or a name in conf/judge/); one trailing newline is dropped
    score_regex: str = DEFAULT_SCORE_REGEX
    min_score: float = 0.0
    max_score: float = 5.0
    num_samples: int = 3  # judge samples per candidate, averaged (Yuan et al.: 3)
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 80  # room for the built-in judge's checks of a 10-letter arrange answer (77 characters) and EOS
    reference_max_new_tokens: int = 24  # the judge's own answer, for templates with {reference}

    def __post_init__(self):
        # runs when the run's config becomes typed (before any stage trains), so a bad
        # template or regex fails the command at once
        if self.template is not None and self.template_file is not None:
            raise ConfigError("judge: set template or template_file, not both")
        validate_template(self.resolved_template())
        validate_regex(self.score_regex)
        if not self.min_score < self.max_score:
            raise ConfigError(f"judge: min_score ({self.min_score}) must be below max_score ({self.max_score})")
        if self.num_samples < 1 or self.max_new_tokens < 1 or self.reference_max_new_tokens < 1:
            raise ConfigError("judge: num_samples, max_new_tokens and reference_max_new_tokens must be >= 1")

    def resolved_template(self) -> str:
        if self.template is not None:
            return self.template
        if self.template_file is not None:
            return read_template_file(self.template_file)
        return default_template()


@dataclass
class Judgement:
    """One candidate's verdict: the raw judge texts, each one's parsed score, and their mean
    (None if none parsed); with a {reference} template, the reference each sample judged against."""

    texts: list[str]
    scores: list[Optional[float]]
    references: list[str] = field(default_factory=list)

    @property
    def score(self) -> Optional[float]:
        ok = [s for s in self.scores if s is not None]
        return sum(ok) / len(ok) if ok else None

    @property
    def failures(self) -> int:
        return sum(s is None for s in self.scores)


def judge(
    policy,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    cfg: JudgeConfig,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 256,
) -> list[Judgement]:
    """Judge every (prompt, response) with cfg.num_samples sampled verdicts each (batched, KV cache).

    With a `{reference}` template the judge first answers each distinct prompt
    cfg.num_samples times itself; verdict j of every candidate of that prompt uses answer j.
    A greedy judge (temperature 0) generates once per distinct filled template and shares
    that verdict among its repeats."""
    template = cfg.resolved_template()
    pattern = validate_regex(cfg.score_regex)
    j = cfg.num_samples
    references: dict[str, list[str]] = {}
    if "reference" in template_fields(template) and prompts:
        distinct = list(dict.fromkeys(prompts))
        sampling = SamplingConfig(max_new_tokens=cfg.reference_max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
        answers = generate_text(policy, tokenizer, [p for p in distinct for _ in range(j)], sampling, batch_size, generator)
        references = {p: answers[i * j : (i + 1) * j] for i, p in enumerate(distinct)}
    refs = [references.get(p, [""] * j) for p in prompts]
    repeated = [template.format(prompt=p, response=r, reference=ref[s]) for p, r, ref in zip(prompts, responses, refs) for s in range(j)]
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p)
    if cfg.temperature == 0:
        # a greedy judge writes one verdict per distinct text: sampled candidates repeat (most
        # of a confident policy's do), so each distinct one is judged once and the verdict shared
        distinct = list(dict.fromkeys(repeated))
        verdicts = dict(zip(distinct, generate_text(policy, tokenizer, distinct, sampling, batch_size, generator))) if distinct else {}
        texts = [verdicts[t] for t in repeated]
    else:
        texts = generate_text(policy, tokenizer, repeated, sampling, batch_size, generator) if repeated else []
    out = []
    for i in range(len(prompts)):
        chunk = texts[i * j : (i + 1) * j]
        scores = [parse_judgement(t, pattern, cfg.min_score, cfg.max_score) for t in chunk]
        out.append(Judgement(chunk, scores, refs[i] if references else []))
    return out


def judge_scores(
    policy,
    tokenizer,
    prompts: Sequence[str],
    responses: Sequence[str],
    cfg: JudgeConfig,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 256,
) -> list[Optional[float]]:
    """Each candidate's mean score over its parseable judge samples; None where none parsed."""
    return [j.score for j in judge(policy, tokenizer, prompts, responses, cfg, generator, batch_size)]


def pairwise_agreement(judged: Sequence[Optional[float]], truth: Sequence[float]) -> tuple[float, int]:
    """(agreement, pairs) over all candidate pairs of ONE prompt whose true scores differ.

    A pair counts 1 when the judge orders it like the truth, 0.5 when the judge ties it,
    0 when reversed. Pairs with an unjudged (None) candidate are left out (the parse
    failure rate is reported beside this). Returns the SUM of pair credits and the number of pairs.
    """
    credit, pairs = 0.0, 0
    for a in range(len(truth)):
        for b in range(a + 1, len(truth)):
            if truth[a] == truth[b] or judged[a] is None or judged[b] is None:
                continue
            pairs += 1
            if judged[a] == judged[b]:
                credit += 0.5
            elif (judged[a] > judged[b]) == (truth[a] > truth[b]):
                credit += 1.0
    return credit, pairs


@torch.no_grad()
def evaluate_judge(
    policy,
    tokenizer,
    task,
    prompts: Sequence[str],
    num_candidates: int,
    sampling,
    cfg: JudgeConfig,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 256,
) -> tuple[dict[str, float], list[dict]]:
    """How well the model judges its own answers, measured against the task's verifier.

    For each prompt, `num_candidates` responses are sampled (`sampling`, a SamplingConfig),
    the model judges each, and the verifier scores each. Metrics:
      eval/judge_agreement      pairwise accuracy over candidate pairs of one prompt whose
                                verifier scores differ (a judge tie counts 0.5; pairs with an
                                unparseable judgement are left out)
      eval/judge_parse_failure_rate   share of judge samples that gave no valid score
      eval/judge_mae            mean |judge score - verifier score rescaled to the judge's range|
      eval/candidate_score      mean verifier score of the sampled candidates
      eval/judge_pick_score     verifier score of the candidate the judge ranks best (first of
                                equals; a prompt with no parseable judgement counts its worst
                                candidate): above candidate_score when the judge helps pick
      eval/judge_pairs          how many candidate pairs judge_agreement is over
      eval/judge_agreement/<family>   judge_agreement over the pairs of one task family
                                (tasks whose prompts come in families)
      eval/judge_score_exact    mean judge score of candidates the verifier scores 1.0, and
      eval/judge_score_inexact  of the rest: a useful judge puts a clear gap between them
      eval/judge_calibration/<bucket>   mean judge score of the candidates whose verifier
                                score is in [0, 0.25), [0.25, 0.5), [0.5, 1.0) or exactly
                                1.0 (buckets 0.00-0.25, 0.25-0.50, 0.50-1.00, 1.00): it
                                should rise bucket by bucket
    Judge-score means are over candidates with a parseable judgement, in the judge's range;
    a group without any is left out (never NaN). With a task that has no verifier only the
    parse failure rate is reported.
    Returns the metrics and one row per candidate (prompt, response, judge texts, scores).
    """
    repeated = [p for p in prompts for _ in range(num_candidates)]
    responses = generate_text(policy, tokenizer, repeated, sampling, batch_size, generator)
    judged = judge(policy, tokenizer, repeated, responses, cfg, generator, batch_size)
    truth = [task.score(p, r) for p, r in zip(repeated, responses)]
    samples = sum(len(j.scores) for j in judged)
    metrics = {"eval/judge_parse_failure_rate": sum(j.failures for j in judged) / max(1, samples)}
    rows = [
        {"prompt": p, "response": r, "judgements": j.texts, "judge_references": j.references, "judge_scores": j.scores, "score": j.score, "verifier": t}
        for p, r, j, t in zip(repeated, responses, judged, truth)
    ]
    if repeated and all(t is not None for t in truth):
        credit, pairs, picks = 0.0, 0, []
        by_family: dict[str, list[float]] = {}  # family -> [credit, pairs]
        for i in range(len(prompts)):
            sl = slice(i * num_candidates, (i + 1) * num_candidates)
            scores, true = [j.score for j in judged[sl]], truth[sl]
            c, n = pairwise_agreement(scores, true)
            credit, pairs = credit + c, pairs + n
            if hasattr(task, "family"):
                total = by_family.setdefault(task.family(prompts[i]), [0.0, 0])
                total[0], total[1] = total[0] + c, total[1] + n
            scored = [(s, k) for k, s in enumerate(scores) if s is not None]
            picks.append(true[max(scored, key=lambda x: x[0])[1]] if scored else min(true))
        span = cfg.max_score - cfg.min_score
        errors = [abs(j.score - (cfg.min_score + span * t)) for j, t in zip(judged, truth) if j.score is not None]
        metrics["eval/judge_pairs"] = float(pairs)
        metrics["eval/candidate_score"] = sum(truth) / len(truth)
        metrics["eval/judge_pick_score"] = sum(picks) / len(picks)
        if pairs:  # undefined when every prompt's candidates score the same: left out, not NaN
            metrics["eval/judge_agreement"] = credit / pairs
        if errors:
            metrics["eval/judge_mae"] = sum(errors) / len(errors)
        metrics.update(judge_calibration([j.score for j in judged], truth))
        # a family without a pair whose verifier scores differ is left out
        metrics.update({f"eval/judge_agreement/{f}": c / n for f, (c, n) in sorted(by_family.items()) if n})
    return metrics, rows


# (name, lowest verifier score, highest verifier score (excluded)) of judge_calibration's buckets;
# exact answers get a bucket of their own: the judge's top label is meant for them alone
CALIBRATION_BUCKETS = (("0.00-0.25", 0.0, 0.25), ("0.25-0.50", 0.25, 0.5), ("0.50-1.00", 0.5, 1.0))


def calibration_bucket(verifier_score: float) -> Optional[str]:
    """The name of the calibration bucket a verifier score falls in ("1.00" for exact); None
    outside [0, 1] (a task breaking the verifier contract costs a bucket, not the stage)."""
    if verifier_score == 1.0:
        return "1.00"
    for name, lo, hi in CALIBRATION_BUCKETS:
        if lo <= verifier_score < hi:
            return name
    return None


def judge_calibration(judged: Sequence[Optional[float]], truth: Sequence[float]) -> dict[str, float]:
    """Mean judge score (in the judge's own units) per verifier group: `eval/judge_score_exact`
    (verifier score 1.0), `eval/judge_score_inexact` (the rest) and
    `eval/judge_calibration/<bucket>` (calibration_bucket). Unjudged (None) candidates are left
    out; so is a group with no judged candidate."""
    groups: dict[str, list[float]] = {}
    for s, t in zip(judged, truth):
        if s is None:
            continue
        groups.setdefault("eval/judge_score_exact" if t == 1.0 else "eval/judge_score_inexact", []).append(s)
        bucket = calibration_bucket(t)
        if bucket is not None:
            groups.setdefault(f"eval/judge_calibration/{bucket}", []).append(s)
    return {key: sum(v) / len(v) for key, v in sorted(groups.items())}


def own_judging_examples(task, rows: list[dict], n: int, rng, template: str) -> list:
    """n judging examples from a round's own candidates (`rows` as in the round file): half drawn
    from the candidates the verifier scores below 1, half from the rest (all from one side when
    the other is empty), each labelled with `task.judging_example`'s verdict. A pure function of
    (rows, rng). Raises ValueError if the rows hold no candidate."""
    wrong, right = [], []
    for row in rows:
        for c in row["candidates"]:
            is_wrong = c.get("verifier") is not None and c["verifier"] < 1.0
            (wrong if is_wrong else right).append((row["prompt"], c["response"]))
    pools = [pool for pool in (wrong, right) if pool]
    if not pools:
        raise ValueError("a round with no candidate has no judging examples")
    picks = [rng.choice(pools[i % len(pools)]) for i in range(n)]
    return [task.judging_example(prompt, response, template) for prompt, response in picks]
