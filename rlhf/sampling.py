"""Batched sampling with a KV cache, returning the log-probs of the sampled tokens.

Prompts of different lengths are left-padded and the model is told where each row's
real tokens start (`seq_start_pos`), so padding never changes a row's output. The
log-probs returned are those of the distribution actually sampled from (after
temperature, top-k and top-p): with temperature 1 and no filter that is the policy's
own distribution, which is what on-policy RL needs. `generate_responses` and `generate_text`
answer text prompts with decoded text, in batches (evaluation, the judge, stages that sample).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from tqdm.auto import tqdm

from rlhf.data.token_store import TokenStore, encode_texts, store_rows


@dataclass
class SamplingConfig:
    max_new_tokens: int = 32
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 means off
    top_p: float = 1.0  # 1 means off
    use_cache: bool = True


@dataclass
class Generation:
    """Sampled responses, right-padded: tokens/logprobs/mask are (B, L)."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor

    def response_ids(self) -> list[list[int]]:
        return [row[m.bool()].tolist() for row, m in zip(self.tokens, self.mask)]


def left_pad(prompts: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P) left-padded prompt tokens and each row's start position."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError("empty prompt: every prompt needs at least one token (encode it with encode_prompt)")
        tokens[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
    start = torch.tensor([width - len(p) for p in prompts], dtype=torch.long, device=device)
    return tokens, start


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p) set to -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token once the mass before it already reaches top_p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model,
    prompts: list[list[int]],
    cfg: SamplingConfig,
    eos_id: int,
    pad_id: int,
    generator: Optional[torch.Generator] = None,
) -> Generation:
    """Sample up to cfg.max_new_tokens per prompt; a row stops after its EOS (which it keeps)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tokens, start = left_pad(prompts, pad_id, device)
    batch = tokens.shape[0]
    out_tokens = torch.full((batch, cfg.max_new_tokens), pad_id, dtype=torch.long, device=device)
    out_logprobs = torch.zeros((batch, cfg.max_new_tokens), device=device)
    out_mask = torch.zeros((batch, cfg.max_new_tokens), dtype=torch.bool, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    cache = None
    for step in range(cfg.max_new_tokens):
        logits, new_cache = model.decode_step(tokens, cache=cache, seq_start_pos=start)
        if cfg.use_cache:
            cache = new_cache
        logits = logits.float()
        if cfg.temperature == 0:
            logprobs = logits.log_softmax(-1)
            next_token = logits.argmax(-1)
        else:
            logprobs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).log_softmax(-1)
            next_token = torch.multinomial(logprobs.exp(), 1, generator=generator).squeeze(-1)
        alive = ~done
        out_tokens[:, step] = torch.where(alive, next_token, pad_id)
        out_logprobs[:, step] = torch.where(alive, logprobs.gather(-1, next_token[:, None]).squeeze(-1), 0.0)
        out_mask[:, step] = alive
        done |= next_token == eos_id
        if done.all():
            out_tokens, out_logprobs, out_mask = (t[:, : step + 1] for t in (out_tokens, out_logprobs, out_mask))
            break
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
    model.train(was_training)
    return Generation(out_tokens, out_logprobs, out_mask)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """A prompt's token ids; an empty prompt is one beginning-of-sequence token (the tokenizer's
    `bos_id`, else its EOS, which separates documents as GPT-2's <|endoftext|> does), so a
    response's first token always has a position to be predicted from. Every layout (SFT, the
    preference pairs, generation, rollouts) encodes prompts through here, so they agree."""
    return open_prompt(tokenizer, tokenizer.encode(text))


def open_prompt(tokenizer, ids: list[int]) -> list[int]:
    """`encode_prompt` of a text whose plain ids (`tokenizer.encode`) are `ids`: for callers
    that encode many texts in one batch (rlhf.data.token_store.encode_texts)."""
    bos = getattr(tokenizer, "bos_id", None)
    return ids or [tokenizer.eos_id if bos is None else bos]


def truncate_to_fit(prompt: list[int], responses: list[list[int]], max_len: int) -> tuple[list[int], list[list[int]], bool]:
    """The one truncation rule of every stage (SFT, the preference pairs, reward models): a
    prompt and its responses (each scored after the prompt alone) that do not fit `max_len`
    tokens keep the prompt's END (the turn being answered) and each response's START, and the
    longest response keeps at least half of max_len (as TRL's max_prompt_length = max_length / 2).
    A response cut short loses its EOS with its end: it is not taught as finished.

    Returns (prompt, responses, whether anything was cut). max_len must be >= 2."""
    longest = max((len(r) for r in responses), default=0)
    if len(prompt) + longest <= max_len:
        return prompt, responses, False
    keep_response = min(longest, max(max_len - len(prompt), max_len // 2))
    keep_prompt = min(len(prompt), max_len - keep_response)
    return prompt[len(prompt) - keep_prompt :], [r[:keep_response] for r in responses], True


def count_truncated(tokenizer, rows, max_len: int, slot: str) -> int:
    """How many (prompt, responses) text rows `truncate_to_fit` cuts at max_len tokens (each
    response with its EOS); logs a warning naming the stage and the count when any is."""
    eos = [tokenizer.eos_id]
    cut = sum(truncate_to_fit(encode_prompt(tokenizer, p), [tokenizer.encode(r) + eos for r in rs], max_len)[2] for p, rs in rows)
    _warn_truncated(cut, len(rows), max_len, slot)
    return cut


def count_truncated_ids(rows, max_len: int, slot: str) -> int:
    """`count_truncated` of rows already encoded: each row (prompt ids as `encode_prompt` gives
    them, then each response's ids with its EOS), e.g. a `TokenStore`'s. Logs the same warning."""
    cut = sum(truncate_to_fit(row[0], list(row[1:]), max_len)[2] for row in rows)
    _warn_truncated(cut, len(rows), max_len, slot)
    return cut


def _warn_truncated(cut: int, rows: int, max_len: int, slot: str) -> None:
    import logging

    if cut:
        logging.getLogger("rlhf").warning(
            "%s: %d of %d rows are longer than %d tokens and are truncated (the prompt keeps its end, each response its start)", slot, cut, rows, max_len
        )


def encode_examples(tokenizer, examples, device=None, max_len: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`join_prompt_response` of (prompt, response) examples (anything with .prompt and
    .response text), each response closed by EOS: the (B, T) tokens and response mask SFT trains on.
    With max_len, rows longer than it are cut by `truncate_to_fit`."""
    prompts = [encode_prompt(tokenizer, e.prompt) for e in examples]
    responses = [tokenizer.encode(e.response) + [tokenizer.eos_id] for e in examples]
    return join_fitted(prompts, responses, tokenizer.pad_id, max_len, device)


def join_fitted(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, max_len: Optional[int] = None, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`join_prompt_response` of rows first cut to max_len by `truncate_to_fit` (None: not cut)."""
    if max_len is not None:
        cut = [truncate_to_fit(p, [r], max_len) for p, r in zip(prompts, responses)]
        prompts, responses = [p for p, _, _ in cut], [rs[0] for _, rs, _ in cut]
    return join_prompt_response(prompts, responses, pad_id, device)


def example_store(examples, tokenizer) -> TokenStore:
    """Every (prompt, response) example (an iterable of anything with .prompt and .response
    text, consumed once) encoded as `encode_examples` encodes it before truncation, in a
    `rlhf.data.token_store.TokenStore` of rows (prompt ids, response ids + EOS): `join_fitted`
    of some rows' prompts and responses is `encode_examples` of those examples."""

    def encode(chunk):
        ids = encode_texts(tokenizer, [t for e in chunk for t in (e.prompt, e.response)])
        return [(open_prompt(tokenizer, ids[2 * i]), ids[2 * i + 1] + [tokenizer.eos_id]) for i in range(len(chunk))]

    return store_rows(examples, encode, 2)


def join_prompt_response(
    prompts: list[list[int]], responses: list[list[int]], pad_id: int, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, T) prompt+response tokens and the response mask the log-prob code expects."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        tokens[i, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        mask[i, len(p) : len(p) + len(r)] = True
    return tokens.to(device), mask.to(device)


def generate_responses(policy, tokenizer, prompts: list[str], cfg: SamplingConfig, batch_size: int, generator=None, progress=False) -> tuple[list[str], list[bool]]:
    """Responses (EOS stripped) to `prompts`, batched, with the KV cache, and whether each one
    finished (ended with EOS) rather than being cut off at cfg.max_new_tokens."""
    responses: list[str] = []
    finished: list[bool] = []
    batches = range(0, len(prompts), batch_size)
    for start in tqdm(batches, desc="generating", leave=False, disable=not progress):
        chunk = prompts[start : start + batch_size]
        gen = generate(policy, [encode_prompt(tokenizer, p) for p in chunk], cfg, tokenizer.eos_id, tokenizer.pad_id, generator)
        for ids in gen.response_ids():
            done = bool(ids) and ids[-1] == tokenizer.eos_id
            responses.append(tokenizer.decode(ids[:-1] if done else ids))
            finished.append(done)
    return responses, finished


def generate_text(policy, tokenizer, prompts: list[str], cfg: SamplingConfig, batch_size: int, generator=None, progress=False) -> list[str]:
    """Responses (EOS stripped) to `prompts`, batched, with the KV cache."""
    return generate_responses(policy, tokenizer, prompts, cfg, batch_size, generator, progress)[0]
