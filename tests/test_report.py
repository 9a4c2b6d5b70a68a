"""`python -m rlhf report`: the table (one run, several side by side) and the plot."""

import json

import pytest

from rlhf.errors import RLHFError
from rlhf.report import format_table, main, read_run


def make_run(root, name, stages):
    run = root / name
    for i, (slot, kind, metrics, complete) in enumerate(stages):
        d = run / "stages" / f"{i:02d}_{slot}"
        d.mkdir(parents=True)
        (d / "config.yaml").write_text(f"kind: {kind}\n")
        if complete:
            (d / "metrics.json").write_text(json.dumps(metrics))
            (d / "COMPLETE").write_text("")
    return run


def standard(root, name="runA", score=0.5):
    return make_run(
        root,
        name,
        [
            ("sft", "sft", {"eval/task_score": score, "eval/response_length": 9.0}, True),
            ("dpo_iter1", "self_reward_dpo", {"eval/task_score": score + 0.1, "eval/judge_agreement": 0.7, "start/judge_agreement": 0.6, "eval/kl": 1.5, "pairs_total": 120.0}, True),
            ("dpo_iter2", "self_reward_dpo", {}, False),
        ],
    )


def test_table_one_run(tmp_path):
    run = read_run(standard(tmp_path))
    assert [s.slot for s in run.stages] == ["sft", "dpo_iter1", "dpo_iter2"]
    table = format_table([run])
    lines = table.splitlines()
    assert lines[0].split() == ["stage", "kind", "task_score", "judge_agree", "length", "kl", "pairs"]
    assert lines[2].split() == ["sft", "sft", "0.500", "0.600*", "9.000", "-", "-"]
    assert lines[3].split() == ["dpo_iter1", "self_reward_dpo", "0.600", "0.700", "-", "1.500", "120"]
    assert "(not complete)" in lines[4]
    assert lines[-1].startswith("* measured by the next stage")


def test_table_runs_side_by_side(tmp_path):
    a = read_run(standard(tmp_path, "runA", 0.5))
    b = read_run(standard(tmp_path, "runB", 0.3))
    lines = format_table([a, b]).splitlines()
    assert lines[0].split()[:3] == ["stage", "kind", "run"]
    assert lines[2].split()[:4] == ["sft", "sft", "runA", "0.500"]
    assert lines[3].split()[:2] == ["runB", "0.300"]  # same stage: slot and kind not repeated
    assert "--all" not in format_table([a], all_keys=True) and "start/judge_agreement" in format_table([a], all_keys=True)


def test_main_writes_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a, b = standard(tmp_path, "runA"), standard(tmp_path, "runB", 0.2)
    assert main([str(a)]) == 0
    assert (a / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "cmp.png"
    assert main([str(a), str(b), "--plot", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "runB" in capsys.readouterr().out
    assert main([str(a), "--no-plot"]) == 0


def test_reward_vs_verifier_is_read_and_plotted(tmp_path):
    pytest.importorskip("matplotlib")
    run = make_run(tmp_path, "ppo_run", [("sft", "sft", {"eval/task_score": 0.4}, True), ("ppo", "ppo", {"eval/task_score": 0.3}, True)])
    rows = [
        {"rollout": 0, "rollout/reward_mean": 0.1, "rollout/verifier_score": 0.40},
        {"rollout": 1, "rollout/reward_mean": 0.5},  # no verifier score: left out
        {"rollout": 2, "rollout/reward_mean": 0.9, "rollout/verifier_score": 0.30},  # hacking: reward up, verifier down
    ]
    (run / "stages" / "01_ppo" / "rollout_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sft, ppo = read_run(run).stages
    assert sft.reward_vs_verifier == [] and ppo.reward_vs_verifier == [(0, 0.1, 0.40), (2, 0.9, 0.30)]
    out, plain = tmp_path / "hacking.png", tmp_path / "plain.png"
    assert main([str(run), "--plot", str(out)]) == 0
    (run / "stages" / "01_ppo" / "rollout_metrics.jsonl").unlink()
    assert main([str(run), "--plot", str(plain)]) == 0
    width = lambda png: int.from_bytes(png.read_bytes()[16:20], "big")  # noqa: E731  (the PNG header's width)
    assert out.read_bytes()[:4] == b"\x89PNG" and width(out) > width(plain)  # one panel more


def test_not_a_run_dir(tmp_path):
    with pytest.raises(RLHFError, match="not a run dir"):
        main([str(tmp_path)])
    (tmp_path / "stages").mkdir()
    with pytest.raises(RLHFError, match="no stages"):
        main([str(tmp_path)])


def test_cli_dispatch(cli, tmp_path):
    run = standard(tmp_path)
    proc = cli("report", str(run), "--no-plot")
    assert "dpo_iter1" in proc.stdout


def test_a_sweeps_runs_are_named_by_what_was_swept_and_show_training_metrics(tmp_path):
    # `-m stages.dpo.beta=0.1,0.5 name=sweep`: dirs 0 and 1, the same name, one setting apart
    runs = []
    for i, (beta, margin) in enumerate([(0.1, 0.61), (0.5, 2.76)]):
        run = make_run(tmp_path, str(i), [("dpo", "dpo", {"eval/task_score": 0.5, "train/rewards/margin": margin}, True)])
        (run / "config.yaml").write_text(f"name: sweep\nseed: 0\ntrainer:\n  num_threads: {i + 1}\nstages:\n  dpo:\n    beta: {beta}\n")
        runs.append(read_run(run))
    lines = format_table(runs).splitlines()
    assert lines[0].split() == ["stage", "kind", "run", "task_score", "margin"]
    assert lines[2].split() == ["dpo", "dpo", "dpo.beta=0.1", "0.500", "0.610"]
    assert lines[3].split() == ["dpo.beta=0.5", "0.500", "2.760"]  # threads differ too, but are not what was swept
