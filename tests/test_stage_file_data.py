"""File data kept as compact token stores (issue #17 item 9) gives the stages exactly the batches,
truncation counts, held-out filtering and errors of the plain encoding they replaced.

Each reference below is the code the stages ran before: read every row, filter the held-out
prompts, encode each sampled row as text (encode_pair / encode_examples / tok.encode)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rlhf.data.chat import PLAIN
from rlhf.data.jsonl import read_preference_pairs, read_ratings, read_sft_examples, split_train_valid
from rlhf.errors import DataError
from rlhf.models import BPETokenizer
from rlhf.preference_batch import collate_pairs, encode_pair, pack_pairs
from rlhf.sampling import count_truncated, encode_examples
from rlhf.stage_context import StageContext
from rlhf.stages import dpo, reward_model, sft
from rlhf.training import EpochSampler

HELD = "\n\nHuman: held out?\n\nAssistant:"
LONG = " ".join(["word"] * 40)
PAIR_ROWS = [
    {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
    {"prompt": "", "chosen": "hello there", "rejected": "go away"},  # empty prompt: one opening token
    {"chosen": "\n\nHuman: hi\n\nAssistant: hello!", "rejected": "\n\nHuman: hi\n\nAssistant: what"},
    {"prompt": f"Q: {LONG}", "chosen": f" {LONG} yes", "rejected": " no"},  # truncated at max_length (24)
    "not an object",  # a bad row: skipped
    {"chosen": f"{HELD} yes", "rejected": f"{HELD} no"},  # held out: never trained on
    {"prompt": [{"role": "user", "content": "colour?"}], "chosen": [{"role": "assistant", "content": "blue"}],
     "rejected": [{"role": "assistant", "content": "loud"}]},  # message lists, the plain template; 19 + 6 tokens: cut
    {"prompt": "Q: 3+3?", "chosen": " 6", "rejected": " 33"},
]
SFT_ROWS = [
    {"prompt": "Q: 2+2?", "response": " 4"},
    {"prompt": "", "response": "hello"},
    {"prompt": f"Q: {LONG}", "completion": f" {LONG} yes"},
    {"prompt": HELD, "response": " yes"},
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                  {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]},  # its 2nd turn: 35 + 6 tokens, cut
]


def write(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def tok():
    texts = [json.dumps(r) for r in PAIR_ROWS + SFT_ROWS] + [LONG, HELD]
    return BPETokenizer.train(texts, vocab_size=300, min_frequency=1)  # has encode_batch: the batched path


def make_ctx(tmp_path, tok, cfg, max_seq_len=24, held=(HELD,)) -> StageContext:
    task = SimpleNamespace(is_held_out=lambda prompt: prompt in held)
    policy = SimpleNamespace(max_seq_len=max_seq_len, forward_packed=None)  # can_share_prompt: yes
    return StageContext(slot="s", cfg=cfg, run_cfg=None, stage_dir=tmp_path, policy=policy, task=task,
                        tokenizer=tok, seed=7, logger=None, completed={})


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("share_prompt", [True, False])
def test_dpo_file_batches_and_truncation_are_unchanged(tmp_path, tok, share_prompt, caplog):
    data = write(tmp_path / "pairs.jsonl", PAIR_ROWS)
    cfg = dpo.Config(data=data, batch_size=3, max_length=24, skip_bad_rows=True, share_prompt=share_prompt)
    with caplog.at_level("WARNING", logger="rlhf"):
        source = dpo.PairSource(make_ctx(tmp_path, tok, cfg))

    pairs = [p for p in read_preference_pairs(data, skip_bad_rows=True) if p.prompt != HELD]
    assert len(pairs) == 6 and len(source.pairs) == 6
    assert source.truncated == count_truncated(tok, [(p.prompt, [p.chosen, p.rejected]) for p in pairs], 24, "s") == 2
    assert "2 of 6 rows are longer than 24 tokens" in caplog.text
    sampler = EpochSampler(len(pairs), 3, 7)
    for step in range(5):  # past one epoch
        encoded = [encode_pair(pairs[k], tok, 24) for k in sampler.batch(step)]
        expected = pack_pairs(encoded, tok.pad_id) if share_prompt else collate_pairs(encoded, tok.pad_id)
        keys, *tensors = source.make_batch(step, 0, 1)
        assert keys.tolist() == sampler.batch(step) and same(tensors, expected)
    assert source.pairs[[p.prompt for p in pairs].index("")][0] == [tok.eos_id]  # an empty prompt opens with one token


def test_dpo_bad_row_still_names_file_and_line(tmp_path, tok):
    data = write(tmp_path / "pairs.jsonl", PAIR_ROWS)
    with pytest.raises(DataError, match=r"pairs\.jsonl:5: row is a JSON string"):
        dpo.PairSource(make_ctx(tmp_path, tok, dpo.Config(data=data, batch_size=3)))
    with pytest.raises(DataError, match="every row's prompt is held out"):
        dpo.PairSource(make_ctx(tmp_path, tok, dpo.Config(data=write(tmp_path / "held.jsonl", PAIR_ROWS[5:6]))))


def test_sft_file_batches_and_truncation_are_unchanged(tmp_path, tok):
    data = write(tmp_path / "sft.jsonl", SFT_ROWS)
    ctx = make_ctx(tmp_path, tok, sft.Config(data=data, batch_size=3))
    batches = []
    ctx.fit = lambda module, make_batch, callbacks=None: batches.extend(make_batch(step, 0, 1) for step in range(4))
    result = sft.run(ctx)

    examples = [e for e in read_sft_examples(data, chat=PLAIN) if e.prompt != HELD]
    assert len(examples) == 5  # the conversation gives one example per assistant turn
    assert result.metrics["data/truncated_rows"] == count_truncated(tok, [(e.prompt, [e.response]) for e in examples], 24, "s") == 2
    sampler = EpochSampler(len(examples), 3, 7)
    for step, batch in enumerate(batches):
        assert same(batch, encode_examples(tok, [examples[i] for i in sampler.batch(step)], max_len=24))


def reference_rm_rows(rows, tok, keys, labels=False):
    columns = [[tok.encode(getattr(x, k)) for x in rows] for k in keys]
    return list(zip(*columns, *([[x.label for x in rows]] if labels else [])))


def test_reward_model_file_rows_are_unchanged(tmp_path, tok):
    data = write(tmp_path / "pairs.jsonl", PAIR_ROWS)
    metrics: dict = {}
    cfg = reward_model.Config(data=data, skip_bad_rows=True, valid_fraction=0.3)
    train, valid = reward_model.read_file_data(cfg, tok, metrics)

    expected = split_train_valid(read_preference_pairs(data, skip_bad_rows=True), 0.3, cfg.split_seed)
    keys = ("prompt", "chosen", "rejected")
    assert list(train) == reference_rm_rows(expected[0], tok, keys) and list(valid) == reference_rm_rows(expected[1], tok, keys)
    assert train[0] == reference_rm_rows(expected[0], tok, keys)[0]  # indexing, as the sampler draws
    assert metrics == {"data/skipped_rows": 1.0, "data/train_rows": 5.0, "data/valid_rows": 2.0}
    assert list(valid)[0][0] == tok.encode(expected[1][0].prompt)  # the plain prompt ids: "" stays empty here


def test_reward_model_file_rows_leave_out_held_out_prompts(tmp_path, tok):
    data = write(tmp_path / "pairs.jsonl", PAIR_ROWS)
    cfg = reward_model.Config(data=data, skip_bad_rows=True, valid_fraction=0.3)
    ctx = make_ctx(tmp_path, tok, cfg)
    metrics: dict = {}
    train, valid = reward_model.read_file_data(cfg, tok, metrics, keep=ctx.iter_training_rows)
    held = tok.encode(HELD)
    assert all(row[0] != held for row in list(train) + list(valid))
    assert metrics["data/train_rows"] + metrics["data/valid_rows"] == 6.0  # 8 rows, one bad, one held out
    with pytest.raises(DataError, match="every row's prompt is held out"):
        reward_model.read_file_data(reward_model.Config(data=write(tmp_path / "held.jsonl", PAIR_ROWS[5:6])), tok, {},
                                    keep=make_ctx(tmp_path, tok, cfg).iter_training_rows)


def test_reward_model_rating_rows_and_their_scale(tmp_path, tok):
    rows = [{"prompt": "a", "response": " x", "rating": 5}, {"prompt": "", "response": "y", "rating": 2},
            {"prompt": "b", "completion": " z", "rating": 1}]
    data, valid_data = write(tmp_path / "r.jsonl", rows), write(tmp_path / "v.jsonl", rows[:1])
    cfg = reward_model.Config(data=data, valid_data=valid_data, data_format="ratings", num_bins=5)
    train, valid = reward_model.read_file_data(cfg, tok, {})
    assert list(train) == reference_rm_rows(read_ratings(data), tok, ("prompt", "response"), labels=True)
    assert [label for _, _, label in train] == [4, 1, 0] and list(valid) == [train[0]]
    with pytest.raises(Exception, match="the ratings have 5 levels but num_bins=2"):
        reward_model.read_file_data(reward_model.Config(data=data, data_format="ratings", num_bins=2), tok, {})
