"""Fault injection: kills, signals, corrupt checkpoints, non-finite rewards/losses, malformed rewards."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_sd3_adrpo
from sd3_adrpo.rewards import REWARDS, ClipScoreReward, register_reward

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_args(tiny_models, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts") / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\na yellow square\n")
    return ["--config", str(ROOT / "configs/tiny_random.yaml"), "--pretrained_model", str(tiny_models["sd3"]),
            "--reward_model", str(tiny_models["clip"]), "--train_prompts", str(prompts), "--eval_prompts", "null",
            "--num_iterations", "4", "--prompts_per_iteration", "2", "--samples_per_prompt", "2",
            "--train_batch_size", "2", "--num_inference_steps", "3", "--checkpoint_every", "1",
            "--checkpoints_total_limit", "5", "--learning_rate", "1e-2"]


@pytest.fixture(scope="module")
def straight(run_args, tmp_path_factory):
    """An uninterrupted 4-iteration run to compare interrupted ones against."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out)]) == 0
    return out


def _lora(out):
    return load_file(out / "final" / "pytorch_lora_weights.safetensors")


def _same_lora(a, b):
    la, lb = _lora(a), _lora(b)
    return la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)


def _iterations(out):
    return [json.loads(line)["iteration"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def _start(args):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, str(ROOT / "train_sd3_adrpo.py"), *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_sigkill_then_resume_gives_the_same_lora_and_a_gapless_log(run_args, straight, tmp_path):
    out = tmp_path / "run"
    proc = _start([*run_args, "--output_dir", str(out)])
    _wait_for(out / "checkpoints" / "checkpoint-000002", proc)
    proc.kill()
    proc.wait()
    assert not (out / "final").exists()
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--resume_from", "latest"]) == 0
    assert _iterations(out) == [0, 1, 2, 3]
    assert _same_lora(out, straight)


def test_sigterm_saves_a_checkpoint_and_exits_with_the_signal_code(run_args, straight, tmp_path):
    out = tmp_path / "run"
    proc = _start([*run_args, "--output_dir", str(out)])
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "--resume_from latest" in err
    assert not (out / "final").exists()
    done = len(_iterations(out))
    assert (out / "checkpoints" / f"checkpoint-{done:06d}").is_dir()
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--resume_from", "latest"]) == 0
    assert _iterations(out) == [0, 1, 2, 3] and _same_lora(out, straight)


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(run_args, straight, tmp_path, capsys):
    out = tmp_path / "run"
    proc = _start([*run_args, "--output_dir", str(out)])
    _wait_for(out / "checkpoints" / "checkpoint-000003", proc)
    proc.kill()
    proc.wait()
    victim = out / "checkpoints" / "checkpoint-000003" / "optimizer.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])  # truncated, as by a full disk
    capsys.readouterr()
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--resume_from", "latest"]) == 0
    printed = capsys.readouterr().out
    assert "not resuming from" in printed and "checkpoint-000003" in printed and "at iteration 2" in printed
    assert _iterations(out) == [0, 1, 2, 3] and _same_lora(out, straight)


def test_no_intact_checkpoint_is_a_clear_error(run_args, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "checkpoints" / "checkpoint-000001").mkdir(parents=True)  # a checkpoint, but not an intact one
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--resume_from", "latest"]) == 2
    assert "no intact checkpoint" in capsys.readouterr().err


class _Flaky(ClipScoreReward):
    """CLIP score, with NaN for every third image (or every image)."""

    every = 3

    def __call__(self, images, prompts):
        r = super().__call__(images, prompts)
        r[:: self.every] = float("nan")
        return r


class _AllNaN(_Flaky):
    every = 1


class _WrongShape(ClipScoreReward):
    def __call__(self, images, prompts):
        return super().__call__(images, prompts)[:-1]


for _name, _cls in {"test_flaky": _Flaky, "test_all_nan": _AllNaN, "test_wrong_shape": _WrongShape}.items():
    if _name not in REWARDS:
        register_reward(_name)(_cls)


def test_non_finite_rewards_drop_those_samples(run_args, tmp_path):
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--reward", "test_flaky",
                                 "--num_iterations", "2"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["n_dropped"] for r in rows] == [2, 2]  # 4 samples per iteration, indices 0 and 3
    assert all(r["optimizer_steps"] == 2 and r["reward_mean"] == r["reward_mean"] for r in rows)
    assert all(torch.isfinite(v).all() for v in _lora(out).values())


def test_all_rewards_non_finite_stops_with_a_checkpoint(run_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--reward", "test_all_nan",
                                 "--max_bad_iterations", "2"]) == 1
    err = capsys.readouterr().err
    assert "stopped after iteration 1" in err and "score: every reward was non-finite" in err
    assert (out / "checkpoints" / "checkpoint-000002").is_dir() and not (out / "final").exists()


def test_reward_of_the_wrong_shape_is_caught_before_the_first_rollout(run_args, tmp_path, capsys):
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(tmp_path / "run"), "--reward", "test_wrong_shape"]) == 2
    assert "returned shape (1,) for 2 images at the start-up check" in capsys.readouterr().err


def test_non_finite_loss_skips_the_step(tiny_models):
    from test_trainer import _setup

    from sd3_adrpo.rollout import make_generator
    from sd3_adrpo.update import update

    cfg, pipe, accelerator, transformer, opt, sched, sampler = _setup(tiny_models, batch=16)
    rollout = sampler.sample(["a", "b", "c", "d"], 4, 64, make_generator(0))
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items() if "lora_" in k}
    adv = torch.zeros(16)
    adv[5] = float("inf")
    stats = update(accelerator, transformer, pipe.transformer, opt, sched, rollout, (adv, cfg.beta0 - adv), cfg, (0,))
    assert stats["nonfinite_loss"] == 1 and stats["optimizer_steps"] == 0
    after = pipe.transformer.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_long_prompts_warn(tiny_pipe, capsys):
    from sd3_adrpo.trainer import _warn_long_prompts

    _warn_long_prompts(tiny_pipe, ["a red circle", "a " + "very " * 30 + "long prompt"])
    assert "1 of 2 prompts exceed the CLIP context (16 tokens)" in capsys.readouterr().out


def test_a_second_sigterm_stops_at_once_with_its_own_exit_code_and_no_traceback(run_args, tmp_path):
    out = tmp_path / "run"
    proc = _start([*run_args, "--output_dir", str(out), "--num_iterations", "50", "--checkpoint_every", "0"])
    _wait_for(out / "metrics.jsonl", proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    # mostly the second arrives within the iteration; if the first came at its very end, the run was already
    # stopping with a checkpoint, and the second is ignored, never fatal
    assert "stopped at once by a second SIGTERM" in err or "checkpoint saved to" in err


def test_a_sigterm_during_the_final_evaluation_lets_it_finish_and_says_so(run_args, tmp_path):
    prompts = tmp_path / "final.txt"
    prompts.write_text("".join(f"a {c} {s}\n" for c in ("red", "blue", "green", "yellow") for s in ("circle", "square")))
    out = tmp_path / "run"
    proc = _start([*run_args, "--output_dir", str(out), "--num_iterations", "1", "--final_eval_prompts", str(prompts),
                   "--final_eval_images_per_prompt", "8"])
    for line in proc.stdout:  # the LoRA is written, the final evaluation begins
        if line.startswith("done: LoRA saved"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "during the final phase, which finished" in err
    assert (out / "summary.json").is_file() and (out / "final" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("text, says", [("learning_rate: [1e-3\n", "not a plain YAML mapping"),
                                        ("seed: !!python/object/apply:os.system [ls]\n", "not a plain YAML mapping")])
def test_a_broken_or_tagged_yaml_config_exits_2_with_a_message(tmp_path, capsys, text, says):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert train_sd3_adrpo.main(["--config", str(path)]) == 2
    assert says in capsys.readouterr().err


def test_a_full_disk_exits_2_saying_what_to_do(run_args, tmp_path, capsys, monkeypatch):
    import errno

    from sd3_adrpo import trainer

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoints"))

    monkeypatch.setattr(trainer, "save_checkpoint", full)
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "the disk is full" in err and "--resume_from latest" in err


def test_divergence_is_blamed_on_the_update_and_the_diverged_weights_are_not_kept(run_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--learning_rate", "1e12",
                                 "--max_grad_norm", "0", "--num_iterations", "6"]) == 1
    err = capsys.readouterr().err
    # the weights stay finite (huge) while the rollouts overflow: the stage is the sampling, not the reward
    assert "sample: every rollout latent was non-finite" in err and "score:" not in err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    good = max(r["iteration"] for r in rows if r["n_dropped"] < 4)  # the last iteration whose rollout was usable
    assert f"the start of iteration {good}) is saved" in err
    saved = load_file(out / "checkpoints" / f"checkpoint-{good:06d}" / "trainable.safetensors")
    assert max(float(v.abs().max()) for v in saved.values()) < 1e3  # not the diverged weights
    from sd3_adrpo.checkpoint import find_resume_checkpoint

    assert find_resume_checkpoint("latest", out).name == f"checkpoint-{good:06d}"  # the diverged ones are set aside
    assert list((out / "checkpoints").glob("diverged-checkpoint-*")) and not (out / "final").exists()



def test_after_a_stop_late_signals_are_ignored_by_the_operating_system(tmp_path):
    """A script exiting after a stop ignores SIGINT/SIGTERM at the OS level (Python resets its own handlers to the
    default during shutdown, so a signal then used to kill the process: exit -15 instead of 143)."""
    script = tmp_path / "late.py"
    script.write_text("import os, signal, sys\n"
                      "from sd3_adrpo.guards import block_late_signals\n"
                      "block_late_signals()\n"
                      "assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN\n"
                      "os.kill(os.getpid(), signal.SIGTERM)\n"
                      "os.kill(os.getpid(), signal.SIGINT)\n"
                      "sys.exit(143)\n")
    result = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 143, result.stderr
