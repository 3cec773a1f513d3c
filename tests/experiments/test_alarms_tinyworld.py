"""The alarm calibration (experiments/alarms_tinyworld.py): its design, the threshold choice and the lead on scripted
trajectories, and the driver end to end at a reduced size."""

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import alarms_tinyworld as A  # noqa: E402


def _trajectory(oracle, w2, diversity, **more):
    """Rows as eval_metrics.jsonl holds them, every 10 iterations from the base at 0."""
    return [{"iteration": 10 * i, "oracle_accuracy": o, "w2_divergence": w, "clip_diversity": d,
             **{k: v[i] for k, v in more.items()}} for i, (o, w, d) in enumerate(zip(oracle, w2, diversity))]


# healthy: W2 grows to 0.01, diversity falls by 10%; collapsing: W2 already 0.04 at iteration 10, the oracle drops by
# more than 0.02 at iteration 20, diversity falls by only 5% before that
HEALTHY = _trajectory([0.20, 0.21, 0.19, 0.20], [0.0, 0.004, 0.008, 0.01], [30.0, 29.0, 28.0, 27.0])
HEALTHY_2 = _trajectory([0.18, 0.18, 0.19, 0.175], [0.0, 0.005, 0.009, 0.009], [32.0, 31.0, 30.0, 29.5])
COLLAPSE = _trajectory([0.20, 0.19, 0.15, 0.08], [0.0, 0.04, 0.09, 0.2], [30.0, 28.5, 26.0, 20.0])
COLLAPSE_2 = _trajectory([0.20, 0.195, 0.19, 0.10], [0.0, 0.02, 0.06, 0.15], [30.0, 29.0, 29.0, 24.0])


def _tune(**runs):
    return {name: A.points(t) for name, t in runs.items()}


def test_damage_is_where_the_oracle_stays_more_than_the_margin_below_the_base():
    pts = A.points(COLLAPSE)
    assert A.damage_iteration(pts, 0.02) == 20  # 0.19 is only 0.01 below 0.20; 0.15 is 0.05 below
    assert A.damage_iteration(pts, 0.06) == 30
    assert A.damage_iteration(A.points(HEALTHY), 0.02) is None  # 0.19 at iteration 20 is exactly 0.01 below
    blip = A.points(_trajectory([0.20, 0.17, 0.20, 0.20, 0.16], [0.0] * 5, [30.0] * 5))
    assert A.damage_iteration(blip, 0.02, confirm=1) == 10
    # two in a row: the blip at 10 is not damage; the drop at the last evaluation is (nothing after it to confirm)
    assert A.damage_iteration(blip, 0.02, confirm=2) == 40
    assert A.damage_iteration(A.points(COLLAPSE), 0.02, confirm=2) == 20


def test_a_threshold_is_placed_between_the_healthy_extreme_and_the_least_a_collapse_reached_before_its_damage():
    tune = _tune(tune_main_s0=HEALTHY, tune_main_s1=HEALTHY_2, **{"tune_raft_lr1e-3_s0": COLLAPSE,
                                                                   "tune_dpo_b125_s0": COLLAPSE_2})
    rows = {(r["signal"], r["op"]): r for r in A.choose(tune, 0.02)}
    w2 = rows["w2_divergence", ">"]
    # healthy extreme 0.01; before damage RAFT reached 0.04 (iteration 10), DPO 0.06 (iterations 10, 20; damage at 30)
    assert w2["healthy_extreme"] == 0.01 and w2["collapsing_before_damage"] == {"tune_raft_lr1e-3_s0": 0.04,
                                                                                "tune_dpo_b125_s0": 0.06}
    assert w2["separable"] and w2["threshold"] == pytest.approx(math.sqrt(0.01 * 0.04))  # geometric, the nearer one
    assert w2["rule"] == "w2_divergence > 0.02"
    assert w2["warns_of"] == ["tune_dpo_b125_s0", "tune_raft_lr1e-3_s0"] and w2["misses"] == []
    div = rows["clip_diversity_rel_change", "<"]
    # healthy runs lose 10% (-3/30) and 7.8%; before damage RAFT lost 5%, DPO 3.3%: the healthy loss is larger
    assert div["healthy_extreme"] == pytest.approx(-0.1) and not div["separable"] and div["rule"] is None
    assert div["warns_of"] == [] and div["misses"] == ["tune_dpo_b125_s0", "tune_raft_lr1e-3_s0"]
    assert rows["colour_entropy_rel_change", "<"]["healthy_extreme"] is None  # not recorded: not a candidate


def test_a_falling_signal_separates_downwards_and_a_collapse_too_fast_for_the_interval_constrains_nothing():
    # colour entropy: healthy runs lose at most 5%, RAFT 30% before its damage at 20; a third run is damaged at
    # its first evaluation (10), before any alarm could fire, and is set aside rather than making every rule fail
    healthy = _trajectory([0.2] * 4, [0.0, 0.01, 0.01, 0.01], [30.0] * 4, colour_entropy=[4.0, 3.9, 3.8, 3.9])
    raft = _trajectory([0.2, 0.2, 0.1, 0.05], [0.0, 0.01, 0.01, 0.01], [30.0] * 4, colour_entropy=[4.0, 2.8, 2.0, 1.0])
    fast = _trajectory([0.2, 0.1, 0.05, 0.05], [0.0, 0.01, 0.01, 0.01], [30.0] * 4, colour_entropy=[4.0, 4.0, 4.0, 4.0])
    tune = _tune(tune_main_s0=healthy, **{"tune_raft_lr1e-3_s0": raft, "tune_dpo_b125_s0": fast})
    rows = {(r["signal"], r["op"]): r for r in A.choose(tune, 0.02, confirm=2)}
    ce = rows["colour_entropy_rel_change", "<"]
    assert ce["too_fast"] == ["tune_dpo_b125_s0"] and ce["collapsing_before_damage"] == {
        "tune_raft_lr1e-3_s0": pytest.approx(-0.3)}
    assert ce["separable"] and ce["threshold"] == pytest.approx((-0.05 - 0.3) / 2)
    assert ce["rule"] == "colour_entropy_rel_change < -0.175"
    assert not rows["colour_entropy_rel_change", ">"]["separable"]  # nobody rose


def test_a_slow_collapse_no_signal_sees_is_listed_and_does_not_veto_the_rule_that_warns_of_the_others():
    # a slow run loses oracle accuracy at iteration 20 while its W2 (0.005) is still inside the healthy range (0.01)
    slow = _trajectory([0.20, 0.19, 0.17, 0.15], [0.0, 0.003, 0.005, 0.02], [30.0] * 4)
    tune = _tune(tune_main_s0=HEALTHY, **{"tune_raft_lr1e-3_s0": COLLAPSE, "tune_raft_lr1e-4_s0": slow})
    w2 = {(r["signal"], r["op"]): r for r in A.choose(tune, 0.02)}["w2_divergence", ">"]
    assert w2["collapsing_before_damage"] == {"tune_raft_lr1e-3_s0": 0.04, "tune_raft_lr1e-4_s0": 0.003}
    # the threshold sits between the healthy 0.01 and the collapse it warns of (0.04), not below the healthy range
    assert w2["rule"] == "w2_divergence > 0.02" and w2["warns_of"] == ["tune_raft_lr1e-3_s0"]
    assert w2["misses"] == ["tune_raft_lr1e-4_s0"]
    results = A.evaluate_rules([w2["rule"]], tune, 0.02)
    assert results["tune_raft_lr1e-4_s0"]["first"] is None and results["tune_raft_lr1e-4_s0"]["damage"] == 20
    assert results["tune_raft_lr1e-3_s0"]["judge_change_at_first"] == pytest.approx(-0.01)  # fired at 10: 0.19


def test_a_threshold_rounded_onto_the_healthy_side_is_written_in_full():
    healthy = _trajectory([0.2, 0.2], [0.0, 0.01234], [30.0, 30.0])
    raft = _trajectory([0.2, 0.2, 0.1], [0.0, 0.01236, 0.02], [30.0] * 3)
    rows = {(r["signal"], r["op"]): r for r in A.choose(_tune(tune_main_s0=healthy, **{"tune_raft_lr1e-3_s0": raft}),
                                                        0.02)}
    w2 = rows["w2_divergence", ">"]
    # the midpoint 0.012349... to 3 digits is 0.0123, below the healthy 0.01234: it would fire in the healthy run
    assert w2["separable"] and w2["rule"] == f"w2_divergence > {math.sqrt(0.01234 * 0.01236)!r}"
    assert A.qualifies(w2["rule"], _tune(tune_main_s0=healthy, **{"tune_raft_lr1e-3_s0": raft}), 0.02, 1)
    assert not A.qualifies("w2_divergence > 0.0123", _tune(tune_main_s0=healthy), 0.02, 1)


def test_the_lead_is_iterations_from_the_first_firing_to_the_damage_and_a_healthy_firing_is_a_false_alarm():
    runs = {"heldout_raft_lr1e-3_s3": A.points(COLLAPSE), "heldout_main_s3": A.points(HEALTHY),
            "heldout_dpo_b125_s3": A.points(COLLAPSE_2), "heldout_main_s4": A.points(HEALTHY_2)}
    results = A.evaluate_rules(["w2_divergence > 0.05", "clip_diversity_rel_change < -0.09"], runs, 0.02)
    raft = results["heldout_raft_lr1e-3_s3"]
    # W2 crosses 0.05 at 20 (0.09), diversity at 20 (-13%); the damage is at 20: no lead
    assert raft["fires"] == {"w2_divergence > 0.05": 20, "clip_diversity_rel_change < -0.09": 20}
    assert raft["damage"] == 20 and raft["lead"] == 0
    dpo = results["heldout_dpo_b125_s3"]
    assert dpo["first"] == 20 and dpo["damage"] == 30 and dpo["lead"] == 10
    healthy = results["heldout_main_s3"]
    assert healthy["fires"]["clip_diversity_rel_change < -0.09"] == 30 and healthy["damage"] is None  # a false alarm
    table = "\n".join(A.runs_table(results, list(raft["fires"])))
    assert "| heldout_main_s3 | no | – | – | 30 | false alarm | 0 |" in table  # 0.20 at 30, as the base
    assert "| heldout_raft_lr1e-3_s3 | yes | 20 | 20 | 20 | missed | -0.05 |" in table
    assert "| heldout_dpo_b125_s3 | yes | 30 | 20 | 30 | 10 | -0.01 |" in table
    v = A.verdict(results)
    assert v["healthy_runs"] == 2 and v["false_alarms"] == ["heldout_main_s3"] and v["healthy_marked_damaged"] == []
    assert v["leads"] == {"heldout_raft_lr1e-3_s3": None, "heldout_dpo_b125_s3": 10}


def test_keep_best_compares_final_and_best_for_tune_runs_only():
    traj = _trajectory([0.20, 0.22, 0.24, 0.10], [0.0] * 4, [30.0] * 4)
    result = lambda final, best: {"metrics": {"oracle_accuracy": final}, "budgets": {"best": {  # noqa: E731
        "oracle_accuracy": best}}, "trajectory": traj}
    lines = A.keep_best_table({"tune_raft_lr1e-3_s0": result(0.06, 0.17), "heldout_raft_lr1e-3_s3": result(0.05, 0.2)})
    assert lines[2:] == ["| tune_raft_lr1e-3_s0 | 20 | 0.060 | 0.170 | +0.110 |"]  # best/ is iteration 20's (0.24)


def test_the_default_design_monitors_each_group_on_its_own_split_and_keeps_best():
    args = argparse.Namespace(configs=list(A.CONFIGS), tune_seeds=[0, 1, 2], heldout_seeds=[3, 4, 5], collapse_seeds=2,
                              every=10, monitor_prompts=64)
    base = A.parse_args(["--config", "configs/tiny.yaml"])
    tasks = A.plan(args, base)
    assert len(tasks) == 2 * (3 + 2 + 2 + 2)
    assert {n for n in tasks if n.startswith("heldout_dpo")} == {"heldout_dpo_b125_s3", "heldout_dpo_b125_s4"}
    assert tasks["heldout_raft_lr1e-4_s4"].overrides["learning_rate"] == 1e-4
    tune, held = tasks["tune_raft_lr1e-3_s1"].overrides, tasks["heldout_main_s5"].overrides
    assert tune["eval_prompts"] == "prompts/tinyworld_tune.txt" and held["eval_prompts"] == "prompts/tinyworld_heldout.txt"
    assert tune["learning_rate"] == 1e-3 and tune["method"] == "raft" and "method" not in held
    assert tasks["heldout_dpo_b125_s3"].overrides["inner_epochs"] == base.inner_epochs * base.samples_per_prompt // 2
    assert all(t.budgets == ("best",) and t.overrides["keep_best"] == "oracle_accuracy" and t.overrides["alarms"] == []
               and t.overrides["eval_every"] == 10 and t.overrides["eval_num_prompts"] == 64 for t in tasks.values())


def test_alarm_driver_at_reduced_size_evaluates_best_and_final_and_resumes_from_its_record(tmp_path):
    out = tmp_path / "alarms"
    args = [sys.executable, str(ROOT / "experiments/alarms_tinyworld.py"), "--tune_seeds", "0", "--heldout_seeds", "1",
            "--configs", "main", "raft_lr1e-3", "--collapse_seeds", "1", "--every", "1", "--monitor_prompts", "4",
            "--eval_num_prompts", "4", "--alarm_window", "1",
            "--images_per_prompt", "2", "--jobs", "2", "--threads", "1", "--out", str(out), "--",
            "--num_iterations", "2", "--prompts_per_iteration", "2", "--samples_per_prompt", "2",
            "--train_batch_size", "2", "--num_inference_steps", "2", "--eval_images_per_prompt", "2"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    tasks = json.loads((out / "tasks.json").read_text())
    assert set(tasks) == {f"{g}_{c}_s{s}" for g, s in (("tune", 0), ("heldout", 1)) for c in ("main", "raft_lr1e-3")}
    records = json.loads((out / "run_records.json").read_text())
    for name, record in records.items():
        # final/ and best/ (exported by keep_best at the first monitored iteration) each evaluated on held-out prompts
        assert f"run={out / 'runs' / name / 'best'}" in record["budget_evals"]["best"]["command"]
        assert f"run={out / 'runs' / name / 'final'}" in record["eval"]["command"]
        assert "oracle_accuracy" in tasks[name]["budgets"]["best"]
        # the monitor ran at iterations 0, 1, 2 on the group's own split
        assert [r["iteration"] for r in tasks[name]["trajectory"]] == [0, 1, 2]
        assert record["settings"]["eval_prompts"] == A.SPLITS[name.split("_")[0]]
        assert "colour_entropy" in tasks[name]["trajectory"][0]
    report = json.loads((out / "alarms.json").read_text())
    # every candidate watches a signal the monitor really reports (a misspelt one would never separate)
    # (the training statistics too: a window of 1 has changes from the second iteration on)
    assert [r["iteration"] for r in tasks["tune_main_s0"]["training"]] == [0, 1]
    pts = A.points(tasks["tune_main_s0"]["trajectory"], tasks["tune_main_s0"]["training"], window=1)
    seen = {**A.evaluations(pts)[1], **[p for p in pts if p.get("train")][-1]}
    assert all(signal in seen for signal, _ in A.CANDIDATES), [s for s, _ in A.CANDIDATES if s not in seen]
    assert report["verdict"]["heldout"]["healthy_runs"] == 1
    assert set(report["runs"]["heldout"]) == {n for n in tasks if n.startswith("heldout_")}
    assert "## keep-best" in (out / "README.md").read_text() and (out / "monitor.png").is_file()
    # a fresh clone (no runs/, eval/, logs/) reuses every finished run from the record
    for d in ("runs", "eval", "logs"):
        (out / d).rename(tmp_path / d)
    check = subprocess.run([*args[:2], "--check", *args[2:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and "all 4 run(s)" in check.stdout, check.stderr[-2000:]
    written = (out / "alarms.json").read_text()
    (out / "alarms.json").unlink()  # --report chooses and reports again from the record alone
    report = subprocess.run([*args[:2], "--report", *args[2:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0 and (out / "alarms.json").read_text() == written, report.stderr[-2000:]


def test_a_training_statistic_can_warn_of_a_collapse_damaged_at_the_first_evaluation():
    """RAFT at lr 1e-3 is damaged by iteration 10, the first evaluation: no evaluation rule can warn of it, but a
    train_ rule is checked after every iteration; its points sit at the iteration after their row's update."""
    def training(stds):
        return [{"iteration": i, "reward_group_std": s, "w2": 0.001, "reward_mean": 70.0, "grad_norm": 1.0}
                for i, s in enumerate(stds)]

    healthy = _trajectory([0.2, 0.2, 0.2], [0.0, 0.01, 0.01], [30.0] * 3)
    fast = _trajectory([0.2, 0.1, 0.05], [0.0, 0.01, 0.01], [30.0] * 3)
    # window 2: the group std's change from its first two iterations, from iteration 4 on
    tune = {"tune_main_s0": A.points(healthy, training([4.0] * 20), window=2),
            "tune_raft_lr1e-3_s0": A.points(fast, training([4.0, 4.0, 3.0, 2.0, 1.5, 1.0] + [0.5] * 14), window=2)}
    assert [p["iteration"] for p in A.evaluations(tune["tune_main_s0"])] == [0, 10, 20]
    first_train = next(p for p in tune["tune_main_s0"] if p.get("train"))
    assert first_train["iteration"] == 1 and first_train["train_reward_group_std"] == 4.0
    rows = {(r["signal"], r["op"]): r for r in A.choose(tune, 0.02)}
    assert rows["clip_diversity_rel_change", "<"]["too_fast"] == ["tune_raft_lr1e-3_s0"]
    std = rows["train_reward_group_std_rel_change", "<"]
    assert std["too_fast"] == [] and std["separable"]
    # healthy change 0; RAFT's least extreme before iteration 10 is its lowest over iterations 4-9: (0.5+0.5)/2 vs 4
    assert std["collapsing_before_damage"] == {"tune_raft_lr1e-3_s0": pytest.approx(0.5 / 4 - 1)}
    assert std["rule"] == f"train_reward_group_std_rel_change < {(0 + 0.5 / 4 - 1) / 2:.3g}"
    results = A.evaluate_rules([std["rule"]], tune, 0.02)
    # rows 2-3 (3, 2) are 2.5, -37.5%; rows 3-4 (2, 1.5) are 1.75, -56% (beyond -44%): it acts after row 4, at 5
    raft = results["tune_raft_lr1e-3_s0"]
    assert raft["first"] == 5 and raft["damage"] == 10 and raft["lead"] == 5
    assert raft["judge_change_at_first"] == 0.0  # the base's evaluation is the last one before it
    assert results["tune_main_s0"]["first"] is None


def test_replay_reads_run_directories_and_reports_damage_firings_and_lead(tmp_path, capsys):
    """--replay: the rules on a training output directory's own rows (a record's run trained again outside the driver,
    e.g. with a larger monitor); a directory without eval_metrics.jsonl is refused with exit 2."""
    run = tmp_path / "slow_raft"
    run.mkdir()
    # W2 per update 0.001 for 20 iterations, then 0.01: a 3-iteration mean beyond 0.005 after row 21, at 22
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"iteration": i, "w2": 0.001 if i < 20 else 0.01, "reward_group_std": 4.0, "reward_mean": 70.0,
                    "grad_norm": 1.0}) + "\n" for i in range(40)))
    # the oracle is 0.03 below the base from 30 on: damage at 30 (two evaluations in a row)
    (run / "eval_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _trajectory(
        [0.20, 0.20, 0.19, 0.17, 0.16], [0.0, 0.001, 0.002, 0.003, 0.004], [30.0] * 5)))
    A.main(["--replay", str(run), "--rules", "train_w2 > 0.005", "w2_divergence > 0.0035"])
    table = capsys.readouterr().out
    assert "| slow_raft | 30 | 22 | 40 | 8 | -0.04 |" in table
    with pytest.raises(SystemExit) as e:
        A.main(["--replay", str(tmp_path), "--rules", "train_w2 > 0.005"])
    assert e.value.code == 2 and "no eval_metrics.jsonl" in capsys.readouterr().err


def test_choose_on_retrained_tune_directories_then_replays_the_chosen_rules_with_the_verdict(tmp_path, capsys):
    """--choose_on: the choice made on tune runs trained again outside the driver (a directory's name ends with its
    task name), the chosen rules replayed on held-out directories with the false alarms and leads."""
    def run(name, trajectory):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trajectory))
        return str(tmp_path / name)

    tune = [run("lownoise_tune_main_s0", HEALTHY), run("lownoise_tune_raft_lr1e-3_s0", COLLAPSE)]
    heldout = [run("lownoise_heldout_main_s4", HEALTHY_2), run("lownoise_heldout_dpo_b125_s3", COLLAPSE_2)]
    A.main(["--replay", *heldout, "--choose_on", *tune])
    out = capsys.readouterr().out
    # healthy W2 at most 0.01; the collapse reached 0.04 at 10, before its damage at 20 (0.15 and 0.08, two in a
    # row): the geometric midpoint 0.02. Diversity fell less in the collapse (-5%) than in the healthy run (-10%)
    assert "**`w2_divergence > 0.02`**" in out and "`clip_diversity_rel_change` | < | -0.1 | -0.05 | none" in out
    # held out: the DPO-like run's W2 passes 0.02 at 20 (0.06), its oracle is 0.1 down at 30 (the damage, the
    # lowest); the healthy run's W2 stays <= 0.009
    assert "| lownoise_heldout_dpo_b125_s3 | 30 | 20 | 10 | -0.1 |" in out
    assert "- False alarms: 0 of 1 healthy runs." in out and "heldout_dpo_b125_s3: 10 iterations" in out
    with pytest.raises(SystemExit) as e:
        A.main(["--replay", *heldout, "--choose_on", *heldout])
    assert e.value.code == 2 and "tune-group directories" in capsys.readouterr().err
