"""The run folder across restarts: torn logs, malformed manifests, the lock, settings changed on resume, and a
requeued job killed before its first checkpoint."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

import train_sd3_adrpo
from sd3_adrpo.checkpoint import find_resume_checkpoint, save_checkpoint, truncate_metrics, verify_checkpoint
from sd3_adrpo.config import ConfigError, make_config
from sd3_adrpo.io import atomic_write_bytes, read_jsonl
from sd3_adrpo.resume import (RunLock, apply_optimizer_settings, can_start_over, check_resume_config,
                              config_changes)

ROOT = Path(__file__).resolve().parents[1]


def test_a_torn_last_line_is_dropped_with_a_warning_and_resume_rewrites_the_log(tmp_path, capsys):
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"iteration": 0, "loss": 1.5}\n{"iteration": 1, "loss": 1.25}\n{"iteration": 2, "lo')
    assert [r["iteration"] for r in read_jsonl(log)] == [0, 1]
    assert "torn last line 3" in capsys.readouterr().out
    truncate_metrics(log, 5)
    assert log.read_text() == '{"iteration": 0, "loss": 1.5}\n{"iteration": 1, "loss": 1.25}\n'
    log.write_text('{"iteration": 0}\n{"iter\n{"iteration": 2}\n')  # damage inside the log is not a torn line
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        read_jsonl(log)


def _checkpoint(root, step):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return save_checkpoint(root, step, model, opt, sched, {"iteration": step}, keep=5)


@pytest.mark.parametrize("manifest", ["[]", "{}", '{"state.json": {"bytes": 1}}', "not json", '"a string"'])
def test_a_manifest_of_any_wrong_shape_falls_back_to_the_previous_checkpoint(tmp_path, manifest):
    first, second = _checkpoint(tmp_path / "checkpoints", 1), _checkpoint(tmp_path / "checkpoints", 2)
    (second / "manifest.json").write_text(manifest)
    with pytest.raises(ValueError, match="manifest.json"):
        verify_checkpoint(second)
    assert find_resume_checkpoint("latest", tmp_path) == first


def test_the_lock_excludes_a_second_run_names_its_holder_and_dies_with_its_process(tmp_path):
    with RunLock(tmp_path):
        assert f"pid {os.getpid()}" in RunLock.holder(tmp_path)
        with pytest.raises(ConfigError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).__enter__()
    assert RunLock.holder(tmp_path) is None
    with RunLock(tmp_path):  # released: it can be taken again
        pass
    code = textwrap.dedent(f"""
        import time
        from sd3_adrpo.resume import RunLock
        RunLock({str(tmp_path)!r}).__enter__()
        print("locked", flush=True)
        time.sleep(60)""")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    assert f"pid {proc.pid}" in RunLock.holder(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert RunLock.holder(tmp_path) is None  # a killed run holds nothing


def test_settings_changed_on_resume_are_refused_listed_or_applied_when_asked():
    saved = {**make_config({}).__dict__, "learning_rate": 1e-3}
    saved.pop("loss_guidance")  # a setting added after the run was started counts as its default
    cfg = make_config({"learning_rate": 2e-3, "beta0": 0.5, "num_iterations": 500, "checkpoint_every": 7})
    assert config_changes(saved, cfg) == {"learning_rate": (1e-3, 2e-3), "beta0": (1.0, 0.5)}
    with pytest.raises(ConfigError, match=r"beta0: 1.0 -> 0.5; learning_rate: 0.001 -> 0.002.*--allow_config_change"):
        check_resume_config(saved, cfg)
    allowed = make_config({"learning_rate": 2e-3, "allow_config_change": True})
    assert check_resume_config(saved, allowed) == {"learning_rate": (1e-3, 2e-3)}
    with pytest.raises(ConfigError, match="cannot change shape"):
        check_resume_config(saved, make_config({"lora_rank": 4, "allow_config_change": True}))


def test_a_new_learning_rate_reaches_the_restored_optimizer_and_schedule():
    from diffusers.optimization import get_scheduler

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=4, num_training_steps=10)
    for _ in range(2):
        opt.step()
        sched.step()
    state_opt, state_sched = opt.state_dict(), sched.state_dict()
    opt2 = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched2 = get_scheduler("constant_with_warmup", opt2, num_warmup_steps=4, num_training_steps=10)
    opt2.load_state_dict(state_opt)
    sched2.load_state_dict(state_sched)  # what a resume restores: the old rate
    apply_optimizer_settings(opt2, sched2, make_config({"learning_rate": 5e-3, "adam_weight_decay": 0.0}))
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-3 * 2 / 4) and sched2.get_last_lr()[0] == opt2.param_groups[0]["lr"]
    for _ in range(3):
        opt2.step()
        sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(5e-3) and opt2.param_groups[0]["weight_decay"] == 0.0


def test_only_a_folder_with_what_a_start_writes_can_start_over(tmp_path):
    out = tmp_path / "run"
    assert can_start_over(out)  # not there yet
    (out / "samples").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl"):
        (out / name).write_text("")
    (out / "checkpoints" / ".tmp-checkpoint-000002").mkdir(parents=True)  # a checkpoint write cut off
    assert can_start_over(out)
    (out / "checkpoints" / "checkpoint-000001").mkdir()
    assert not can_start_over(out)
    (out / "checkpoints" / "checkpoint-000001").rmdir()
    (out / "notes.txt").write_text("mine")
    assert not can_start_over(out)


@pytest.fixture(scope="module")
def run_args(tiny_models, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts") / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow square\n")
    return ["--config", str(ROOT / "configs/tiny_random.yaml"), "--pretrained_model", str(tiny_models["sd3"]),
            "--reward_model", str(tiny_models["clip"]), "--train_prompts", str(prompts), "--eval_prompts", "null",
            "--num_iterations", "3", "--prompts_per_iteration", "2", "--samples_per_prompt", "2",
            "--train_batch_size", "2", "--num_inference_steps", "2", "--checkpoint_every", "1",
            "--learning_rate", "1e-2"]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_latest_before_the_first_checkpoint_starts_over(run_args, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text(yaml.safe_dump({"seed": 0}))
    (out / "metrics.jsonl").write_text('{"iteration": 0, "stale": true}\n{"iteration": 1, "st')  # killed mid-line
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--resume_from", "latest"]) == 0
    assert "starts over" in capsys.readouterr().out
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [0, 1, 2] and not any("stale" in r for r in rows)
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_a_changed_learning_rate_on_resume_is_refused_or_really_applied(run_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--num_iterations", "2"]) == 0
    resume = [*run_args, "--output_dir", str(out), "--resume_from", "latest", "--learning_rate", "3e-2"]
    capsys.readouterr()
    assert train_sd3_adrpo.main(resume) == 2
    assert "learning_rate: 0.01 -> 0.03" in capsys.readouterr().err
    assert yaml.safe_load((out / "config.yaml").read_text())["learning_rate"] == 0.01  # nothing was touched
    assert train_sd3_adrpo.main([*resume, "--allow_config_change", "true"]) == 0
    # resumed from the checkpoint after iteration 0 (the 2-iteration run's last): the optimizer's rate changed there
    assert [r["lr"] for r in _rows(out)] == [0.01, 0.03, 0.03]
    history = [json.loads(x) for x in (out / "config_history.jsonl").read_text().splitlines()]
    assert history[0]["iteration"] == 1 and history[0]["changed"] == {"learning_rate": {"from": 0.01, "to": 0.03}}


def test_a_second_run_into_a_live_runs_folder_exits_2_naming_the_holder(run_args, tmp_path, capsys):
    out = tmp_path / "run"
    with RunLock(out):
        assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--resume_from", "latest"]) == 2
    assert f"in use by pid {os.getpid()}" in capsys.readouterr().err


def test_files_are_written_with_the_mode_an_ordinary_open_gives(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.json", b"{}")
        os.umask(0o077)
        atomic_write_bytes(tmp_path / "b.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc")
def test_writing_a_file_never_changes_the_process_umask(tmp_path, monkeypatch):
    # (setting it to 0 and back would let a thread's files, or a subprocess started meanwhile, be world-writable)
    def no_umask(mask):
        raise AssertionError(f"os.umask({mask:o}) called")

    old = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", no_umask)
        atomic_write_bytes(tmp_path / "c.json", b"{}")
    finally:
        monkeypatch.undo()
        os.umask(old)
    assert (tmp_path / "c.json").stat().st_mode & 0o777 == 0o640


def test_overwrite_output_dir_deletes_the_old_run_only_once_the_models_have_loaded(tiny_run_args, tmp_path, capsys):
    """--overwrite_output_dir with a base model that does not load (a hub id that does not resolve offline) exits 2
    and leaves the earlier run as it was; once the models load, the earlier run's files are gone."""
    import yaml

    import train_sd3_adrpo

    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*tiny_run_args, "--output_dir", str(out)]) == 0
    lora = (out / "final" / "pytorch_lora_weights.safetensors").read_bytes()
    assert (out / "checkpoints" / "checkpoint-000001").is_dir()
    failed = [*tiny_run_args, "--output_dir", str(out), "--overwrite_output_dir", "true"]
    failed[failed.index("--pretrained_model") + 1] = "sd3-adrpo-tests/no-such-model"
    assert train_sd3_adrpo.main(failed) == 2
    assert "could not be loaded" in capsys.readouterr().err
    assert (out / "final" / "pytorch_lora_weights.safetensors").read_bytes() == lora  # the earlier run is intact
    assert (out / "checkpoints" / "checkpoint-000001").is_dir()
    again = [*tiny_run_args, "--output_dir", str(out), "--overwrite_output_dir", "true", "--num_iterations", "1",
             "--checkpoint_every", "0"]
    assert train_sd3_adrpo.main(again) == 0
    assert not (out / "checkpoints").exists()  # the earlier run's checkpoints went with it
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert yaml.safe_load((out / "config.yaml").read_text())["num_iterations"] == 1


def test_replacing_a_folder_never_leaves_neither_the_old_nor_the_new_one(tmp_path, monkeypatch):
    from sd3_adrpo import io

    dest, tmp = tmp_path / "final", tmp_path / ".tmp-final"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    real, calls = os.replace, []

    def killed_after_the_first_rename(a, b):
        calls.append(a)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the process dies between moving the old folder aside and moving the new one in
        real(a, b)

    monkeypatch.setattr(io.os, "replace", killed_after_the_first_rename)
    with pytest.raises(KeyboardInterrupt):
        io.replace_folder(tmp, dest)
    assert (tmp_path / ".old-final" / "old.txt").read_text() == "old" and (tmp / "new.txt").read_text() == "new"
    monkeypatch.setattr(io.os, "replace", real)
    io.replace_folder(tmp, dest)  # the next attempt (the aside copy of a crashed one is cleared first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"] and (dest / "new.txt").read_text() == "new"
    assert not (dest / "old.txt").exists()
