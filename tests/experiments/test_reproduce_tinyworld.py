"""experiments/reproduce_tinyworld.py: end to end at a reduced size (its reuse and refusal of existing runs, its
committed records and --check), and its commit stamp."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_tinyworld_reproduction_at_reduced_size(tmp_path):
    """The reproduction script end to end (two methods, one seed; the clipping ablation's plan is checked below,
    without training it) on the shipped tiny world (its default config), at a reduced size."""
    out = tmp_path / "repro"
    tuned = tmp_path / "tuning.json"  # a sweep's choice for RAFT: it must reach RAFT's runs and no other
    tuned.write_text(json.dumps({"chosen": {"raft": {"raft_fraction": 0.5}}}))
    held_out, train_prompts = tmp_path / "heldout.txt", tmp_path / "train.txt"
    held_out.write_text((ROOT / "prompts/tinyworld_heldout.txt").read_text())
    train_prompts.write_text((ROOT / "prompts/tinyworld_train.txt").read_text())
    args = [sys.executable, str(ROOT / "experiments/reproduce_tinyworld.py"), "--quick", "--methods", "adrpo", "raft",
            "--seeds", "0", "--no_ablation", "--jobs", "2", "--threads", "1", "--eval_num_prompts", "3", "--images_per_prompt", "2",
            "--eval_prompts", str(held_out), "--tuned", str(tuned), "--out", str(out), "--",
            "--train_prompts", str(train_prompts), "--num_iterations", "2", "--prompts_per_iteration", "2",
            "--samples_per_prompt", "2", "--train_batch_size", "2", "--num_inference_steps", "2"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("table1.md", "table1.csv", "table1.tex", "fig3.png", "fig3.pdf", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "ablation.md").exists()
    table = (out / "table1.md").read_text()
    assert all(f"| {label} |" in table for label in ("Base", "ADRPO", "RAFT"))
    tasks = json.loads((out / "tasks.json").read_text())
    assert set(tasks) == {"base_s0", "adrpo_s0", "raft_s0"}
    assert all(t["seconds"] > 0 and "clip_score" in t["metrics"] for t in tasks.values())
    # each trained run records how: a retraining on another thread count is not bitwise the same run
    assert "trained_with" not in tasks["base_s0"]
    assert all(tasks[n]["trained_with"]["torch_threads"] == 1 and tasks[n]["trained_with"]["commit"]
               for n in ("adrpo_s0", "raft_s0"))
    assert "Oracle acc." in table and "W2 divergence" in table
    readme = (out / "README.md").read_text()
    assert "reproduce_tinyworld.py --quick" in readme and "Commit:" in readme and "not SD3 results" in readme
    loras = {run: out / "runs" / run / "final" / "pytorch_lora_weights.safetensors"
             for run in ("adrpo_s0", "raft_s0")}
    assert all(f.is_file() for f in loras.values())
    configs = {run: yaml.safe_load((f.parent / "config.yaml").read_text()) for run, f in loras.items()}
    assert configs["raft_s0"]["raft_fraction"] == 0.5 and configs["adrpo_s0"]["raft_fraction"] == 0.25
    assert "raft_fraction=0.5 (tuned:" in table

    # What is committed of a reproduction: the figure's data in one file (the seed-0 runs' trajectories, in the
    # plot's order) and one record of every task's settings, inputs and evaluation, which --check compares with what
    # the command would run, with no run folder (as in a fresh clone, where runs/, eval/ and logs/ are not).
    from sd3_adrpo.plots import load_trajectory

    fig = json.loads((out / "fig3.json").read_text())
    assert list(fig) == ["ADRPO", "RAFT"] and fig["RAFT"] == load_trajectory(out / "runs" / "raft_s0")
    records = json.loads((out / "run_records.json").read_text())
    assert set(records) == set(tasks) and "settings" not in records["base_s0"]
    assert records["raft_s0"]["settings"] == configs["raft_s0"]
    assert records["adrpo_s0"]["eval"] == json.loads((out / "eval/adrpo_s0/command.json").read_text())
    check = [*args[:2], "--check", *args[2:]]

    def checked():
        return subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=600)

    local = {d: tmp_path / f"local_{d}" for d in ("runs", "eval", "logs") if (out / d).exists()}
    for d, away in local.items():
        (out / d).rename(away)
    fresh = checked()
    assert fresh.returncode == 0 and "all 3 run(s)" in fresh.stdout, fresh.stderr[-3000:]
    assert not (out / "runs").exists() and not (out / "eval").exists()  # it trained and evaluated nothing
    # ... and the reproduction itself, run in that fresh clone, resumes from the record: every task is current, so
    # nothing is trained or evaluated and the table and figure are rebuilt from tasks.json alone
    resumed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "3 of 3 task(s) are recorded as done and current" in resumed.stdout
    assert not (out / "runs").exists() and not (out / "eval").exists()
    assert (out / "table1.md").read_text() == table and json.loads((out / "fig3.json").read_text()) == fig
    for d, away in local.items():
        away.rename(out / d)

    # Run again: every run and evaluation is reused, nothing retrained, the same table; a reading written by hand
    # below the marker survives the rewritten README.
    sys.path.insert(0, str(ROOT / "experiments"))
    import reproduce_tinyworld

    reading = f"{reproduce_tinyworld.KEEP}\n## What the numbers show\nWritten by hand.\n"
    (out / "README.md").write_text(readme + reading)
    stamps = {run: f.stat().st_mtime_ns for run, f in loras.items()}
    # (a record that lost how its runs were trained, as one written by an invocation stopped while it evaluated: the
    # stamp is kept with each run and comes back from there)
    (out / "tasks.json").write_text(json.dumps({n: {k: v for k, v in t.items() if k != "trained_with"}
                                                for n, t in tasks.items()}))
    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {run: f.stat().st_mtime_ns for run, f in loras.items()} == stamps
    assert (out / "table1.md").read_text() == table
    rewritten = (out / "README.md").read_text()
    assert rewritten.endswith(reading) and rewritten.count(reproduce_tinyworld.KEEP) == 1 and "Commit:" in rewritten
    # ... and its header is still that of the invocation that did the work (its wall time, not the rerun's)
    wall = next(line for line in readme.splitlines() if line.startswith("Wall time"))
    assert wall in rewritten.splitlines() and "nothing was trained or evaluated again" in rewritten
    # ... with a line counting what the record holds now (a stopped invocation wrote no header of its own)
    assert "The record now holds 3 run(s)" in rewritten
    assert json.loads((out / "tasks.json").read_text()) == tasks  # the trained_with stamps included
    # A new tuning choice changes what RAFT trains: its existing run is stale and refused up front (never
    # overwritten); the ADRPO runs do not read that knob, so they are not the ones named.
    tuned.write_text(json.dumps({"chosen": {"raft": {"raft_fraction": 0.75}}}))
    changed = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert changed.returncode != 0 and "raft_s0: raft_fraction" in changed.stderr and "1 existing run" in changed.stderr
    assert {run: f.stat().st_mtime_ns for run, f in loras.items()} == stamps
    stale = checked()  # --check tells the same from the record
    assert stale.returncode == 1 and "1 of 3 run(s)" in stale.stderr and "raft_s0: raft_fraction" in stale.stderr

    # Same path, other contents. An edited held-out file is evaluated again, nothing is retrained; an edited train
    # file (like a retrained base model) makes every trained run stale, and the runs are refused, not overwritten.
    tuned.write_text(json.dumps({"chosen": {"raft": {"raft_fraction": 0.5}}}))
    evaluated = {p: p.stat().st_mtime_ns for p in (out / "eval").glob("*/command.json")}
    held_out.write_text("".join(reversed(held_out.read_text().splitlines(keepends=True))))
    stale = checked()  # every evaluation's record names the edited file; the trainings' records are current
    assert stale.returncode == 1 and "3 of 3 run(s)" in stale.stderr, stale.stderr[-3000:]
    assert stale.stderr.count(f"the file(s) behind {held_out} (evaluation)") == 3 and "train_prompts" not in stale.stderr
    edited = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert edited.returncode == 0, edited.stderr[-3000:]
    assert {run: f.stat().st_mtime_ns for run, f in loras.items()} == stamps
    assert len(evaluated) == 3 and all(p.stat().st_mtime_ns != t for p, t in evaluated.items())
    assert "nothing was trained or evaluated again" not in (out / "README.md").read_text()
    assert checked().returncode == 0  # the new evaluations' stamps are in the record
    train_prompts.write_text(train_prompts.read_text().replace("a red circle\n", ""))
    retrained = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert retrained.returncode != 0 and "2 existing run" in retrained.stderr and "train_prompts" in retrained.stderr
    assert {run: f.stat().st_mtime_ns for run, f in loras.items()} == stamps
    stale = checked()
    assert stale.returncode == 1 and "2 of 3 run(s)" in stale.stderr and "train_prompts" in stale.stderr

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
    assert after["adrpo_s0"]["trained_with"] == before["adrpo_s0"]["trained_with"]  # carried over, not re-stamped
    assert yaml.safe_load((loras["raft_s0"].parent / "config.yaml").read_text())["raft_fraction"] == 0.75
    assert json.loads((out / "run_records.json").read_text())["raft_s0"]["settings"]["raft_fraction"] == 0.75
    assert checked().returncode == 0
    assert {run: f.stat().st_mtime_ns for run, f in loras.items() if run != "raft_s0"} == \
        {run: t for run, t in stamps.items() if run != "raft_s0"}


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


def test_reproduction_check_compares_the_committed_record_with_the_command(tmp_path, monkeypatch, capsys):
    """--check on records alone (no run folder): current when every task's record is what the command would train
    and evaluate; a knob only another method reads is not a difference; a changed setting, a changed input file, a
    changed evaluation command, a missing record or a missing result in tasks.json is named."""
    import dataclasses

    from sd3_adrpo.config import parse_args

    sys.path.insert(0, str(ROOT / "experiments"))
    import reproduce_tinyworld as R

    out = tmp_path / "repro"
    argv = ["--check", "--methods", "adrpo", "raft", "--seeds", "0", "--no_ablation", "--tuned", "none",
            "--eval_num_prompts", "3", "--out", str(out)]
    planned = {}
    plan = R.plan

    def keep_plan(args, base_cfg):
        planned.update(args=args, base_cfg=base_cfg, tasks=plan(args, base_cfg)[0])
        return plan(args, base_cfg)

    monkeypatch.setattr(R, "plan", keep_plan)
    with pytest.raises(SystemExit, match=r"the 0 run\(s\) recorded .* are current\n3 of 3 run\(s\) are not run yet "
                                         r"\(no record\): .*base_s0"):
        R.main(argv)  # nothing recorded yet
    args, base_cfg, tasks = planned["args"], planned["base_cfg"], planned["tasks"]
    assert set(tasks) == {"base_s0", "adrpo_s0", "raft_s0"}

    # the records a run of this command leaves: the settings as the trainer saves them, the files' fingerprints and
    # the evaluation's stamp
    def record(task):
        rec = {"eval": R.eval_stamp(task, args, base_cfg, out)}
        if task.overrides is not None:
            train = R.train_argv(task, args, base_cfg, out)
            rec["settings"] = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(parse_args(train)), sort_keys=False))
            rec["inputs"] = R.train_inputs(train)
        return rec

    def write(records, results=tuple(tasks)):
        out.mkdir(exist_ok=True)
        (out / "run_records.json").write_text(json.dumps(records))
        (out / "tasks.json").write_text(json.dumps({n: {"metrics": {}, "seconds": 1.0, **(
            {} if n.startswith("base_") else {"trajectory": [{"iteration": 0}]})} for n in results}))

    records = {name: record(task) for name, task in tasks.items()}
    write(records)
    capsys.readouterr()
    R.main(argv)
    assert "all 3 run(s)" in capsys.readouterr().out and not (out / "runs").exists()

    other_knob = json.loads(json.dumps(records))
    other_knob["adrpo_s0"]["settings"]["raft_fraction"] = 0.9  # only RAFT reads it
    write(other_knob)
    R.main(argv)

    def problems(edit, results=tuple(tasks)):
        changed = json.loads(json.dumps(records))
        edit(changed)
        write(changed, results)
        with pytest.raises(SystemExit) as e:
            R.main(argv)
        return str(e.value).splitlines()[1:]

    assert problems(lambda r: r["raft_s0"]["settings"].update(learning_rate=1.0)) == ["  raft_s0: learning_rate"]
    assert problems(lambda r: r["adrpo_s0"]["inputs"].update({base_cfg.train_prompts: "0" * 64})) == [
        "  adrpo_s0: the files behind pretrained_model / train_prompts / reward_model (changed or not recorded)"]
    assert problems(lambda r: r["base_s0"]["eval"]["command"].extend(["--steps", "3"])) == [
        "  base_s0: the evaluation's command"]
    assert problems(lambda r: r["raft_s0"]["eval"]["inputs"].update({args.eval_prompts: "0" * 64})) == [
        f"  raft_s0: the file(s) behind {args.eval_prompts} (evaluation)"]
    assert problems(lambda r: r.pop("raft_s0")) == ["1 of 3 run(s) are not run yet (no record): raft_s0"]
    assert problems(lambda r: None, results=("base_s0", "raft_s0")) == ["  adrpo_s0: no result in tasks.json"]
    # a result without its trajectory (Figure 3's data, which a fresh clone cannot read from a run folder) is stale
    write(records)
    results = json.loads((out / "tasks.json").read_text())
    del results["adrpo_s0"]["trajectory"]
    (out / "tasks.json").write_text(json.dumps(results))
    with pytest.raises(SystemExit, match=r"\n  adrpo_s0: no trajectory in tasks.json$"):
        R.main(argv)


def test_each_loss_guidance_setting_is_a_row_of_every_method_and_conditional_runs_keep_their_names():
    import argparse

    sys.path.insert(0, str(ROOT / "experiments"))
    import reproduce_tinyworld
    from sd3_adrpo.config import parse_args

    base_cfg = parse_args(["--config", str(ROOT / "configs/tiny.yaml")])

    def plan(settings):
        args = argparse.Namespace(seeds=[0, 1], methods=["adrpo", "dpo"], loss_guidance=settings,
                                  tuned_points={"dpo": {"dpo_beta": 500.0}}, no_ablation=False)
        return reproduce_tinyworld.plan(args, base_cfg)

    tasks, rows, ablation = plan(["conditional", "guided"])
    assert list(rows) == ["Base", "ADRPO (conditional)", "ADRPO (guided)", "DPO (conditional)", "DPO (guided)"]
    assert rows["ADRPO (conditional)"] == ["adrpo_s0", "adrpo_s1"]  # the committed runs' names: they are reused
    assert rows["DPO (guided)"] == ["dpo_guided_s0", "dpo_guided_s1"]
    guided = tasks["dpo_guided_s1"].overrides
    assert guided["loss_guidance"] == "guided" and guided["dpo_beta"] == 500.0 and guided["seed"] == 1
    assert guided["inner_epochs"] == tasks["dpo_s1"].overrides["inner_epochs"]  # the same equal-compute rule
    assert ablation["clip ±2·β0"] == ["adrpo_s0", "adrpo_s1"]  # the ablation stays the conditional ADRPO runs
    # configs/tiny.yaml clips at +-2 beta0; the other two rows are trained for the ablation, each clip symmetric
    assert list(ablation) == ["clip ±0.5·β0", "clip ±1·β0", "clip ±2·β0"]
    assert ablation["clip ±0.5·β0"] == ["adrpo_clip0.5_s0", "adrpo_clip0.5_s1"]
    for m in (0.5, 1):
        clip = tasks[f"adrpo_clip{m:g}_s1"].overrides
        assert clip["method"] == "adrpo" and clip["seed"] == 1
        assert clip["adv_clip_max"] == -clip["adv_clip_min"] == pytest.approx(m * base_cfg.beta0)
    tasks, rows, _ = plan(["conditional"])
    assert list(rows) == ["Base", "ADRPO", "DPO"] and not any("guided" in name for name in tasks)


def test_check_tells_stale_records_from_runs_not_run_yet(tmp_path):
    """--check's ending: a recorded run with other settings is stale (named with what differs); a run with no record
    is only not run yet, and a partial record is current as far as it goes. Either exits 1; none exits 0."""
    from _launch import report_check

    with pytest.raises(SystemExit) as e:
        report_check(["a_s0: num_iterations", "b_s0: not in run_records.json", "c_s0: not in run_records.json"], 4,
                     tmp_path)
    assert str(e.value) == (f"1 of 4 run(s) recorded in {tmp_path / 'run_records.json'} are not what this command "
                            "would run:\n  a_s0: num_iterations\n2 of 4 run(s) are not run yet (no record): b_s0, c_s0")
    with pytest.raises(SystemExit) as e:
        report_check(["b_s0: not in run_records.json"], 3, tmp_path)
    assert str(e.value) == (f"the 2 run(s) recorded in {tmp_path / 'run_records.json'} are current\n"
                            "1 of 3 run(s) are not run yet (no record): b_s0")
    report_check([], 3, tmp_path)  # returns: exit 0
