"""Best-of-N generation: sample N responses per prompt from a trained policy and keep the one
a reward model (or any reward function) scores highest.

    python -m rlhf generate --policy RUN/stages/00_sft --reward RUN/stages/01_rm \\
        --prompt 'sort: qwhfkdmz\\n' --prompt 'add: 48213+937\\n' -n 8

Arguments
  --policy STAGE_DIR       a complete stage dir whose policy samples (any stage's dir)
  --reward STAGE_DIR       a complete `reward_model` stage dir that scores the samples, or
  --reward-fn DOTTED.PATH  a function (prompts, responses) -> list of floats, such as
                           rlhf.tasks.builtin.verifier_reward
  --prompt TEXT            a prompt (repeatable). The escapes \\n, \\t and \\\\ are decoded, so the
                           built-in task's trailing newline can be typed as \\n
  --prompts-file FILE      prompts from a file: `.jsonl[.gz]` rows {"prompt": ...} taken exactly,
                           any other file one prompt per line with the same escapes decoded
  -n, --num-samples N      candidates per prompt (default 4)
  --temperature T          sampling temperature, 0 = greedy (default 1.0)
  --top-p P                nucleus sampling mass, 1 = off (default 1.0)
  --top-k K                keep the K most likely tokens, 0 = off (default 0)
  --max-new-tokens M       longest response in tokens (default 64)
  --seed S                 sampling seed: the same seed gives the same candidates (default 0)
  --batch-size B           sequences sampled at once (default 64)

Output: one JSON line per prompt, in input order,
  {"prompt": ..., "best": ..., "best_reward": ..., "candidates": [{"response": ..., "reward": ...}, ...]}
with candidates sorted by reward, best first (ties keep sampling order).
Sampling uses the KV cache (rlhf.sampling.generate); the EOS is stripped from responses.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from rlhf.errors import ConfigError, DataError


def unescape(text: str) -> str:
    r"""Decode \n, \t and \\ (and nothing else, so other backslashes and non-ASCII text stay as typed)."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in "nt\\":
            out.append({"n": "\n", "t": "\t", "\\": "\\"}[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def read_prompts(path: str) -> list[str]:
    """Prompts from a JSONL file (rows {"prompt"}, exact) or a text file (one per line, escapes decoded)."""
    from rlhf.data.jsonl import BadRow, read_rows, require_object

    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: prompts file not found")
    if file.name.lower().removesuffix(".gz").endswith(".jsonl"):

        def parse(row) -> str:
            prompt = require_object(row).get("prompt")
            if not isinstance(prompt, str) or not prompt:
                raise BadRow("expected a non-empty string 'prompt'")
            return prompt

        return read_rows(file, parse, skip_bad_rows=False, stats=None, what="prompt")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read prompts ({err})") from None
    prompts = [unescape(line) for line in lines if line.strip()]
    if not prompts:
        raise DataError(f"{path}: no prompts (one per line)")
    return prompts


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf generate",
        description="Best-of-N: sample N responses per prompt from a policy, rank them by a reward, print JSON lines.",
        epilog='Prints one JSON line per prompt: {"prompt", "best", "best_reward", "candidates": [{"response", "reward"}, ...]}, '
        "candidates sorted best first.",
    )
    parser.add_argument("--policy", required=True, metavar="STAGE_DIR", help="complete stage dir of the policy that samples")
    reward = parser.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward", metavar="STAGE_DIR", help="complete reward_model stage dir that scores the samples")
    reward.add_argument("--reward-fn", metavar="DOTTED.PATH", help="function (prompts, responses) -> rewards, e.g. rlhf.tasks.builtin.verifier_reward")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", metavar="TEXT", help=r"a prompt (repeatable); \n, \t and \\ are decoded")
    prompts.add_argument("--prompts-file", metavar="FILE", help='.jsonl rows {"prompt"}, or a text file with one prompt per line')
    parser.add_argument("-n", "--num-samples", type=int, default=4, metavar="N", help="candidates per prompt (default 4)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature, 0 = greedy (default 1.0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, 1 = off (default 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the K most likely tokens, 0 = off (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="longest response in tokens (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--batch-size", type=int, default=64, help="sequences sampled at once (default 64)")
    args = parser.parse_args(argv)
    if args.num_samples < 1:
        raise ConfigError(f"-n {args.num_samples}: need at least 1 sample per prompt")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise ConfigError("need --temperature >= 0, 0 < --top-p <= 1, --top-k >= 0, --max-new-tokens >= 1, --batch-size >= 1")
    return args


def best_of_n(policy, tokenizer, prompts: list[str], reward_fn, n: int, sampling, seed: int, batch_size: int) -> list[dict]:
    """For each prompt: n sampled responses, their rewards, sorted best first."""
    from rlhf.sampling import generate_text

    rows = [p for p in prompts for _ in range(n)]  # each prompt's n samples side by side
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    responses = generate_text(policy, tokenizer, rows, sampling, batch_size, generator=generator)
    rewards = [float(r) for r in reward_fn(rows, responses)]
    if len(rewards) != len(rows):
        raise ConfigError(f"the reward function returned {len(rewards)} rewards for {len(rows)} responses")
    out = []
    for i, prompt in enumerate(prompts):
        candidates = [{"response": r, "reward": w} for r, w in zip(responses[i * n : (i + 1) * n], rewards[i * n : (i + 1) * n])]
        candidates.sort(key=lambda c: -c["reward"])
        out.append({"prompt": prompt, "best": candidates[0]["response"], "best_reward": candidates[0]["reward"], "candidates": candidates})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    from rlhf.models import load_policy
    from rlhf.reward import import_dotted, load_reward_model, model_reward_fn
    from rlhf.sampling import SamplingConfig

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    prompts = [unescape(p) for p in args.prompt] if args.prompt else read_prompts(args.prompts_file)
    policy, tokenizer = load_policy(Path(args.policy))
    if args.reward is not None:
        reward_model, reward_tokenizer = load_reward_model(Path(args.reward))
        reward_fn = model_reward_fn(reward_model, reward_tokenizer)
    else:
        reward_fn = import_dotted(args.reward_fn)
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    for row in best_of_n(policy, tokenizer, prompts, reward_fn, args.num_samples, sampling, args.seed, args.batch_size):
        print(json.dumps(row, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    from rlhf.cli import main as cli_main

    raise SystemExit(cli_main(["generate", *sys.argv[1:]]))
