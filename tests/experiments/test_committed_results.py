"""What results/ commits of the experiments: small, with one record per experiment that covers every run its tables
were made from (what the drivers' --check reads in a fresh clone), the figure's data, and run folders left to git's
ignore rules."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)


def _tracked() -> list[str]:
    listed = _git("ls-files", "-z", "results")
    if listed.returncode != 0:
        pytest.skip("not a git checkout")
    return [p for p in listed.stdout.split("\0") if p]


def test_results_stay_small():
    files = _tracked()
    size = sum((ROOT / p).stat().st_size for p in files if (ROOT / p).is_file())
    assert len(files) <= 150 and size <= 5 * 2**20, (len(files), size)
    assert not [p for p in files if p.endswith((".safetensors", "metrics.jsonl")) and "/runs/" in p]


@pytest.mark.parametrize("path, ignored", [
    ("results/tinyworld/runs/adrpo_s0/final/pytorch_lora_weights.safetensors", True),
    ("results/tinyworld/runs/adrpo_s0/inputs.json", True),
    ("results/tinyworld/eval/adrpo_s0/command.json", True),
    ("results/tinyworld/logs/adrpo_s0.train.log", True),
    ("results/tinyworld_tuning/sweep_v2/runs/raft/raft_fraction=0.25/summary.json", True),
    ("results/tinyworld_tuning/sweep_v3/runs/dpo/dpo_beta=500.0/sweep_inputs.json", True),
    ("results/tinyworld_main_job/final/pytorch_lora_weights.safetensors", True),
    ("results/tinyworld/run_records.json", False),
    ("results/tinyworld/fig3.json", False),
    ("results/tinyworld/tasks.json", False),
    ("results/tinyworld_tuning/sweep_v2/run_records.json", False),
    ("results/tinyworld_tuning/sweep_v2/tuning.json", False),
])
def test_a_rerun_adds_no_run_folder_to_git_but_its_records(path, ignored):
    _tracked()
    assert (_git("check-ignore", "-q", "--no-index", path).returncode == 0) == ignored


def test_the_reproduction_record_covers_every_task_of_its_table():
    tasks = json.loads((RESULTS / "tinyworld/tasks.json").read_text())
    records = json.loads((RESULTS / "tinyworld/run_records.json").read_text())
    assert set(records) == set(tasks)
    for name, record in records.items():
        seed = int(name.rsplit("_s", 1)[1])
        assert f"--seeds {seed} " in " ".join(record["eval"]["command"]) + " "
        if name.startswith("base_"):
            assert "settings" not in record and "--skip_base" not in record["eval"]["command"]
        else:
            assert record["settings"]["seed"] == seed and len(record["inputs"]) == 3
            stem = name.split("_clip")[0].rsplit("_s", 1)[0]  # adrpo, adrpo_guided (loss_guidance: guided), ...
            guided = stem.endswith("_guided")
            assert record["settings"]["method"] == stem.removesuffix("_guided")
            assert record["settings"].get("loss_guidance", "conditional") == ("guided" if guided else "conditional")
            assert f"run=results/tinyworld/runs/{name}/final" in record["eval"]["command"]


def test_the_reproduction_figure_keeps_its_data_in_the_tables_order():
    fig = json.loads((RESULTS / "tinyworld/fig3.json").read_text())
    rows = [line.split("|")[1].strip() for line in (RESULTS / "tinyworld/table1.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| Method")]
    assert list(fig) == [r for r in rows if r != "Base"] and len(fig) == 10  # 5 methods x both loss_guidance
    assert all(traj and [r["iteration"] for r in traj] == sorted(r["iteration"] for r in traj) for traj in fig.values())


@pytest.mark.parametrize("sweep", ["sweep_v2", "adrpo_sweep_v2"])
def test_each_sweep_record_covers_exactly_the_runs_of_its_report(sweep):
    sys.path.insert(0, str(ROOT / "experiments"))
    import tune_tinyworld

    out = RESULTS / "tinyworld_tuning" / sweep
    report = json.loads((out / "tuning.json").read_text())
    records = json.loads((out / "run_records.json").read_text())
    # the config's seed (0) when these sweeps ran names a point's folder without a _seed suffix
    keys = {tune_tinyworld.record_key(tune_tinyworld.run_dir(out, r["method"], r["point"], r["seed"], 0), out): r
            for r in report["results"]}
    assert set(records) == set(keys)
    for key, r in keys.items():
        settings = records[key]["settings"]
        assert settings["method"] == r["method"] and settings["seed"] == r["seed"]
        assert all(settings[k] == v for k, v in r["point"].items())
        assert set(records[key]["inputs"]) >= {"prompts/tinyworld_tune.txt", "prompts/tinyworld_train.txt"}


def test_the_alarm_reruns_with_a_larger_monitor_trained_as_their_records_did():
    """results/tinyworld_alarms/lownoise_<task>/: a record's run trained again with a larger monitor (4x the record's
    eval_num_prompts, capped at the prompt file's size). Its settings are the record's but for the monitor's size (and
    the output folder), and its training rows (metrics.jsonl, kept to
    the statistics the train_ alarms read) are the record's exactly: only the measurement changed."""
    import yaml

    sys.path.insert(0, str(ROOT / "experiments"))
    import alarms_tinyworld as A

    alarms = RESULTS / "tinyworld_alarms"
    tasks = json.loads((alarms / "tasks.json").read_text())
    records = json.loads((alarms / "run_records.json").read_text())
    reruns = sorted(alarms.glob("lownoise_*"))
    assert reruns
    for d in reruns:
        name = A.run_name(d.name)
        settings = yaml.safe_load((d / "config.yaml").read_text())
        recorded = records[name]["settings"]
        assert settings["eval_num_prompts"] == 4 * recorded["eval_num_prompts"], d.name
        assert {k: v for k, v in settings.items() if k not in ("eval_num_prompts", "output_dir")} == {
            k: v for k, v in recorded.items() if k not in ("eval_num_prompts", "output_dir")}, d.name
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert rows == tasks[name]["training"], d.name


def test_the_frontier_runs_replayed_for_the_alarms_are_trained_as_the_frontier_records_say():
    """results/tinyworld_alarms/frontier_heldout_<task>/: a frontier configuration trained again with a dense monitor
    (every 20 iterations on the frontier's balanced held-out set) to time its damage, with the training rows the
    train_ alarms read. Its settings are the frontier record's but for the monitor, the length and what is saved."""
    import yaml

    records = json.loads((RESULTS / "tinyworld_frontier" / "run_records.json").read_text())
    reruns = sorted((RESULTS / "tinyworld_alarms").glob("frontier_heldout_*"))
    assert reruns
    # alarm_window (3, the default) is newer than the frontier's records; with no alarm it reads nothing
    monitor = ("num_iterations", "eval_every", "eval_num_prompts", "checkpoint_every", "keep_best", "alarms",
               "alarm_window", "output_dir")
    for d in reruns:
        settings = yaml.safe_load((d / "config.yaml").read_text())
        recorded = records[d.name.removeprefix("frontier_heldout_")]["settings"]
        assert {k: v for k, v in settings.items() if k not in monitor} == {
            k: v for k, v in recorded.items() if k not in monitor}, d.name
        assert settings["eval_prompts"] == "results/tinyworld_frontier/heldout_balanced.txt"
        assert settings["eval_num_prompts"] == 0 and settings["num_iterations"] <= recorded["num_iterations"]
        # a shorter run is the record's first iterations only while the learning rate does not depend on the length
        assert settings["lr_scheduler"] == "constant", d.name
        n = settings["num_iterations"]
        rows = [json.loads(line) for line in (d / "eval_metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in rows] == list(range(0, n + 1, 20)), d.name
        training = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["iteration"] for r in training] == list(range(n)) and all("w2" in r for r in training), d.name
