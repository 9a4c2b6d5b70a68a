"""The evaluation every stage ends with: greedy answers to the task's held-out prompts."""

from __future__ import annotations

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
def evaluate_policy(policy, task, tokenizer, eval_cfg, progress: bool = False) -> tuple[dict[str, float], list[dict]]:
    """Greedy responses to held-out prompts scored by the task's verifier.

    Returns flat metrics (`eval/task_score` and `eval/exact_match` when the task has a
    verifier, `eval/response_length` in characters) and a few samples for the logs.
    """
    prompts = task.eval_prompts()[: eval_cfg.num_prompts]
    sampling = SamplingConfig(max_new_tokens=eval_cfg.max_new_tokens, temperature=0.0)
    responses = generate_text(policy, tokenizer, prompts, sampling, eval_cfg.batch_size, progress=progress)
    scores = [task.score(p, r) for p, r in zip(prompts, responses)]
    n = max(1, len(prompts))
    metrics = {"eval/response_length": sum(len(r) for r in responses) / n}
    if all(s is not None for s in scores):
        metrics["eval/task_score"] = sum(scores) / n
        metrics["eval/exact_match"] = sum(s == 1.0 for s in scores) / n
    samples = [
        {"prompt": p, "response": r, "score": s}
        for p, r, s in list(zip(prompts, responses, scores))[: eval_cfg.num_logged_samples]
    ]
    return metrics, samples
