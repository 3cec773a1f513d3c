"""The frontier experiment (experiments/frontier_tinyworld.py): its evaluation set, its budgets, its analysis on
constructed results, and the driver end to end at a reduced size."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import frontier_tinyworld as F  # noqa: E402


def test_balanced_prompts_take_at_most_n_of_each_category_seeded_in_file_order(tmp_path):
    colour = ["a red circle", "an outlined blue square"]
    position = [f"a {c} circle to the left of a green square" for c in ("red", "blue", "yellow", "purple")]
    position.append("an orange circle to the left of a green square")
    counting = ["two red circles", "three blue squares", "four green triangles"]
    lines = [colour[0], *position[:3], counting[0], colour[1], *position[3:], *counting[1:]]
    path = tmp_path / "p.txt"
    path.write_text("\n".join(lines) + "\n\n")
    picked = F.balanced_prompts(str(path), 2)
    assert set(colour) <= set(picked)  # a category with fewer prompts than asked for: all of them
    assert len(set(picked) & set(position)) == 2 and len(set(picked) & set(counting)) == 2 and len(picked) == 6
    assert picked == [p for p in lines if p in picked]  # the file's order
    assert F.balanced_prompts(str(path), 2) == picked  # seeded
    assert F.balanced_prompts(str(path), 2, seed=1) != picked or F.balanced_prompts(str(path), 2, seed=2) != picked


def test_budgets_keep_a_checkpoint_at_every_earlier_budget():
    assert F.budget_overrides([60, 120, 240]) == {"checkpoint_every": 60, "checkpoints_total_limit": 3}
    assert F.budget_overrides([100, 300]) == {"checkpoint_every": 100, "checkpoints_total_limit": 2}
    assert F.budget_overrides([1, 2]) == {"checkpoint_every": 1, "checkpoints_total_limit": 1}


def _result(clip_score, w2=None, diversity=30.0, oracle=0.2):
    metrics = {"clip_score": clip_score, "clip_diversity": diversity, "oracle_accuracy": oracle}
    if w2 is not None:
        metrics["w2_divergence"] = w2
    return {"metrics": metrics, "budgets": {"1": dict(metrics)}}


def test_paired_differences_are_against_the_base_at_the_same_seed():
    point = {"tasks": ["adrpo_b1_s0", "adrpo_b1_s1"]}
    done = {"base_s0": _result(60.0), "base_s1": _result(70.0),
            "adrpo_b1_s0": _result(61.0, 1e-3), "adrpo_b1_s1": _result(72.0, 3e-3)}
    assert F.paired(done, point, 2, 2, "clip_score").tolist() == [1.0, 2.0]
    assert F.paired(done, point, 2, 2, "w2_divergence").tolist() == [1e-3, 3e-3]  # the run's own (the base's is 0)
    del done["base_s1"]
    assert F.paired(done, point, 2, 2, "clip_score") is None  # a seed without its base is not reported half-paired
    # ... except in the table of a run in progress, which pairs the seeds that are done and says how many
    assert F.paired(done, point, 2, 2, "clip_score", partial=True).tolist() == [1.0]
    rows = F.frontier_table(done, {"adrpo_b1": point}, [2])
    assert rows[0].endswith("| Seeds |") and rows[2] == "| adrpo_b1 | 2 | +1.00 | +0.00 | 1.00e-03 | +0.0 | 1 of 2 |"
    done.pop("adrpo_b1_s0")
    assert F.paired(done, point, 2, 2, "clip_score", partial=True) is None


def test_matched_comparison_reads_both_frontiers_at_the_same_divergence_not_the_same_strength():
    """ADRPO's frontier lies exactly 1 ClipScore point above fixed beta's at every W2 (both linear in log10 W2), but
    the two reach different W2 at the same strength: at matched strength the difference would be anything but 1."""
    strengths, seeds = [0.5, 1.0, 2.0], [0, 1]
    done = {f"base_s{s}": _result(60.0 + s) for s in seeds}
    points = {}
    for method, offset, w2s in (("adrpo", 1.0, [1e-2, 1e-3, 1e-4]), ("fixed_beta", 0.0, [3e-2, 2e-3, 5e-4])):
        for b, w2 in zip(strengths, w2s):
            name = F.point_name(method, b)
            points[name] = {"method": method, "strength": b, "clip": 1.0, "fixed_clip": None, "perturbed": False,
                            "tasks": [f"{name}_s{s}" for s in seeds]}
            for s in seeds:
                gain = 10 + 2 * np.log10(w2) + offset + 0.1 * s  # + a seed effect shared by both methods
                done[f"{name}_s{s}"] = _result(60.0 + s + gain, w2 * (1 + 0.01 * s))
    lines, longest = F.matched_comparison(done, points, [1, 2], strengths, 1.0)
    # the fixed-clip arm is read from its own points: none here, so it says so rather than reading the +-beta ones
    assert "has no full strength grid" in F.matched_comparison(done, points, [1, 2], strengths, None, fixed_clip=1.0)[0][0]
    rows = [line for line in lines[2:] if line.startswith("| 2 |")]
    assert len(rows) == 4 and all(row.split("|")[3].strip().startswith("+1.00 [+1.00, +1.00]") for row in rows)
    assert np.allclose(longest["clip_score"], 1.0)
    # at matched *strength* the differences are not 1: the comparison above is not a strength-by-strength one
    at_strength = [done[f"{F.point_name('adrpo', b)}_s0"]["metrics"]["clip_score"]
                   - done[f"{F.point_name('fixed_beta', b)}_s0"]["metrics"]["clip_score"] for b in strengths]
    assert not np.allclose(at_strength, 1.0)
    # a run in progress: seed 1 of one point is missing, so the comparison is over seed 0 alone, and says so
    del done[f"{F.point_name('fixed_beta', 2.0)}_s1"]
    lines, longest = F.matched_comparison(done, points, [1, 2], strengths, 1.0)
    assert lines[0].startswith("**Partial**: over seed(s) 0 of 0, 1") and longest["clip_score"].shape[0] == 1
    assert np.allclose(longest["clip_score"], 1.0)
    for s in seeds:
        del done[f"{F.point_name('adrpo', 0.5)}_s{s}"]
    assert F.matched_comparison(done, points, [1, 2], strengths, 1.0) == (["Not every run of one seed is done yet."],
                                                                          None)


def test_the_default_design_trains_every_method_over_its_strength_at_equal_compute(monkeypatch, tmp_path):
    """The planned runs of the default command: names, the strength knob and clip of each, the noise-floor twin, the
    tuned settings kept but the strength, DPO's equal-compute epochs, and checkpoints at the earlier budgets."""
    from sd3_adrpo.config import parse_args

    captured = {}
    monkeypatch.setattr(F, "report_check", lambda problems, n, out: captured.update(n=n))
    real_plan = F.plan
    monkeypatch.setattr(F, "plan", lambda args, cfg: captured.setdefault("plan", real_plan(args, cfg)))
    F.main(["--check", "--out", str(tmp_path / "frontier")])
    tasks, points = captured["plan"]
    base = parse_args(["--config", str(ROOT / "configs/tiny.yaml")])
    # base, the clip +-beta grids, twin, ORW, DPO, poster, the fixed-clip grids less beta 1 (the clip +-beta runs),
    # the fixed-clip arm's twin
    assert len(tasks) == captured["n"] == 3 * (1 + 2 * 5 + 1 + 4 + 3 + 2 * 2 + 2 * 4 + 1)
    fixed = tasks["fixed_beta_b0.125_fixclip1_s2"].overrides  # the clip stays +-1 while the strength shrinks
    assert fixed["beta0"] == 0.125 and fixed["adv_clip_min"] == -1.0 and fixed["adv_clip_max"] == 1.0
    assert tasks["adrpo_b4_fixclip1_s0"].overrides["adv_clip_max"] == 1.0
    assert points["adrpo_b1_fixclip1"]["tasks"] == points["adrpo_b1"]["tasks"] == [f"adrpo_b1_s{s}" for s in range(3)]
    assert "adrpo_b1_fixclip1_s0" not in tasks and points["adrpo_b1_fixclip1"]["fixed_clip"] == 1.0
    adrpo = tasks["adrpo_b0.125_s1"].overrides
    assert adrpo["beta0"] == 0.125 and adrpo["adv_clip_min"] == -0.125 and adrpo["adv_clip_max"] == 0.125
    assert adrpo["checkpoint_every"] == 60 and adrpo["checkpoints_total_limit"] == 3 and adrpo["seed"] == 1
    assert tasks["adrpo_b0.125_s1"].budgets == (60, 120)
    poster = tasks["fixed_beta_b0.25_clip2_s0"].overrides
    assert poster["method"] == "fixed_beta" and poster["adv_clip_max"] == 0.5
    assert tasks["adrpo_b0.5_perturbed_s0"].overrides["learning_rate"] == pytest.approx(base.learning_rate * 1.0001)
    twin = tasks["adrpo_b0.25_fixclip1_perturbed_s2"].overrides  # the fixed-clip arm's twin keeps that arm's clip
    assert twin["learning_rate"] == pytest.approx(base.learning_rate * 1.0001) and twin["adv_clip_max"] == 1.0
    assert twin["beta0"] == 0.25 and points["adrpo_b0.25_fixclip1_perturbed"]["fixed_clip"] == 1.0
    orw = tasks["orw_cfm_w2_a0_s2"].overrides
    assert orw["orw_alpha"] == 0.0 and orw["orw_tau"] == 0.5  # the tuned tau kept, the tuned alpha is the axis
    dpo = tasks["dpo_b125_s0"].overrides
    assert dpo["dpo_beta"] == 125.0 and dpo["inner_epochs"] == base.inner_epochs * base.samples_per_prompt // 2
    assert [points[n]["strength"] for n in points if points[n]["method"] == "fixed_beta" and points[n]["clip"] == 1
                                                and points[n]["fixed_clip"] is None] \
        == [0.125, 0.25, 0.5, 1.0, 4.0]


def test_frontier_driver_at_reduced_size_evaluates_each_budget_and_resumes_from_its_record(tmp_path):
    out = tmp_path / "frontier"
    args = [sys.executable, str(ROOT / "experiments/frontier_tinyworld.py"), "--seeds", "0", "--strengths", "0.5",
            "--poster_strengths", "--orw_alphas", "--dpo_betas", "--perturb", "none", "--fixed_clip_perturb", "none",
            "--budgets", "1", "2",
            "--fixed_clip", "0.5", "--fixed_clip_strengths", "0.5",  # the fixed-clip arm: the same runs, listed twice
            "--per_category", "1", "--images_per_prompt", "2", "--jobs", "2", "--threads", "1", "--out", str(out),
            "--", "--prompts_per_iteration", "2", "--samples_per_prompt", "2", "--train_batch_size", "2",
            "--num_inference_steps", "2"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    tasks = json.loads((out / "tasks.json").read_text())
    assert set(tasks) == {"base_s0", "adrpo_b0.5_s0", "fixed_beta_b0.5_s0"}
    records = json.loads((out / "run_records.json").read_text())
    # each trained run is evaluated at iteration 1 from its checkpoint's LoRA and at 2 from final/
    for name, record in records.items():
        if name == "base_s0":
            assert "budget_evals" not in record and "budgets" not in tasks[name]
            continue
        assert f"run={out / 'runs' / name / 'checkpoints' / 'checkpoint-000001'}" in record["budget_evals"]["1"]["command"]
        assert f"run={out / 'runs' / name / 'final'}" in record["eval"]["command"]
        assert set(tasks[name]["budgets"]) == {"1"} and "w2_divergence" in tasks[name]["budgets"]["1"]
        settings = record["settings"]
        assert settings["num_iterations"] == 2 and settings["checkpoint_every"] == 1
        assert settings["adv_clip_max"] == settings["beta0"] == -settings["adv_clip_min"] == 0.5
        # the recorded trajectory is the run's, cut to the iteration and the four headline metrics
        rows = [json.loads(line) for line in (out / "runs" / name / "eval_metrics.jsonl").read_text().splitlines()]
        assert len(rows[0]) > 10 and tasks[name]["trajectory"] == [
            {k: r[k] for k in ("iteration", "clip_score", "clip_diversity", "w2_divergence", "oracle_accuracy")}
            for r in sorted(rows, key=lambda r: r["iteration"])]
    # the same balanced prompts for every evaluation: one per category of the held-out file
    balanced = (out / "heldout_balanced.txt").read_text().splitlines()
    assert len(balanced) == 4 and all(str(out / "heldout_balanced.txt") in r["eval"]["command"] for r in records.values())
    # the report: every point at each budget, paired with the base at its seed
    table = (out / "frontier.md").read_text()
    base = tasks["base_s0"]["metrics"]["clip_score"]
    gain = tasks["fixed_beta_b0.5_s0"]["budgets"]["1"]["clip_score"] - base
    assert f"| fixed_beta_b0.5 | 1 | {gain:+.2f} |" in table
    assert f"| fixed_beta_b0.5_fixclip0.5 | 1 | {gain:+.2f} |" in table  # at beta 0.5, clip +-0.5 is clip +-beta
    assert (out / "frontier.png").is_file() and "ADRPO vs fixed beta" in (out / "comparison.md").read_text()
    # a fresh clone (no runs/, eval/, logs/) reuses every finished run from the record, training nothing
    for d in ("runs", "eval", "logs"):
        (out / d).rename(tmp_path / d)
    check = subprocess.run([*args[:2], "--check", *args[2:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0 and "all 3 run(s)" in check.stdout, check.stderr[-2000:]
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "3 of 3 task(s) are recorded as done" in again.stdout, again.stderr[-2000:]
    assert not (out / "runs").exists() and (out / "frontier.md").read_text() == table
    (out / "frontier.md").unlink()  # --report writes the tables again from the record alone
    report = subprocess.run([*args[:2], "--report", *args[2:]], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert report.returncode == 0 and (out / "frontier.md").read_text() == table, report.stderr[-2000:]
    # a report on a record that holds part of the plan (here one strength more) says so, not "every run was current"
    wider = [*args[:2], "--report", *args[2:5], "0.5", "1.0", *args[6:]]
    partial = subprocess.run(wider, cwd=ROOT, capture_output=True, text=True, timeout=600)
    readme = (out / "README.md").read_text()
    assert partial.returncode == 0 and "**Partial**: 3 of 5 runs are done" in readme, partial.stderr[-2000:]
    assert "a report of the 3 of 5 runs done, nothing was trained or evaluated" in readme
    assert "every run and evaluation was current" not in readme


def test_the_noise_floor_is_the_perturbed_twins_distance_from_its_original_per_seed():
    seeds = [0, 1]
    done = {f"base_s{s}": _result(60.0) for s in seeds}
    points = {}
    for name, perturbed, clip in ((F.point_name("adrpo", 0.5), False, [61.0, 62.0]),
                                  (F.point_name("adrpo", 0.5, perturbed=True), True, [61.5, 61.0])):
        points[name] = {"method": "adrpo", "strength": 0.5, "clip": 1.0, "fixed_clip": None, "perturbed": perturbed,
                        "tasks": [f"{name}_s{s}" for s in seeds]}
        for s, c in zip(seeds, clip):
            done[f"{name}_s{s}"] = _result(c, 1e-3)
    lines = F.noise_floor(done, points, [1, 2], 0.5)
    assert "- clip_score: 0.5, 1" in lines
    assert F.noise_floor(done, points, [1, 2], None) == []
    # each arm reads its own twin: the fixed-clip arm has none here
    assert F.noise_floor(done, points, [1, 2], 0.5, fixed_clip=1.0)[-2:] == ["not run yet", ""]
    # a session stopped before the twin's seed 1: the floor over seed 0 alone, said as partial (|61.5 - 61|)
    del done[F.point_name("adrpo", 0.5, perturbed=True) + "_s1"]
    lines = F.noise_floor(done, points, [1, 2], 0.5)
    assert "- clip_score: 0.5" in lines and "**Partial**: seed(s) 0 only (the others are not done)." in lines


def test_a_twin_whose_original_is_not_planned_is_refused_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "experiments/frontier_tinyworld.py"), "--fixed_clip_strengths",
                             "0.5", "1", "--out", str(tmp_path / "f")], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and "--fixed_clip_perturb 0.25 is not one of --fixed_clip_strengths" in result.stderr
    assert not (tmp_path / "f").exists()
