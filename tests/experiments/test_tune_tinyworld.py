"""experiments/tune_tinyworld.py: the choice of each method's point, the reuse and refusal of finished runs (training
replaced by a stand-in), its committed records and --check."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from sd3_adrpo.config import parse_args

ROOT = Path(__file__).resolve().parents[2]


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


def test_tuning_check_reads_the_committed_record_not_the_run_folders(tmp_path, monkeypatch, capsys):
    """--check compares out/run_records.json (what is committed of a sweep) with what the command would train, with
    the run folders gone as in a fresh clone: current when settings and input files are the same, and every run is
    named when a setting or a file behind an input changed, when a grid point has no record, or when a recorded run
    has no result in tuning.json. It trains nothing; the sweep itself, run in that clone, trains every run again."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import tune_tinyworld

    trained = []

    def fake_train(cmd, log, threads=0):
        cfg = parse_args(cmd[1:])
        out = Path(cfg.output_dir)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        (out / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        gain = {"diff": cfg.raft_fraction, "ci_low": 0.0, "ci_high": 1.0}
        (out / "summary.json").write_text(json.dumps({"metrics": {
            "clip_score": gain, "clip_diversity_default": "cosine", "clip_diversity_cosine": gain,
            "oracle_accuracy": gain}}))
        trained.append(out.name)

    monkeypatch.setattr(tune_tinyworld, "run_logged", fake_train)
    grid = [{"raft_fraction": 0.25}, {"raft_fraction": 0.5}]
    monkeypatch.setattr(tune_tinyworld, "GRIDS", {"raft": grid})
    prompts = tmp_path / "train.txt"
    prompts.write_text((ROOT / "prompts/tinyworld_train.txt").read_text())
    out = tmp_path / "sweep"

    def sweep(*overrides, check=False):
        tune_tinyworld.main(["--out", str(out), *(["--check"] if check else []),
                             "--train_overrides", "--train_prompts", str(prompts), *overrides])

    sweep("--num_iterations", "2")
    records = json.loads((out / tune_tinyworld.RECORDS).read_text())
    assert set(records) == {"runs/raft/raft_fraction=0.25", "runs/raft/raft_fraction=0.5"}
    run = out / "runs/raft/raft_fraction=0.5"
    assert records["runs/raft/raft_fraction=0.5"] == {
        "settings": yaml.safe_load((run / "config.yaml").read_text()),
        "inputs": json.loads((run / tune_tinyworld.RECORD).read_text())}
    assert records["runs/raft/raft_fraction=0.5"]["settings"]["raft_fraction"] == 0.5

    shutil.rmtree(out / "runs")  # a fresh clone: tuning.json, tuning.md and run_records.json only
    capsys.readouterr()
    sweep("--num_iterations", "2", check=True)
    assert "all 2 run(s)" in capsys.readouterr().out
    assert len(trained) == 2 and not (out / "runs").exists()
    with pytest.raises(SystemExit, match=r"2 of 2 run\(s\)[^$]*raft_fraction=0.25: num_iterations"):
        sweep("--num_iterations", "3", check=True)
    prompts.write_text(prompts.read_text().replace("a red circle\n", ""))
    with pytest.raises(SystemExit, match=rf"2 of 2 run\(s\).*\n.*raft_fraction=0.25: the file\(s\) behind {prompts}"):
        sweep("--num_iterations", "2", check=True)
    prompts.write_text((ROOT / "prompts/tinyworld_train.txt").read_text())
    sweep("--num_iterations", "2", check=True)  # the original file again: current again

    grid.append({"raft_fraction": 0.125})  # a point added since the sweep ran
    with pytest.raises(SystemExit, match=r"the 2 run\(s\) recorded .* are current\n1 of 3 run\(s\) are not "
                                         r"run yet \(no record\): runs/raft/raft_fraction=0.125$"):
        sweep("--num_iterations", "2", check=True)
    grid.pop()
    report = json.loads((out / "tuning.json").read_text())
    kept = dict(report, results=[r for r in report["results"] if r["point"] != {"raft_fraction": 0.5}])
    (out / "tuning.json").write_text(json.dumps(kept))
    with pytest.raises(SystemExit, match=r"1 of 2 run\(s\).*\n  runs/raft/raft_fraction=0.5: no result in tuning"):
        sweep("--num_iterations", "2", check=True)
    assert len(trained) == 2

    sweep("--num_iterations", "2")  # the command itself, in the fresh clone: nothing to reuse, both trained
    assert sorted(trained[2:]) == ["raft_fraction=0.25", "raft_fraction=0.5"]
    assert json.loads((out / tune_tinyworld.RECORDS).read_text()) == records
    sweep("--num_iterations", "2", check=True)
