"""Headroom (pass@k, best-of-k by the verifier), the judge's calibration, and the
`evaluate --samples/--judge` flags and report columns that show them."""

import json
import math

import pytest
import torch
from omegaconf import OmegaConf

import rlhf.evaluation
import rlhf.judge
from rlhf.config import EvalConfig, typed_run_config
from rlhf.errors import ConfigError
from rlhf.evaluation import best_of_k, evaluate_policy, headroom_metrics, pass_at_k, run_judge_config, sample_scores
from rlhf.judge import JudgeConfig, calibration_bucket, evaluate_judge
from rlhf.sampling import SamplingConfig
from rlhf.tasks import TaskConfig
from rlhf.tasks.builtin import BuiltinTask, answer

# ------------------------------------------------------------------- pass@k and best-of-k


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 2, 0.7),  # 1 - C(3,2)/C(5,2) = 1 - 3/10
        (5, 0, 3, 0.0),  # nothing correct
        (5, 3, 3, 1.0),  # n - c = 2 < k: every 3 samples hold a correct one
        (8, 8, 8, 1.0),
        (10, 1, 1, 0.1),  # pass@1 is c / n
        (8, 2, 8, 1.0),
    ],
)
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_matches_binomials_for_large_n():
    # the product form against exact binomial arithmetic where C(n, k) is astronomically large
    n, c, k = 1000, 7, 100
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), rel=1e-12)


@pytest.mark.parametrize("n, c, k", [(4, 1, 5), (4, 1, 0), (4, 5, 2), (4, -1, 2), (0, 0, 1), (4.0, 1, 2), (4, 1, True)])
def test_pass_at_k_rejects_bad_input(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_best_of_k_hand_computed():
    # k=2 of [0, 0.5, 1.0]: subsets {0,.5} {0,1} {.5,1} have maxima .5, 1, 1: (0.5*1 + 1.0*2)/3
    assert best_of_k([1.0, 0.0, 0.5], 2) == pytest.approx((0.5 * 1 + 1.0 * 2) / 3)
    assert best_of_k([0.2, 0.4, 0.9], 1) == pytest.approx(0.5)  # k=1: the mean
    assert best_of_k([0.2, 0.4, 0.9], 3) == pytest.approx(0.9)  # k=n: the maximum
    with pytest.raises(ValueError):
        best_of_k([0.2, 0.4], 3)
    with pytest.raises(ValueError):
        best_of_k([0.2, 0.4], 0)


def test_best_of_k_of_exact_flags_is_pass_at_k():
    for n in range(1, 7):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert best_of_k([1.0] * c + [0.0] * (n - c), k) == pytest.approx(pass_at_k(n, c, k))


# ---------------------------------------------------------------------- headroom_metrics


class FamilyTask:
    """Prompts 'x: ...' belong to family x; the verifier looks the response up."""

    def __init__(self, table=None):
        self.table = table or {}

    def family(self, prompt):
        return prompt.split(":")[0]

    def score(self, prompt, response):
        return self.table.get(response, 0.0)


def test_headroom_metrics_overall_and_per_family():
    prompts = ["a: 1", "a: 2", "b: 1"]
    scores = [[1.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.5, 0.25]]
    m = headroom_metrics(FamilyTask(), prompts, scores, k=2)
    # pass@2 per prompt: 1 - C(3,2)/C(4,2) = 0.5, 0, 1 - C(2,2)/C(4,2) = 5/6
    assert m["eval/pass@2/a"] == pytest.approx(0.25)
    assert m["eval/pass@2/b"] == pytest.approx(5 / 6)
    assert m["eval/pass@2"] == pytest.approx((0.5 + 0 + 5 / 6) / 3)
    # best-of-2 of [0,0,.5,1]: (0*0 + 0*1 + .5*2 + 1*3)/6 = 4/6; of zeros 0; of [.25,.5,1,1]: (.5*1 + 1*2 + 1*3)/6
    assert m["eval/best_of_2/a"] == pytest.approx((4 / 6 + 0) / 2)
    assert m["eval/best_of_2/b"] == pytest.approx(5.5 / 6)
    assert m["eval/sample_exact"] == pytest.approx(3 / 12)
    assert m["eval/sample_exact/a"] == pytest.approx(1 / 8) and m["eval/sample_exact/b"] == pytest.approx(0.5)
    assert set(m) == {f"eval/{name}{fam}" for name in ("pass@2", "best_of_2", "sample_exact") for fam in ("", "/a", "/b")}


def test_headroom_metrics_without_families_or_verifier():
    class Plain:
        def score(self, prompt, response):
            return 0.0

    m = headroom_metrics(Plain(), ["p", "q"], [[1.0, 0.0], [0.0, 0.0]], k=1)
    assert m == {"eval/pass@1": 0.25, "eval/best_of_1": 0.25, "eval/sample_exact": 0.25}
    assert headroom_metrics(Plain(), ["p"], [[None, None]], k=1) == {}
    assert headroom_metrics(Plain(), [], [], k=1) == {}


# ------------------------------------------------------------- sampling inside evaluate_policy


def test_evaluate_policy_adds_headroom_with_a_seeded_sampler(monkeypatch):
    """Greedy answers are all wrong; of each prompt's k samples the first is right for sort
    prompts only. Sampling runs on the first sample_prompts prompts, at the configured
    temperature, without top-p, with a seeded generator."""
    calls = []

    def fake_generate_text(policy, tokenizer, prompts, cfg, batch_size, generator=None, progress=False):
        calls.append((list(prompts), cfg, generator))
        if cfg.temperature == 0:
            return ["" for _ in prompts]
        return [answer(p) if i % 4 == 0 and p.startswith("sort") else "" for i, p in enumerate(prompts)]

    monkeypatch.setattr(rlhf.evaluation, "generate_text", fake_generate_text)
    task = BuiltinTask(TaskConfig(num_eval_prompts=20))
    policy = torch.nn.Linear(1, 1)
    cfg = EvalConfig(num_prompts=12, samples_per_prompt=4, sample_prompts=10, sample_temperature=1.0)
    metrics, _ = evaluate_policy(policy, task, None, cfg)
    greedy, sampled = calls
    assert len(greedy[0]) == 12
    prompts = task.eval_prompts()[:10]
    assert sampled[0] == [p for p in prompts for _ in range(4)]
    assert sampled[1].temperature == 1.0 and sampled[1].top_p == 1.0 and sampled[1].top_k == 0
    assert isinstance(sampled[2], torch.Generator) and sampled[2].initial_seed() == rlhf.evaluation.SAMPLE_SEED
    n_sort = sum(p.startswith("sort") for p in prompts)
    assert metrics["eval/exact_match"] == 0.0
    assert metrics["eval/pass@4/sort"] == 1.0 and metrics["eval/pass@4/add"] == 0.0
    assert metrics["eval/pass@4"] == pytest.approx(n_sort / 10)
    assert metrics["eval/sample_exact/sort"] == 0.25 and metrics["eval/sample_exact"] == pytest.approx(n_sort / 40)
    # off: no sampling call, no headroom keys
    calls.clear()
    metrics, _ = evaluate_policy(policy, task, None, EvalConfig(num_prompts=12, samples_per_prompt=0))
    assert len(calls) == 1 and not any(k.startswith(("eval/pass@", "eval/best_of", "eval/sample_exact")) for k in metrics)


def tiny_policy_and_task():
    from rlhf.models import ModelConfig, build_model

    task = BuiltinTask(TaskConfig(num_eval_prompts=12))
    torch.manual_seed(0)
    return build_model(ModelConfig(dim=32, depth=2, heads=2, max_seq_len=128), task.tokenizer.vocab_size), task


def test_sampling_is_deterministic_and_keeps_train_mode():
    policy, task = tiny_policy_and_task()
    policy.train()
    cfg = EvalConfig(num_prompts=6, max_new_tokens=6, samples_per_prompt=3, sample_prompts=4)
    first, _ = evaluate_policy(policy, task, task.tokenizer, cfg)
    torch.manual_seed(123)  # the global RNG plays no part
    second, _ = evaluate_policy(policy, task, task.tokenizer, cfg)
    assert policy.training
    assert first == second and "eval/pass@3" in first and "eval/best_of_3/sort" in first
    per_prompt = sample_scores(policy, task, task.tokenizer, task.eval_prompts()[:2], 3, 1.0, 6, 4, torch.Generator().manual_seed(0))
    assert len(per_prompt) == 2 and all(len(s) == 3 and all(0.0 <= x <= 1.0 for x in s) for s in per_prompt)
    with pytest.raises(ValueError):
        sample_scores(policy, task, task.tokenizer, ["sort: ab\n"], 2, 0.0, 6, 4)


def test_eval_config_checks_sampling_settings_before_training():
    base = {"order": ["sft"], "stages": {"sft": {"kind": "sft"}}}
    typed_run_config(OmegaConf.create(base))
    for bad in ({"samples_per_prompt": -1}, {"sample_prompts": -2}, {"sample_temperature": 0.0}):
        with pytest.raises(ConfigError, match="eval.sample"):
            typed_run_config(OmegaConf.create({**base, "eval": bad}))
    typed_run_config(OmegaConf.create({**base, "eval": {"samples_per_prompt": 0, "sample_temperature": 0.0}}))


# ------------------------------------------------------------------- the judge's calibration


def test_calibration_buckets():
    assert [calibration_bucket(s) for s in (0.0, 0.24, 0.25, 0.49, 0.5, 0.99, 1.0)] == [
        "0.00-0.25", "0.00-0.25", "0.25-0.50", "0.25-0.50", "0.50-1.00", "0.50-1.00", "1.00",
    ]
    assert calibration_bucket(1.5) is None and calibration_bucket(-0.1) is None


def test_evaluate_judge_calibration_and_agreement_per_family(monkeypatch):
    # candidates: verifier score and the judge's verdict ("??" does not parse)
    verifier = {"x": 1.0, "y": 0.3, "z": 0.1, "u": 1.0, "v": 0.6, "w": 0.0}
    verdict = {"x": "score: 5", "y": "score: 2", "z": "score: 3", "u": "score: 4", "v": "??", "w": "score: 0"}
    candidates = {"a: 1": ["x", "y", "z"], "b: 2": ["u", "v", "w"]}

    def fake_generate_text(policy, tokenizer, texts, sampling, batch_size, generator=None, progress=False):
        if "|" in texts[0]:  # judging: "<prompt>|<response>\n"
            return [verdict[t.split("|")[1].strip()] for t in texts]
        return [candidates[p][i % 3] for i, p in enumerate(texts)]

    monkeypatch.setattr(rlhf.judge, "generate_text", fake_generate_text)
    cfg = JudgeConfig(template="{prompt}|{response}\n", num_samples=1)
    metrics, rows = evaluate_judge(None, None, FamilyTask(verifier), list(candidates), 3, SamplingConfig(), cfg)
    assert [r["verifier"] for r in rows] == [1.0, 0.3, 0.1, 1.0, 0.6, 0.0]
    # existing metrics keep their names: pairs (x,y) (x,z) right, (y,z) reversed, (u,w) right; v unjudged
    assert metrics["eval/judge_agreement"] == pytest.approx(3 / 4) and metrics["eval/judge_pairs"] == 4.0
    assert metrics["eval/judge_parse_failure_rate"] == pytest.approx(1 / 6)
    assert metrics["eval/judge_agreement/a"] == pytest.approx(2 / 3) and metrics["eval/judge_agreement/b"] == 1.0
    assert metrics["eval/judge_score_exact"] == pytest.approx(4.5)  # x 5, u 4
    assert metrics["eval/judge_score_inexact"] == pytest.approx(5 / 3)  # y 2, z 3, w 0 (v unparsed)
    buckets = {k: v for k, v in metrics.items() if k.startswith("eval/judge_calibration/")}
    # z (0.1) 3 and w (0.0) 0; y (0.3) 2; v (0.6) has no parsed verdict: left out; exact 4.5
    assert buckets == pytest.approx({"eval/judge_calibration/0.00-0.25": 1.5, "eval/judge_calibration/0.25-0.50": 2.0, "eval/judge_calibration/1.00": 4.5})


# ------------------------------------------------------------------ `evaluate --samples/--judge`


def tiny_run(root):
    """A finished one-stage run made by hand (random tiny weights): what the CLI reads."""
    from rlhf.files import mark_complete, write_text
    from rlhf.models import ModelConfig, save_model_files, save_weights

    policy, task = tiny_policy_and_task()
    run = root / "run"
    cfg = {
        "order": ["sft", "dpo"],
        "stages": {"sft": {"kind": "sft"}, "dpo": {"kind": "self_reward_dpo", "judge": {"num_samples": 2, "max_new_tokens": 5}}},
        "task": {"num_eval_prompts": 12},
        "eval": {"num_prompts": 6, "max_new_tokens": 6, "batch_size": 64, "samples_per_prompt": 4, "sample_prompts": 5},
    }
    write_text(run / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)))
    stage = run / "stages" / "00_sft"
    save_weights(policy, stage / "policy.safetensors")
    save_model_files(stage, OmegaConf.structured(ModelConfig(dim=32, depth=2, heads=2, max_seq_len=128)), task.tokenizer)
    mark_complete(stage)
    return run, stage


def test_run_judge_config_takes_the_first_stage_with_a_judge(tmp_path):
    run, _ = tiny_run(tmp_path)
    cfg = OmegaConf.load(run / "config.yaml")
    assert run_judge_config(cfg) == JudgeConfig(num_samples=2, max_new_tokens=5)
    assert run_judge_config(OmegaConf.create({"order": ["sft"], "stages": {"sft": {"kind": "sft"}}})) == JudgeConfig()
    with pytest.raises(ConfigError, match="stages.dpo.judge"):
        run_judge_config(OmegaConf.create({"order": ["dpo"], "stages": {"dpo": {"judge": {"num_samples": 0}}}}))


def test_evaluate_command_samples_and_judges(tmp_path, capsys):
    from rlhf.cli import main

    _, stage = tiny_run(tmp_path)

    def evaluate(*extra):
        assert main(["evaluate", str(stage), *extra]) == 0
        return json.loads(capsys.readouterr().out)

    # defaults from the run's eval config: 4 samples on min(6 prompts, 5) prompts at temperature 1
    out = evaluate("--judge", "--judge-prompts", "3")
    assert (out["prompts"], out["samples"], out["sample_prompts"], out["temperature"]) == (6, 4, 5, 1.0)
    assert {"eval/pass@4", "eval/best_of_4", "eval/sample_exact", "eval/pass@4/sort"} <= set(out)
    assert 0.0 <= out["eval/sample_exact"] <= out["eval/pass@4"] <= 1.0 and 0.0 <= out["eval/best_of_4"] <= 1.0
    assert out["judge_prompts"] == 3 and 0.0 <= out["eval/judge_parse_failure_rate"] <= 1.0
    assert "eval/candidate_score" in out
    again = evaluate("--judge", "--judge-prompts", "3")
    assert again == out  # fixed seeds
    other = evaluate("--samples", "2", "--temperature", "0.5", "--sample-prompts", "6")
    assert (other["samples"], other["sample_prompts"], other["temperature"]) == (2, 6, 0.5)
    assert "eval/pass@2" in other and "judge_prompts" not in other
    assert other["eval/task_score"] == out["eval/task_score"]  # the greedy pass is untouched
    off = evaluate("--samples", "0")
    assert not any(k.startswith("eval/pass@") or k == "samples" for k in off)
    for bad in (["--sample-prompts", "7"], ["--samples", "-1"], ["--temperature", "0"], ["--judge-prompts", "2"]):
        with pytest.raises(SystemExit) as exc:
            main(["evaluate", str(stage), *bad])
        assert exc.value.code == 2
    assert "--sample-prompts 7" in capsys.readouterr().err


# ------------------------------------------------------------------------------- report


def test_report_shows_headroom_columns_and_plots_them(tmp_path):
    from rlhf.report import format_table, main, read_run

    run = tmp_path / "runA"
    stages = [
        ("sft", {"eval/task_score": 0.5, "eval/exact_match": 0.2, "eval/pass@8": 0.6, "eval/best_of_8": 0.8, "eval/sample_exact": 0.1}),
        ("dpo", {"eval/task_score": 0.6, "eval/exact_match": 0.3, "eval/pass@8": 0.7, "eval/best_of_8": 0.9, "eval/judge_agreement": 0.7,
                 "eval/judge_score_exact": 4.2, "eval/judge_score_inexact": 2.1, "eval/judge_calibration/1.00": 4.2}),
    ]
    for i, (slot, metrics) in enumerate(stages):
        d = run / "stages" / f"{i:02d}_{slot}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(f"kind: {slot}\n")
        (d / "metrics.json").write_text(json.dumps(metrics))
        (d / "COMPLETE").write_text("")
    lines = format_table([read_run(run)]).splitlines()
    assert lines[0].split() == ["stage", "kind", "task_score", "exact", "pass@8", "best_of_8", "sample_exact", "judge_agree", "judge_exact", "judge_inexact"]
    assert lines[3].split()[2:] == ["0.600", "0.300", "0.700", "0.900", "-", "0.700", "4.200", "2.100"]
    assert "eval/judge_calibration/1.00" in format_table([read_run(run)], all_keys=True)
    pytest.importorskip("matplotlib")
    assert main([str(run)]) == 0
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"
