"""The evaluation every stage ends with: greedy answers to the task's held-out prompts.

`python -m rlhf evaluate` re-runs it on finished stages, on as many held-out prompts as asked
(200 prompts put about ±0.02 of noise on the built-in task's score; 1,000 about ±0.01):

    python -m rlhf evaluate RUN/stages/00_sft RUN/stages/02_erdpo --prompts 1000

Arguments
  STAGE_DIR ...           complete stage dirs; the task comes from their run's config.yaml
  --prompts N             held-out prompts (default: the run's eval.num_prompts). The built-in
                          task's first 200 are the ones every stage was evaluated on; past the
                          run's task.num_eval_prompts, training did not exclude them (with its
                          random letters and numbers a repeat is rare). Other tasks have only
                          their run's held-out prompts
  --max-new-tokens M      longest greedy answer (default: the run's eval.max_new_tokens)
  --batch-size B          prompts generated at once (default: the run's eval.batch_size)
  --threads T             torch threads (default: torch's own choice)
  --baseline STAGE_DIR    also compare each stage with this one prompt by prompt: the mean
                          per-prompt score difference and its standard error (the same prompts
                          make the difference far less noisy than the two scores are)

Output: one JSON line per stage dir, {"stage": DIR, "prompts": N, "eval/task_score": ...,
"eval/exact_match": ..., "eval/task_score/<family>": ..., "eval/response_length": ...}, with
--baseline first the baseline's line, then each line also {"vs_baseline": {"difference": ...,
"standard_error": ...}}.
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
from tqdm.auto import tqdm

from rlhf.sampling import SamplingConfig, generate


def generate_text(policy, tokenizer, prompts: list[str], cfg: SamplingConfig, batch_size: int, generator=None, progress=False) -> list[str]:
    """Responses (EOS stripped) to `prompts`, batched, with the KV cache."""
    responses: list[str] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="generating", leave=False, disable=not progress):
        chunk = prompts[start : start + batch_size]
        gen = generate(policy, [tokenizer.encode(p) for p in chunk], cfg, tokenizer.eos_id, tokenizer.pad_id, generator)
        for ids in gen.response_ids():
            if ids and ids[-1] == tokenizer.eos_id:
                ids = ids[:-1]
            responses.append(tokenizer.decode(ids))
    return responses


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


def evaluate_policy(policy, task, tokenizer, eval_cfg, progress: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Greedy responses to held-out prompts scored by the task's verifier: flat metrics
    (score_metrics) and a few samples for the logs."""
    prompts, responses, scores = greedy_scores(policy, task, tokenizer, eval_cfg, progress)
    samples = [
        {"prompt": p, "response": r, "score": s}
        for p, r, s in list(zip(prompts, responses, scores))[: eval_cfg.num_logged_samples]
    ]
    return score_metrics(task, prompts, responses, scores), samples


def evaluate_stage(
    stage_dir: str | Path, num_prompts: Optional[int] = None, max_new_tokens: Optional[int] = None, batch_size: Optional[int] = None
) -> tuple[dict, list[Optional[float]]]:
    """The held-out evaluation of a finished stage's policy, on the task of the run it belongs
    to: (its metrics, each prompt's score in prompt order)."""
    from omegaconf import OmegaConf

    from rlhf.checkpoint import load_policy
    from rlhf.config import EvalConfig
    from rlhf.errors import ConfigError
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
    )
    task_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TaskConfig), run_cfg.task))
    if task_cfg.name == "builtin":
        # its held-out prompts are one seeded sequence, so asking for more keeps the first ones
        task_cfg = replace(task_cfg, num_eval_prompts=max(task_cfg.num_eval_prompts, eval_cfg.num_prompts))
    task = build_task(task_cfg, run_dir)
    available = len(task.eval_prompts())
    if num_prompts and num_prompts > available:
        raise ConfigError(f"--prompts {num_prompts}: the run's task has only {available} held-out prompts")
    eval_cfg = replace(eval_cfg, num_prompts=min(eval_cfg.num_prompts, available))  # as the stages' own evaluation
    prompts, responses, scores = greedy_scores(policy, task, tokenizer, eval_cfg)
    return {"stage": str(stage_dir), "prompts": eval_cfg.num_prompts, **score_metrics(task, prompts, responses, scores)}, scores


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
    args = parser.parse_args(argv)
    for name in ("prompts", "max_new_tokens", "batch_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = None
    if args.baseline:
        summary, baseline = evaluate_stage(args.baseline, args.prompts, args.max_new_tokens, args.batch_size)
        print(json.dumps(summary), flush=True)
    for stage_dir in args.stage_dirs:
        summary, scores = evaluate_stage(stage_dir, args.prompts, args.max_new_tokens, args.batch_size)
        if baseline is not None:
            summary["vs_baseline"] = paired_difference(scores, baseline)
        print(json.dumps(summary), flush=True)
    return 0
