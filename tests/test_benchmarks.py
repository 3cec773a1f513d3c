"""The benchmarks' smoke modes (their numbers mean nothing on CPU; the scripts must keep working)."""

import dataclasses
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sd3_adrpo.config import parse_args

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_tiny_mode(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_sd3_medium.py"), "--tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rollouts = [r for r in data["rows"] if r["what"] == "rollout"]
    assert {(r["resolution"], r["steps"], r["cfg"]) for r in rollouts} == {
        (res, s, c) for res in (64, 128) for s in (2, 3) for c in (True, False)}
    assert all(r["images_per_s"] > 0 for r in rollouts)
    trains = {r["what"]: r for r in data["rows"] if r["what"].startswith("train")}
    assert trains["train step (24gb)"]["gradient_checkpointing"] and trains["train step (24gb)"]["optimizer"] == "adamw8bit"
    assert trains["train step (80gb)"]["batch"] > trains["train step (24gb)"]["batch"]
    assert data["tflop_per_forward"]["128"] > data["tflop_per_forward"]["64"] > 0
    assert "SD3-medium architecture (TINY shapes)" in result.stdout


def test_tinyworld_reproduction_at_reduced_size(tmp_path):
    """The reproduction script end to end (two methods, one seed, the clipping ablation) on the shipped tiny world
    (its default config), at a reduced size."""
    out = tmp_path / "repro"
    tuned = tmp_path / "tuning.json"  # a sweep's choice for RAFT: it must reach RAFT's runs and no other
    tuned.write_text(json.dumps({"chosen": {"raft": {"raft_fraction": 0.5}}}))
    held_out, train_prompts = tmp_path / "heldout.txt", tmp_path / "train.txt"
    held_out.write_text((ROOT / "prompts/tinyworld_heldout.txt").read_text())
    train_prompts.write_text((ROOT / "prompts/tinyworld_train.txt").read_text())
    args = [sys.executable, str(ROOT / "experiments/reproduce_tinyworld.py"), "--quick", "--methods", "adrpo", "raft",
            "--seeds", "0", "--jobs", "2", "--threads", "1", "--eval_num_prompts", "3", "--images_per_prompt", "2",
            "--eval_prompts", str(held_out), "--tuned", str(tuned), "--out", str(out), "--",
            "--train_prompts", str(train_prompts), "--num_iterations", "2", "--prompts_per_iteration", "2",
            "--samples_per_prompt", "2", "--train_batch_size", "2", "--num_inference_steps", "2"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("table1.md", "table1.csv", "table1.tex", "ablation.md", "fig3.png", "fig3.pdf", "README.md"):
        assert (out / name).is_file(), name
    table = (out / "table1.md").read_text()
    assert all(f"| {label} |" in table for label in ("Base", "ADRPO", "RAFT"))
    ablation = (out / "ablation.md").read_text()
    assert all(f"| clip ±{m}·β0 |" in ablation for m in ("0.5", "1", "2"))
    tasks = json.loads((out / "tasks.json").read_text())
    # configs/tiny.yaml clips at +-2 beta0: that row is the ADRPO runs themselves, the others are trained for it
    assert set(tasks) == {"base_s0", "adrpo_s0", "raft_s0", "adrpo_clip0.5_s0", "adrpo_clip1_s0"}
    assert all(t["seconds"] > 0 and "clip_score" in t["metrics"] for t in tasks.values())
    assert "Oracle acc." in table and "W2 divergence" in table
    readme = (out / "README.md").read_text()
    assert "reproduce_tinyworld.py --quick" in readme and "Commit:" in readme and "not SD3 results" in readme
    loras = {run: out / "runs" / run / "final" / "pytorch_lora_weights.safetensors"
             for run in ("adrpo_s0", "raft_s0", "adrpo_clip0.5_s0", "adrpo_clip1_s0")}
    assert all(f.is_file() for f in loras.values())
    configs = {run: yaml.safe_load((f.parent / "config.yaml").read_text()) for run, f in loras.items()}
    assert configs["raft_s0"]["raft_fraction"] == 0.5 and configs["adrpo_s0"]["raft_fraction"] == 0.25
    assert "raft_fraction=0.5 (tuned:" in table

    # Run again: every run and evaluation is reused, nothing retrained, the same table; a reading written by hand
    # below the marker survives the rewritten README.
    sys.path.insert(0, str(ROOT / "experiments"))
    import reproduce_tinyworld

    reading = f"{reproduce_tinyworld.KEEP}\n## What the numbers show\nWritten by hand.\n"
    (out / "README.md").write_text(readme + reading)
    stamps = {run: f.stat().st_mtime_ns for run, f in loras.items()}
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {run: f.stat().st_mtime_ns for run, f in loras.items()} == stamps
    assert (out / "table1.md").read_text() == table
    rewritten = (out / "README.md").read_text()
    assert rewritten.endswith(reading) and rewritten.count(reproduce_tinyworld.KEEP) == 1 and "Commit:" in rewritten
    # ... and its header is still that of the invocation that did the work (its wall time, not the rerun's)
    wall = next(line for line in readme.splitlines() if line.startswith("Wall time"))
    assert wall in rewritten.splitlines() and "nothing was trained or evaluated again" in rewritten
    assert json.loads((out / "tasks.json").read_text()) == tasks
    # A new tuning choice changes what RAFT trains: its existing run is stale and refused up front (never
    # overwritten); the ADRPO runs do not read that knob, so they are not the ones named.
    tuned.write_text(json.dumps({"chosen": {"raft": {"raft_fraction": 0.75}}}))
    changed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert changed.returncode != 0 and "raft_s0: raft_fraction" in changed.stderr and "1 existing run" in changed.stderr
    assert {run: f.stat().st_mtime_ns for run, f in loras.items()} == stamps

    # Same path, other contents. An edited held-out file is evaluated again, nothing is retrained; an edited train
    # file (like a retrained base model) makes every trained run stale, and the runs are refused, not overwritten.
    tuned.write_text(json.dumps({"chosen": {"raft": {"raft_fraction": 0.5}}}))
    evaluated = {p: p.stat().st_mtime_ns for p in (out / "eval").glob("*/command.json")}
    held_out.write_text("".join(reversed(held_out.read_text().splitlines(keepends=True))))
    edited = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert edited.returncode == 0, edited.stderr[-3000:]
    assert {run: f.stat().st_mtime_ns for run, f in loras.items()} == stamps
    assert len(evaluated) == 5 and all(p.stat().st_mtime_ns != t for p, t in evaluated.items())
    assert "nothing was trained or evaluated again" not in (out / "README.md").read_text()
    train_prompts.write_text(train_prompts.read_text().replace("a red circle\n", ""))
    retrained = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert retrained.returncode != 0 and "4 existing run" in retrained.stderr and "train_prompts" in retrained.stderr
    assert {run: f.stat().st_mtime_ns for run, f in loras.items()} == stamps

    # A stale run deleted, as the error says, is trained again with the new choice, and only it; its time is that of
    # this invocation, not added to the discarded run's.
    train_prompts.write_text((ROOT / "prompts/tinyworld_train.txt").read_text())
    tuned.write_text(json.dumps({"chosen": {"raft": {"raft_fraction": 0.75}}}))
    shutil.rmtree(out / "runs" / "raft_s0")
    before = json.loads((out / "tasks.json").read_text())
    t0 = time.perf_counter()
    redone = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    assert redone.returncode == 0, redone.stderr[-3000:]
    after = json.loads((out / "tasks.json").read_text())
    assert 0 < after["raft_s0"]["seconds"] <= wall and after["adrpo_s0"] == before["adrpo_s0"]
    assert yaml.safe_load((loras["raft_s0"].parent / "config.yaml").read_text())["raft_fraction"] == 0.75
    assert {run: f.stat().st_mtime_ns for run, f in loras.items() if run != "raft_s0"} == \
        {run: t for run, t in stamps.items() if run != "raft_s0"}


def test_tuning_sweep_picks_the_best_point_whose_oracle_does_not_fall(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import tune_tinyworld

    def metrics(clip, oracle_high):
        m = lambda d, lo, hi: {"diff": d, "ci_low": lo, "ci_high": hi}  # noqa: E731
        # the layout of a run's summary.json metrics: the default diversity variant is named, its numbers are keyed
        return {"clip_score": m(clip, clip - 1, clip + 1), "clip_diversity_default": "cosine",
                "clip_diversity_cosine": m(0.5, -1, 2), "clip_diversity_l2": m(9.0, 8, 10),
                "oracle_accuracy": m(oracle_high - 0.05, oracle_high - 0.1, oracle_high)}

    results = [{"method": "adrpo", "point": {"beta0": 1.0}, "metrics": metrics(1.0, 0.02)},
               {"method": "adrpo", "point": {"beta0": 2.0}, "metrics": metrics(3.0, -0.01)},  # oracle fell: out
               {"method": "adrpo", "point": {"beta0": 4.0}, "metrics": metrics(2.0, 0.0)},
               {"method": "raft", "point": {"raft_fraction": 0.25}, "metrics": metrics(-1.0, 0.1)},
               # no DPO setting keeps its oracle: the larger gain is still named, flagged
               {"method": "dpo", "point": {"dpo_beta": 500.0}, "metrics": metrics(-3.0, -0.02)},
               {"method": "dpo", "point": {"dpo_beta": 2000.0}, "metrics": metrics(-2.0, -0.05)}]
    args = SimpleNamespace(command="python experiments/tune_tinyworld.py", commit="abc", jobs=1, threads=1,
                           config="configs/tiny.yaml", eval_num_prompts=48)
    tune_tinyworld.write_report(results, args, tmp_path, 60.0)
    data = json.loads((tmp_path / "tuning.json").read_text())
    assert data["chosen"] == {"adrpo": {"beta0": 4.0}, "raft": {"raft_fraction": 0.25}, "dpo": {"dpo_beta": 2000.0}}
    assert data["qualified"] == {"adrpo": True, "raft": True, "dpo": False}
    report = (tmp_path / "tuning.md").read_text()
    assert "| adrpo | **beta0=4.0** |" in report and "| dpo | **dpo_beta=2000.0** (oracle falls) |" in report
    assert "+0.50 [-1.00, +2.00]" in report and "+9.00" not in report  # the cosine variant, as the runs' default


def test_tuning_sweep_reuses_a_finished_run_only_when_its_settings_and_files_are_the_same(tmp_path, monkeypatch):
    """The sweep's bookkeeping, with training replaced by a stand-in that writes a run's summary: a rerun reuses
    finished runs; other settings, or other contents behind the same train-prompt path (as after a rebuild), or a run
    with no record are refused before anything trains, and the existing runs are left as they are."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import tune_tinyworld

    trained = []

    def fake_train(cmd, log, threads=0):
        out = Path(cmd[cmd.index("--output_dir") + 1])
        assert cmd[cmd.index("--overwrite_output_dir") + 1] == "true"
        shutil.rmtree(out, ignore_errors=True)  # as the trainer does with --overwrite_output_dir true
        out.mkdir(parents=True)
        # the trainer saves the settings it parsed from its command line
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(parse_args(cmd[1:])), sort_keys=False))
        gain = {"diff": 1.0, "ci_low": 0.5, "ci_high": 1.5}
        (out / "summary.json").write_text(json.dumps({"metrics": {
            "clip_score": gain, "clip_diversity_default": "cosine", "clip_diversity_cosine": gain,
            "oracle_accuracy": gain}}))
        trained.append(out.name)

    monkeypatch.setattr(tune_tinyworld, "run_logged", fake_train)
    monkeypatch.setattr(tune_tinyworld, "GRIDS", {"raft": [{"raft_fraction": 0.25}, {"raft_fraction": 0.5}]})
    prompts = tmp_path / "train.txt"
    prompts.write_text((ROOT / "prompts/tinyworld_train.txt").read_text())
    out = tmp_path / "sweep"

    def sweep(*overrides):
        tune_tinyworld.main(["--out", str(out), "--train_overrides", "--train_prompts", str(prompts), *overrides])

    sweep("--num_iterations", "2")
    assert sorted(trained) == ["raft_fraction=0.25", "raft_fraction=0.5"]
    assert json.loads((out / "tuning.json").read_text())["chosen"] == {"raft": {"raft_fraction": 0.25}}
    sweep("--num_iterations", "2")  # the same command: nothing trains again
    assert len(trained) == 2
    summaries = {p: p.stat().st_mtime_ns for p in out.glob("runs/raft/*/summary.json")}

    with pytest.raises(SystemExit, match=r"2 finished run\(s\).*num_iterations"):
        sweep("--num_iterations", "3")
    prompts.write_text(prompts.read_text().replace("a red circle\n", ""))
    with pytest.raises(SystemExit, match=rf"2 finished run\(s\).*the file\(s\) behind {prompts}"):
        sweep("--num_iterations", "2")
    prompts.write_text((ROOT / "prompts/tinyworld_train.txt").read_text())
    sweep("--num_iterations", "2")  # the original file again: current again
    (out / "runs/raft/raft_fraction=0.5" / tune_tinyworld.RECORD).unlink()
    with pytest.raises(SystemExit, match=r"1 finished run\(s\).*raft/raft_fraction=0.5: no sweep_inputs.json"):
        sweep("--num_iterations", "2")
    (out / "runs/raft/raft_fraction=0.25/config.yaml").unlink()
    with pytest.raises(SystemExit, match=r"2 finished run\(s\).*raft/raft_fraction=0.25: no config.yaml \("):
        sweep("--num_iterations", "2")
    assert len(trained) == 2 and {p: p.stat().st_mtime_ns for p in summaries} == summaries


def test_tuning_sweep_with_seeds_chooses_by_the_mean_gain_and_reuses_the_config_seed_runs(tmp_path, monkeypatch):
    """--seeds trains each point at every seed (the config's seed in the single-seed sweep's folder, so those runs are
    reused), gives each run its seed, and chooses by the mean gain over seeds among points whose oracle holds at
    every seed."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import tune_tinyworld

    # the stand-in trainer's gains per (raft_fraction, seed): 0.25 is best at seed 0 but worst on average;
    # 0.125 has the largest mean but its oracle falls at seed 2
    gains = {(0.25, 0): 3.0, (0.25, 1): -1.0, (0.25, 2): 0.0, (0.5, 0): 1.0, (0.5, 1): 2.0, (0.5, 2): 1.5,
             (0.125, 0): 4.0, (0.125, 1): 4.0, (0.125, 2): 4.0}
    trained = []

    def fake_train(cmd, log, threads=0):
        cfg = parse_args(cmd[1:])
        out = Path(cfg.output_dir)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        gain = gains[(cfg.raft_fraction, cfg.seed)]
        oracle_high = -0.01 if (cfg.raft_fraction, cfg.seed) == (0.125, 2) else 0.02
        (out / "summary.json").write_text(json.dumps({"metrics": {
            "clip_score": {"diff": gain, "ci_low": gain - 1, "ci_high": gain + 1},
            "clip_diversity_default": "cosine", "clip_diversity_cosine": {"diff": 0.0, "ci_low": -1, "ci_high": 1},
            "oracle_accuracy": {"diff": oracle_high - 0.03, "ci_low": oracle_high - 0.06, "ci_high": oracle_high}}}))
        trained.append((out.name, cfg.seed))

    monkeypatch.setattr(tune_tinyworld, "run_logged", fake_train)
    monkeypatch.setattr(tune_tinyworld, "GRIDS", {"raft": [{"raft_fraction": f} for f in (0.125, 0.25, 0.5)]})
    out = tmp_path / "sweep"
    base = ["--out", str(out), "--methods", "raft"]

    tune_tinyworld.main(base + ["--train_overrides", "--num_iterations", "2"])  # one seed: the config's (0)
    single = json.loads((out / "tuning.json").read_text())
    assert single["chosen"] == {"raft": {"raft_fraction": 0.125}} and {r["seed"] for r in single["results"]} == {0}
    assert len(trained) == 3

    tune_tinyworld.main(base + ["--seeds", "0", "1", "2", "--train_overrides", "--num_iterations", "2"])
    assert sorted(trained[3:]) == sorted((f"raft_fraction={f}_seed{s}", s) for f in (0.125, 0.25, 0.5) for s in (1, 2))
    data = json.loads((out / "tuning.json").read_text())
    # means: 0.125 -> 4.0 (oracle falls at seed 2), 0.25 -> 0.67, 0.5 -> 1.5
    assert data["chosen"] == {"raft": {"raft_fraction": 0.5}} and data["qualified"] == {"raft": True}
    assert sorted((r["point"]["raft_fraction"], r["seed"]) for r in data["results"]) == sorted(gains)
    report = (out / "tuning.md").read_text()
    # 0.5: mean 1.5, s.e. sqrt(0.25 / 3) = 0.29
    assert "| raft | **raft_fraction=0.5** | 0, 1, 2 | +1.50 ± 0.29 |" in report

    with pytest.raises(SystemExit, match="either with --seeds or in --train_overrides"):
        tune_tinyworld.main(base + ["--seeds", "1", "--train_overrides", "--seed", "1"])


def test_tuning_sweep_loop_time_is_the_sum_of_iteration_times(tmp_path):
    sys.path.insert(0, str(ROOT / "experiments"))
    import tune_tinyworld

    (tmp_path / "metrics.jsonl").write_text('{"iteration": 0, "time_total": 30.0}\n{"iteration": 1, "time_total": 90.0}\n')
    assert tune_tinyworld.loop_minutes(tmp_path) == 2.0
    assert tune_tinyworld.loop_minutes(tmp_path / "missing") is None


def test_reproduction_stamp_names_uncommitted_changes_outside_its_output(tmp_path, monkeypatch):
    sys.path.insert(0, str(ROOT / "experiments"))
    import reproduce_tinyworld

    repo = tmp_path / "repo"
    (repo / "configs").mkdir(parents=True)
    (repo / "results").mkdir()
    (repo / "configs/tiny.yaml").write_text("beta0: 1.0\n")
    (repo / "results/table.md").write_text("old\n")

    def git(*a):
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *a], cwd=repo, check=True,
                       capture_output=True)

    git("init", "-q")
    git("add", ".")
    git("commit", "-q", "-m", "x")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True).stdout
    monkeypatch.setattr(reproduce_tinyworld, "ROOT", repo)
    out = repo / "results"
    (out / "table.md").write_text("new\n")  # the reproduction's own output does not count
    (repo / "untracked.txt").write_text("x")  # nor do files git does not track
    assert reproduce_tinyworld.code_commit(out) == head.strip()
    (repo / "configs/tiny.yaml").write_text("beta0: 0.5\n")
    assert reproduce_tinyworld.code_commit(out) == f"{head.strip()} with uncommitted changes to 1 tracked file(s)"
