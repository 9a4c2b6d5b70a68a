"""LLM-as-judge: score parsing, template/regex validation at config time, batched judging."""

import pytest
import torch
from torch import nn

from rlhf.config import typed_stage_config
from rlhf.errors import ConfigError
from rlhf.judge import (
    DEFAULT_SCORE_REGEX,
    JudgeConfig,
    judge,
    judge_scores,
    pairwise_agreement,
    parse_judgement,
    read_template_file,
    validate_regex,
    validate_template,
)
from rlhf.models import CharTokenizer
from rlhf.tasks.builtin import ALPHABET, DEFAULT_JUDGE_TEMPLATE

SCORE = r"score:\s*(-?\d+(?:\.\d+)?)"  # an unanchored user regex


# ------------------------------------------------------------------------------ parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("score: 4", 4.0),  # the built-in judge's format
        ("a+ ab+ bc- c+\nscore: 1", 1.0),  # its step-by-step checks of a path come first
        ("score:3", 3.0),
        ("score: 0", 0.0),
        ("score: 5", 5.0),  # the range is inclusive
        ("score: 2.5", 2.5),
        ("score: 4.75 and more", 4.75),
        ("score: 7", None),  # above the range
        ("score: -1", None),  # below the range
        ("score: 5.01", None),
        ("", None),  # missing
        ("score: four", None),
        (" 4", None),  # a bare number is no verdict
    ],
)
def test_parse_default_regex(text, expected):
    assert parse_judgement(text, DEFAULT_SCORE_REGEX, 0, 5) == expected


def test_parse_several_matches_takes_the_first():
    assert parse_judgement("score: 2 ... on reflection score: 4", SCORE, 0, 5) == 2.0
    assert parse_judgement("score: 3 score: 4", DEFAULT_SCORE_REGEX, 0, 5) == 3.0


def test_parse_user_regex_decimals_range_and_missing():
    assert parse_judgement("The answer is fine. Score: 4.5", r"Score:\s*(\d+(?:\.\d+)?)", 0, 5) == 4.5
    assert parse_judgement("score: 8", SCORE, 0, 10) == 8.0
    assert parse_judgement("score: 8", SCORE, 0, 5) is None
    assert parse_judgement("no verdict", SCORE, 0, 5) is None
    # an optional group that did not take part in the match is missing, not a crash
    assert parse_judgement("score:", r"score:(\d)?", 0, 5) is None


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "template, message",
    [
        ("judge {prompt}\nscore:", "no {response}"),
        ("answer {response}\nscore:", "no {prompt}"),
        ("no placeholders", "no {prompt} or {response}"),
        ("{prompt}{response} {score}", "cannot be filled"),
        ("{prompt}{response} {", "cannot be filled"),
        ("", "empty"),
    ],
)
def test_validate_template_rejects(template, message):
    with pytest.raises(ConfigError, match=message.replace("{", r"\{").replace("}", r"\}")):
        validate_template(template)


def test_validate_template_accepts_default_and_literal_braces():
    assert validate_template(DEFAULT_JUDGE_TEMPLATE) == DEFAULT_JUDGE_TEMPLATE
    validate_template("{prompt} -> {response} {{json}} score:")


@pytest.mark.parametrize(
    "regex, message",
    [("score: \\d+", "0 capture groups"), (r"(\d+)\.(\d+)", "2 capture groups"), ("score: (\\d+", "not a valid regular expression")],
)
def test_validate_regex_rejects(regex, message):
    with pytest.raises(ConfigError, match=message):
        validate_regex(regex)


def test_validate_regex_accepts_non_capturing_groups():
    assert validate_regex(r"(?:score|rating):\s*(\d+)").groups == 1


def test_judge_config_fails_when_built():
    with pytest.raises(ConfigError, match="capture groups"):
        JudgeConfig(score_regex="\\d")
    with pytest.raises(ConfigError, match="not both"):
        JudgeConfig(template="{prompt}{response}", template_file="x.txt")
    with pytest.raises(ConfigError, match="min_score"):
        JudgeConfig(min_score=5, max_score=1)
    with pytest.raises(ConfigError, match="no such file"):
        JudgeConfig(template_file="/nonexistent/judge.txt")


def test_stage_config_with_bad_judge_fails_before_training():
    # what the orchestrator does to every slot before the first stage runs
    with pytest.raises(ConfigError, match="capture groups"):
        typed_stage_config("dpo_iter1", {"kind": "self_reward_dpo", "judge": {"score_regex": "score: \\d"}})
    with pytest.raises(ConfigError, match="no {response}".replace("{", r"\{").replace("}", r"\}")):
        typed_stage_config("dpo_iter1", {"kind": "self_reward_dpo", "judge": {"template": "judge {prompt}"}})
    cfg = typed_stage_config("dpo_iter1", {"kind": "self_reward_dpo", "judge": {"num_samples": 5}})
    assert cfg.judge.num_samples == 5 and cfg.judge.resolved_template() == DEFAULT_JUDGE_TEMPLATE


def test_template_file(tmp_path):
    path = tmp_path / "judge.txt"
    path.write_text("Rate {response} for {prompt}.\nScore:\n")  # editors add the final newline
    assert read_template_file(str(path)) == "Rate {response} for {prompt}.\nScore:"
    assert JudgeConfig(template_file=str(path)).resolved_template().endswith("Score:")
    # a name in conf/judge/
    assert "{response}" in JudgeConfig(template_file="builtin.txt").resolved_template()


@pytest.mark.slow
def test_bad_regex_fails_the_command_before_any_stage(cli_in_process, tmp_path):
    proc = cli_in_process("run", "recipe=self_reward", "model=tiny", "logger=none", "stages.dpo_iter2.judge.score_regex=score", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2
    assert "capture groups" in proc.stderr
    assert not (tmp_path / "stages").exists()


# ----------------------------------------------------------------------------- judging


class Scripted(nn.Module):
    """A stand-in LM that writes "score: 4" and EOS after a newline (next token from the last token alone)."""

    def __init__(self, tok: CharTokenizer):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        v = tok.vocab_size
        self.table = torch.full((v, v), -1e4)
        self.table[:, tok.eos_id] = 0.0  # anything else: stop
        verdict = "\nscore: 4"  # every character once, so the last token alone says what comes next
        for a, b in zip(verdict, verdict[1:]):
            self.table[tok.encode(a)[0]] = -1e4
            self.table[tok.encode(a)[0], tok.encode(b)[0]] = 0.0

    def decode_step(self, tokens, cache=None, seq_start_pos=None):
        return self.table[tokens[:, -1]], None


def test_judge_batches_samples_and_averages():
    tok = CharTokenizer(ALPHABET)
    cfg = JudgeConfig(num_samples=3, temperature=1.0, top_p=1.0)
    prompts, responses = ["sort: cba\n", "add: 1+2\n"], ["abc", "4"]
    out = judge(Scripted(tok), tok, prompts, responses, cfg, batch_size=4)  # 6 generations in 2 batches
    assert [j.texts for j in out] == [["score: 4"] * 3] * 2
    assert [j.score for j in out] == [4.0, 4.0] and all(j.failures == 0 for j in out)
    assert judge_scores(Scripted(tok), tok, prompts, responses, cfg) == [4.0, 4.0]
    # a range that excludes 4: every sample fails, the score is None (dropped, not guessed)
    out = judge(Scripted(tok), tok, prompts, responses, JudgeConfig(num_samples=2, max_score=3))
    assert [j.score for j in out] == [None, None] and [j.failures for j in out] == [2, 2]


def test_greedy_judge_generates_each_distinct_candidate_once(monkeypatch):
    import rlhf.judge

    calls = []

    def fake_generate_text(policy, tokenizer, texts, sampling, batch_size, generator=None):
        calls.append(list(texts))
        return ["score: 5" if "abc" in t else "score: 1" for t in texts]

    monkeypatch.setattr(rlhf.judge, "generate_text", fake_generate_text)
    prompts, responses = ["sort: cba\n"] * 4 + ["sort: bca\n"], ["abc", "acb", "abc", "abc", "abc"]
    out = judge(None, None, prompts, responses, JudgeConfig(num_samples=2, temperature=0.0))
    assert calls == [["judge sort: cba\nanswer abc\n", "judge sort: cba\nanswer acb\n", "judge sort: bca\nanswer abc\n"]]
    assert [j.scores for j in out] == [[5.0, 5.0], [1.0, 1.0], [5.0, 5.0], [5.0, 5.0], [5.0, 5.0]]
    # sampling judges generate every sample
    calls.clear()
    judge(None, None, prompts, responses, JudgeConfig(num_samples=2, temperature=0.7))
    assert len(calls[0]) == 10


def test_pairwise_agreement():
    truth = [1.0, 0.5, 0.5, 0.0]
    judged = [5.0, 3.0, None, 3.0]
    # pairs with different truth and both judged: (0,1) right, (0,3) right, (1,3) judge tie = 0.5
    assert pairwise_agreement(judged, truth) == (2.5, 3)
    assert pairwise_agreement([1.0, 2.0], [1.0, 0.0]) == (0.0, 1)
    assert pairwise_agreement([1.0, 2.0], [0.5, 0.5]) == (0.0, 0)


def test_reference_judge_shares_each_prompts_references(monkeypatch):
    """With {reference}, each distinct prompt gets num_samples answers from the judge first;
    verdict s of EVERY candidate of that prompt is judged against answer s."""
    import rlhf.judge

    calls = []

    def fake_generate_text(policy, tokenizer, texts, sampling, batch_size, generator=None):
        calls.append(list(texts))
        if len(calls) == 1:  # the references: "<prompt's first letter><sample index>"
            return [f"{t[6]}{i % 2}" for i, t in enumerate(texts)]
        # the verdicts: 5 when the response equals the reference, else 1
        return ["score: 5" if t.split("answer ")[1].split("\n")[0] == t.split("reference ")[1].split("\n")[0] else "score: 1" for t in texts]

    monkeypatch.setattr(rlhf.judge, "generate_text", fake_generate_text)
    cfg = JudgeConfig(num_samples=2, template="{prompt}answer {response}\nreference {reference}\nscore:")
    prompts = ["sort: x\n", "sort: x\n", "sort: y\n"]
    out = judge(None, None, prompts, ["x0", "x1", "y1"], cfg)
    assert calls[0] == ["sort: x\n", "sort: x\n", "sort: y\n", "sort: y\n"]  # distinct prompts only
    assert [j.references for j in out] == [["x0", "x1"], ["x0", "x1"], ["y0", "y1"]]
    assert [j.scores for j in out] == [[5.0, 1.0], [1.0, 5.0], [1.0, 5.0]]
    # a template without {reference} samples no references
    calls.clear()
    out = judge(None, None, prompts[:1], ["x0"], JudgeConfig(num_samples=2, template="{prompt}{response}\nscore:"))
    assert len(calls) == 1 and out[0].references == []
