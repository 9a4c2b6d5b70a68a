"""The evaluation every stage ends with: greedy answers to the task's held-out prompts, and
the headroom sampling leaves above them (pass@k and best-of-k by the verifier).

The headroom part samples eval.samples_per_prompt (k, default 8) answers at
eval.sample_temperature (default 1.0: the policy's own distribution, what on-policy RL
samples) to each of the first eval.sample_prompts (default 100) held-out prompts, with one
fixed seed, and reports
  eval/pass@{k}       the chance that k samples hold an exact answer (Chen et al. 2021's
                      unbiased estimator; verifier score 1.0 is exact)
  eval/best_of_{k}    the expected best verifier score of k samples
  eval/sample_exact   the share of samples that are exact (pass@1)
each also per task family (`eval/pass@8/sort`, ...). A pass@k far above eval/exact_match
is what RL or best-of-N could still draw out; pass@k near exact_match means the policy has
little left to find by sampling. eval.samples_per_prompt=0 turns it off.

`python -m rlhf evaluate` re-runs it on finished stages, on as many held-out prompts as asked
(200 prompts put about ±0.02 of noise on the built-in task's score; 1,000 about ±0.01):

    python -m rlhf evaluate RUN/stages/00_sft RUN/stages/02_erdpo --prompts 1000
    python -m rlhf evaluate RUN/stages/02_dpo_iter1 --samples 16 --judge

Arguments
  STAGE_DIR ...           complete stage dirs; the task comes from their run's config.yaml
  --prompts N             held-out prompts (default: the run's eval.num_prompts). The built-in
                          task's first 200 are the ones every stage was evaluated on; past the
                          run's task.num_eval_prompts, training did not exclude them (with its
                          random letters and numbers a repeat is rare). Other tasks have only
                          their run's held-out prompts
  --max-new-tokens M      longest answer, greedy, sampled or judged candidate (default: the
                          run's eval.max_new_tokens)
  --batch-size B          sequences generated at once (default: the run's eval.batch_size)
  --threads T             torch threads (default: torch's own choice)
  --baseline STAGE_DIR    also compare each stage with this one prompt by prompt: the mean
                          per-prompt score difference and its standard error (the same prompts
                          make the difference far less noisy than the two scores are)
  --samples K             sampled answers per prompt for pass@K / best-of-K (default: the run's
                          eval.samples_per_prompt, 8 unless set; 0: no sampling). Costs about
                          K x (sample prompts / prompts) greedy passes
  --temperature T         their temperature (default: the run's eval.sample_temperature, 1.0)
  --sample-prompts N      sample on the first N of the evaluated prompts (default: the smaller
                          of --prompts and the run's eval.sample_prompts, 100 unless set; more
                          than --prompts is an error)
  --judge                 also measure the policy as a judge of its own answers
                          (rlhf.judge.evaluate_judge): 4 candidates per prompt sampled at
                          temperature 0.7, top-p 0.9, each judged with the run's judge config
                          (stages.<slot>.judge of the first stage in the run's order that sets
                          one, else rlhf.judge.JudgeConfig()'s defaults), sampled as it says
  --judge-prompts N       held-out prompts the judge is measured on (default: 100, or all the
                          run's task has when fewer; needs --judge)

Output: one JSON line per stage dir, {"stage": DIR, "prompts": N, "eval/task_score": ...,
"eval/exact_match": ..., "eval/task_score/<family>": ..., "eval/response_length": ...}; with
sampling also "samples", "temperature", "sample_prompts" and the headroom metrics above;
with --judge also "judge_prompts" and evaluate_judge's metrics (eval/judge_agreement,
eval/judge_score_exact, eval/judge_calibration/<bucket>, ...). With --baseline first the
baseline's line (evaluated the same way), then each line also {"vs_baseline":
{"difference": ..., "standard_error": ...}} of the greedy scores.
"""


from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from rlhf.sampling import SamplingConfig, generate_text


@torch.no_grad()
def greedy_scores(policy, task, tokenizer, eval_cfg, progress: bool = False) -> tuple[list[str], list[str], list[Optional[float]]]:
    """(held-out prompts, greedy responses, verifier scores (None without a verifier))."""
    prompts = task.eval_prompts()[: eval_cfg.num_prompts]
    sampling = SamplingConfig(max_new_tokens=eval_cfg.max_new_tokens, temperature=0.0)
    responses = generate_text(policy, tokenizer, prompts, sampling, eval_cfg.batch_size, progress=progress)
    return prompts, responses, [task.score(p, r) for p, r in zip(prompts, responses)]


def score_metrics(task, prompts: list[str], responses: list[str], scores: list[Optional[float]]) -> dict[str, float]:
    """`eval/task_score` and `eval/exact_match` when every response has a score,
    `eval/task_score/<family>` when the task's prompts come in families, and
    `eval/response_length` in characters."""
    n = max(1, len(prompts))
    metrics = {"eval/response_length": sum(len(r) for r in responses) / n}
    if all(s is not None for s in scores):
        metrics["eval/task_score"] = sum(scores) / n
        metrics["eval/exact_match"] = sum(s == 1.0 for s in scores) / n
        if hasattr(task, "family"):
            by_family: dict[str, list[float]] = {}
            for p, s in zip(prompts, scores):
                by_family.setdefault(task.family(p), []).append(s)
            metrics.update({f"eval/task_score/{f}": sum(v) / len(v) for f, v in sorted(by_family.items())})
    return metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """pass@k from n samples of which c are correct: the unbiased estimator of Chen et al. 2021
    ("Evaluating Large Language Models Trained on Code", the Codex paper, eq. 1 and its numpy
    snippet), 1 - C(n-c, k) / C(n, k): the chance that k of the n samples, drawn without
    replacement, hold at least one correct one. Computed as their product
    1 - prod_{i=n-c+1..n} (1 - k/i), never as binomials, so it stays accurate and finite for
    any n. Returns a float in [0, 1]. Raises ValueError unless all are integers with
    1 <= k <= n and 0 <= c <= n."""
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (n, c, k)):
        raise ValueError(f"pass_at_k needs integers, got n={n!r}, c={c!r}, k={k!r}")
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def best_of_k(scores: list[float], k: int) -> float:
    """Expected best verifier score among k of the n `scores` drawn without replacement: the
    standard unbiased order-statistic estimator, sum over the ascending scores s_(1) <= ... <= s_(n)
    of s_(i) * C(i-1, k-1) / C(n, k) (s_(i) is the maximum of exactly C(i-1, k-1) of the C(n, k)
    subsets). With 0/1 scores it equals pass_at_k; k=1 gives the mean. Raises ValueError unless
    1 <= k <= len(scores)."""
    n = len(scores)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise ValueError(f"best_of_k needs an integer 1 <= k <= len(scores) = {n}, got k={k!r}")
    total = math.comb(n, k)
    # Python's exact integers, divided once: no overflow or cancellation for any n
    return sum(s * (math.comb(i - 1, k - 1) / total) for i, s in enumerate(sorted(scores), start=1) if i >= k)


@torch.no_grad()
def sample_scores(
    policy, task, tokenizer, prompts: list[str], k: int, temperature: float, max_new_tokens: int, batch_size: int, generator=None, progress=False
) -> list[list[Optional[float]]]:
    """k sampled responses per prompt (temperature, no top-k/top-p, KV cache), scored by the
    task's verifier: one list of k scores (None without a verifier) per prompt, in prompt order.
    `generator` (a torch.Generator on the policy's device) makes the samples reproducible; the
    policy's train/eval mode is left as it was (generate restores it)."""
    if k < 1 or not temperature > 0:
        raise ValueError(f"sample_scores needs k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    repeated = [p for p in prompts for _ in range(k)]
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature)
    responses = generate_text(policy, tokenizer, repeated, sampling, batch_size, generator, progress)
    scores = [task.score(p, r) for p, r in zip(repeated, responses)]
    return [scores[i * k : (i + 1) * k] for i in range(len(prompts))]


def headroom_metrics(task, prompts: list[str], per_prompt_scores: list[list[Optional[float]]], k: int) -> dict[str, float]:
    """What sampling could reach beyond the greedy answer, as means over prompts:
      eval/pass@{k}        pass_at_k: chance that k samples hold an exact answer (verifier score 1.0)
      eval/best_of_{k}     best_of_k: expected best verifier score of k samples
      eval/sample_exact    share of samples that are exact (= pass@1)
    and the same with `/<family>` appended when the task's prompts come in families. Each
    prompt needs at least k scores. {} when there are no prompts or a score is None (no verifier)."""
    if not prompts or any(s is None for scores in per_prompt_scores for s in scores):
        return {}
    groups: dict[str, list[int]] = {"": list(range(len(prompts)))}
    if hasattr(task, "family"):
        for i, p in enumerate(prompts):
            groups.setdefault("/" + task.family(p), []).append(i)
    metrics = {}
    for suffix, rows in sorted(groups.items()):
        per_prompt = [per_prompt_scores[i] for i in rows]
        exact = [sum(s == 1.0 for s in scores) for scores in per_prompt]
        metrics[f"eval/pass@{k}{suffix}"] = statistics.fmean(pass_at_k(len(s), c, k) for s, c in zip(per_prompt, exact))
        metrics[f"eval/best_of_{k}{suffix}"] = statistics.fmean(best_of_k(s, k) for s in per_prompt)
        metrics[f"eval/sample_exact{suffix}"] = sum(exact) / sum(len(s) for s in per_prompt)
    return metrics


# one seed for every stage's samples: the same random numbers make stages' pass@k differ by
# their policies rather than by luck, and a generator of its own leaves torch's global RNG
# (and so the training that follows) untouched
SAMPLE_SEED = 20240601


def sampling_generator(policy, seed: int = SAMPLE_SEED) -> torch.Generator:
    """A torch.Generator on the policy's device seeded with `seed`."""
    return torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)


def headroom(policy, task, tokenizer, prompts: list[str], eval_cfg, progress: bool = False) -> dict[str, float]:
    """headroom_metrics of eval_cfg.samples_per_prompt samples (at eval_cfg.sample_temperature)
    for each of the first eval_cfg.sample_prompts of `prompts`; {} when samples_per_prompt is 0."""
    k, prompts = eval_cfg.samples_per_prompt, prompts[: eval_cfg.sample_prompts]
    if k == 0 or not prompts:
        return {}
    per_prompt = sample_scores(
        policy, task, tokenizer, prompts, k, eval_cfg.sample_temperature, eval_cfg.max_new_tokens, eval_cfg.batch_size, sampling_generator(policy), progress
    )
    return headroom_metrics(task, prompts, per_prompt, k)


def evaluate_policy(policy, task, tokenizer, eval_cfg, progress: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Greedy responses to held-out prompts scored by the task's verifier: flat metrics
    (score_metrics, plus headroom's pass@k / best-of-k when eval_cfg.samples_per_prompt > 0
    and the task has a verifier) and a few samples for the logs."""
    prompts, responses, scores = greedy_scores(policy, task, tokenizer, eval_cfg, progress)
    samples = [
        {"prompt": p, "response": r, "score": s}
        for p, r, s in list(zip(prompts, responses, scores))[: eval_cfg.num_logged_samples]
    ]
    metrics = score_metrics(task, prompts, responses, scores)
    if all(s is not None for s in scores):  # without a verifier sampling would measure nothing
        metrics.update(headroom(policy, task, tokenizer, prompts, eval_cfg, progress))
    return metrics, samples


# `evaluate --judge`: candidates per prompt and how they are sampled (those of the
# self_reward_dpo stage's own judge evaluation), and the default number of prompts
JUDGE_CANDIDATES = 4
JUDGE_TEMPERATURE = 0.7
JUDGE_TOP_P = 0.9
JUDGE_PROMPTS = 100


def run_judge_config(run_cfg):
    """The run's judge: `stages.<slot>.judge` of the first slot in `order` that sets one, else
    rlhf.judge.JudgeConfig()'s defaults (what a self_reward_dpo stage without one uses).
    Raises ConfigError when that judge config is invalid."""
    from omegaconf import OmegaConf

    from rlhf.errors import ConfigError
    from rlhf.judge import JudgeConfig

    stages = run_cfg.get("stages") or {}
    for slot in run_cfg.get("order") or list(stages):
        node = stages.get(slot)
        if node is not None and node.get("judge") is not None:
            try:
                return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(JudgeConfig), node.judge))
            except ConfigError as err:
                raise ConfigError(f"stages.{slot}.judge: {err}") from None
            except Exception as err:  # omegaconf names the key and the problem
                raise ConfigError(f"stages.{slot}.judge: {err}".splitlines()[0]) from None
    return JudgeConfig()


def evaluate_stage(
    stage_dir: str | Path,
    num_prompts: Optional[int] = None,
    max_new_tokens: Optional[int] = None,
    batch_size: Optional[int] = None,
    samples: Optional[int] = None,
    temperature: Optional[float] = None,
    sample_prompts: Optional[int] = None,
    judge: bool = False,
    judge_prompts: Optional[int] = None,
) -> tuple[dict, list[Optional[float]]]:
    """The held-out evaluation of a finished stage's policy, on the task of the run it belongs
    to: (its metrics, each prompt's greedy score in prompt order). None takes the run's eval
    config (sample_prompts: min(prompts, eval.sample_prompts)); `judge` adds evaluate_judge's
    metrics on judge_prompts prompts (None: JUDGE_PROMPTS, or all the task has if fewer).
    Raises ConfigError for a dir that is not a stage of a run or asks for more prompts than exist."""
    from omegaconf import OmegaConf

    from rlhf.config import EvalConfig
    from rlhf.errors import ConfigError
    from rlhf.models import load_policy
    from rlhf.tasks import TaskConfig, build_task

    stage_dir = Path(stage_dir)
    run_dir = stage_dir.parent.parent
    run_cfg_path = run_dir / "config.yaml"
    if not run_cfg_path.is_file():
        raise ConfigError(f"{stage_dir}: not a stage dir of a run (no {run_cfg_path})")
    run_cfg = OmegaConf.load(run_cfg_path)
    policy, tokenizer = load_policy(stage_dir)
    eval_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(EvalConfig), run_cfg.get("eval", {})))
    eval_cfg = replace(
        eval_cfg,
        num_prompts=num_prompts or eval_cfg.num_prompts,
        max_new_tokens=max_new_tokens or eval_cfg.max_new_tokens,
        batch_size=batch_size or eval_cfg.batch_size,
        samples_per_prompt=eval_cfg.samples_per_prompt if samples is None else samples,
        sample_temperature=temperature or eval_cfg.sample_temperature,
    )
    task_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskConfig), run_cfg.task))
    if task_cfg.name == "builtin":
        # its held-out prompts are one seeded sequence, so asking for more keeps the first ones
        wanted = max(eval_cfg.num_prompts, (judge_prompts or JUDGE_PROMPTS) if judge else 0)
        task_cfg = replace(task_cfg, num_eval_prompts=max(task_cfg.num_eval_prompts, wanted))
    task = build_task(task_cfg, run_dir)
    available = len(task.eval_prompts())
    if num_prompts and num_prompts > available:
        raise ConfigError(f"--prompts {num_prompts}: the run's task has only {available} held-out prompts")
    eval_cfg = replace(eval_cfg, num_prompts=min(eval_cfg.num_prompts, available))  # as the stages' own evaluation
    if sample_prompts and sample_prompts > eval_cfg.num_prompts:
        raise ConfigError(f"--sample-prompts {sample_prompts}: more than the {eval_cfg.num_prompts} prompts evaluated (raise --prompts)")
    eval_cfg = replace(eval_cfg, sample_prompts=sample_prompts or min(eval_cfg.num_prompts, eval_cfg.sample_prompts))
    prompts, responses, scores = greedy_scores(policy, task, tokenizer, eval_cfg)
    summary = {"stage": str(stage_dir), "prompts": eval_cfg.num_prompts, **score_metrics(task, prompts, responses, scores)}
    if eval_cfg.samples_per_prompt and eval_cfg.sample_prompts and all(s is not None for s in scores):
        summary.update(samples=eval_cfg.samples_per_prompt, temperature=eval_cfg.sample_temperature, sample_prompts=eval_cfg.sample_prompts)
        summary.update(headroom(policy, task, tokenizer, prompts, eval_cfg))
    if judge:
        if judge_prompts and judge_prompts > available:
            raise ConfigError(f"--judge-prompts {judge_prompts}: the run's task has only {available} held-out prompts")
        summary.update(judge_stage(policy, tokenizer, task, task.eval_prompts()[: judge_prompts or JUDGE_PROMPTS], run_judge_config(run_cfg), eval_cfg))
    return summary, scores


def judge_stage(policy, tokenizer, task, prompts: list[str], judge_cfg, eval_cfg) -> dict:
    """evaluate_judge's metrics for `prompts` (JUDGE_CANDIDATES candidates each, at
    JUDGE_TEMPERATURE / JUDGE_TOP_P, eval_cfg.max_new_tokens long), with a fixed seed."""
    from rlhf.judge import evaluate_judge

    sampling = SamplingConfig(max_new_tokens=eval_cfg.max_new_tokens, temperature=JUDGE_TEMPERATURE, top_p=JUDGE_TOP_P)
    generator = sampling_generator(policy)
    metrics, _ = evaluate_judge(policy, tokenizer, task, prompts, JUDGE_CANDIDATES, sampling, judge_cfg, generator, eval_cfg.batch_size)
    return {"judge_prompts": len(prompts), **metrics}


def paired_difference(scores: list[float], baseline: list[float]) -> dict[str, float]:
    """Mean of the per-prompt differences scores - baseline, and its standard error."""
    from rlhf.errors import ConfigError

    if len(scores) != len(baseline) or len(scores) < 2 or any(s is None for s in [*scores, *baseline]):
        raise ConfigError("--baseline needs a verifier score for every prompt of both, on at least 2 of the same prompts")
    diffs = [a - b for a, b in zip(scores, baseline)]
    return {"difference": statistics.mean(diffs), "standard_error": statistics.stdev(diffs) / math.sqrt(len(diffs))}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf evaluate", description="Greedy held-out evaluation of finished stages.")
    parser.add_argument("stage_dirs", nargs="+", metavar="STAGE_DIR")
    parser.add_argument("--prompts", type=int, default=None)
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--baseline", default=None, metavar="STAGE_DIR")
    parser.add_argument("--samples", type=int, default=None, metavar="K")
    parser.add_argument("--temperature", type=float, default=None, metavar="T")
    parser.add_argument("--sample-prompts", type=int, default=None, metavar="N")
    parser.add_argument("--judge", action="store_true")
    parser.add_argument("--judge-prompts", type=int, default=None, metavar="N")
    args = parser.parse_args(argv)
    for name in ("prompts", "max_new_tokens", "batch_size", "threads", "sample_prompts", "judge_prompts"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.samples is not None and args.samples < 0:
        parser.error("--samples must be at least 0 (0 turns sampling off)")
    if args.temperature is not None and not args.temperature > 0:
        parser.error("--temperature must be above 0")
    if args.judge_prompts is not None and not args.judge:
        parser.error("--judge-prompts needs --judge")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = dict(
        num_prompts=args.prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, samples=args.samples,
        temperature=args.temperature, sample_prompts=args.sample_prompts, judge=args.judge, judge_prompts=args.judge_prompts,
    )
    baseline = None
    if args.baseline:
        summary, baseline = evaluate_stage(args.baseline, **options)
        print(json.dumps(summary), flush=True)
    for stage_dir in args.stage_dirs:
        summary, scores = evaluate_stage(stage_dir, **options)
        if baseline is not None:
            summary["vs_baseline"] = paired_difference(scores, baseline)
        print(json.dumps(summary), flush=True)
    return 0
