"""Every scorer of the registry as a training reward, through the CLI on the tiny stand-ins: alone, weighted, as a
plug-in file, and served by a reward server process that dies mid-run."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import train_sd3_adrpo

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = "a red circle\na blue square\na green triangle\ntwo yellow squares\n"


def _blip_family():
    spec = importlib.util.spec_from_file_location("blip_family_fixtures", ROOT / "tests/metrics/test_blip_family.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run_args(tiny_models, tmp_path_factory):
    prompts = tmp_path_factory.mktemp("prompts") / "p.txt"
    prompts.write_text(PROMPTS)
    return ["--config", str(ROOT / "configs/tiny_random.yaml"), "--pretrained_model", str(tiny_models["sd3"]),
            "--reward_model", str(tiny_models["clip"]), "--train_prompts", str(prompts), "--eval_prompts", "null",
            "--num_iterations", "2", "--prompts_per_iteration", "2", "--samples_per_prompt", "2",
            "--train_batch_size", "4", "--num_inference_steps", "2", "--checkpoint_every", "1"]


@pytest.fixture(scope="module")
def stand_ins(tiny_models, tiny_open_clip, tmp_path_factory):
    """Weights of the right layouts for every scorer (random, small), as the reward: forms name them."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from sd3_adrpo.metrics.base import LinearHead

    out = tmp_path_factory.mktemp("stand_ins")
    cfg = CLIPConfig.from_pretrained(tiny_models["clip"])
    cfg.projection_dim = 768  # what the LAION aesthetic head takes
    torch.manual_seed(1)
    CLIPModel(cfg).save_pretrained(out / "clip768")
    CLIPProcessor.from_pretrained(tiny_models["clip"]).save_pretrained(out / "clip768")
    torch.manual_seed(2)
    torch.save(LinearHead(768).state_dict(), out / "aesthetic_head.pth")
    name, model = tiny_open_clip
    torch.save(model.state_dict(), out / "open_clip.pt")
    torch.save({"state_dict": model.state_dict()}, out / "HPS_tiny.pt")
    blip = _blip_family()
    bert = out / "bert"
    from transformers import BertTokenizer

    BertTokenizer(vocab={w: i for i, w in enumerate(blip.WORDS)}).save_pretrained(bert)
    torch.save(blip._random_state({**blip.BLIP_SHAPES, **blip.MLP_SHAPES}), out / "ImageReward.pt")
    torch.save({"model": {k[len("blip."):]: v for k, v in blip._random_state(blip.BLIP_SHAPES, seed=1).items()}},
               out / "model_large.pth")
    blip_options = {"med_config": blip.MED, "vision": blip.VISION, "tokenizer": str(bert)}
    clip = str(tiny_models["clip"])
    return {
        "clip": "clip",
        "clip_score": f"clip_score@{clip}",
        "open_clip": _flow({"open_clip": {"model": name, "pretrained": str(out / "open_clip.pt")}}),
        "pickscore": f"pickscore@{clip}",
        "aesthetic": _flow({"aesthetic": {"model": str(out / "aesthetic_head.pth"), "clip": str(out / "clip768")}}),
        "hpsv2": _flow({"hpsv2": {"model": str(out / "HPS_tiny.pt"), "arch": name}}),
        "image_reward": _flow({"image_reward": {"model": str(out / "ImageReward.pt"), **blip_options}}),
        "blip_score": _flow({"blip_score": {"model": str(out / "model_large.pth"), **blip_options}}),
        "oracle": "tinyworld.scorers:Oracle",
    }


def _flow(mapping) -> str:
    """A mapping as one YAML flow line for --reward (JSON's 1e-12 would read back as a string in YAML 1.1)."""
    return yaml.safe_dump(mapping, default_flow_style=True, width=10**6).strip()


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("scorer", ["clip", "clip_score", "open_clip", "pickscore", "aesthetic", "hpsv2",
                                    "image_reward", "blip_score", "oracle"])
def test_each_scorer_trains_as_a_reward(scorer, run_args, stand_ins, tmp_path):
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--reward", stand_ins[scorer]]) == 0
    rows = _rows(out)
    key = {"oracle": "oracle_accuracy"}.get(scorer, scorer)
    assert [r["iteration"] for r in rows] == [0, 1] and all(r["optimizer_steps"] == 1 for r in rows)
    assert all(r[f"reward_{key}_mean"] == pytest.approx(r["reward_mean"], rel=1e-5, abs=1e-6) for r in rows)
    assert all(r[f"reward_{key}_group_std"] >= 0 for r in rows)
    if scorer != "oracle":  # (the untrained stand-in may fail every image) a real score varies between the images:
        assert all(r[f"reward_{key}_group_std"] > 0 for r in rows)  # a constant (e.g. zero) reward would not
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()


def test_a_weighted_reward_from_the_command_line_logs_each_scorer(run_args, tiny_models, tmp_path, capsys):
    out = tmp_path / "run"
    reward = f"clip=1,clip_score@{tiny_models['clip']}=0.5,tinyworld.scorers:Oracle=2"
    assert train_sd3_adrpo.main([*run_args, "--output_dir", str(out), "--reward", reward]) == 0
    assert "reward: 1 * clip + 0.5 * clip_score + 2 * oracle_accuracy" in capsys.readouterr().out
    for r in _rows(out):
        combined = r["reward_clip_mean"] + 0.5 * r["reward_clip_score_mean"] + 2 * r["reward_oracle_accuracy_mean"]
        assert r["reward_mean"] == pytest.approx(combined, rel=1e-4, abs=1e-4)  # the mean of a weighted sum
        assert {"reward_clip_group_std", "reward_clip_score_group_std", "reward_oracle_accuracy_group_std"} <= set(r)


PLUGIN = '''
import numpy as np
from sd3_adrpo.metrics import Metric


class Redness(Metric):
    """Mean red minus mean green/blue, as a verifiable toy reward."""

    def __call__(self, images, prompts):
        x = np.asarray(images, float)
        return x[..., 0].mean(axis=(1, 2)) - x[..., 1:].mean(axis=(1, 2, 3))


class Wrong(Metric):
    def __call__(self, images, prompts):
        return [[0.0, 1.0]] * len(prompts)
'''


def test_a_plugin_file_outside_the_package_through_the_cli(run_args, tmp_path):
    plugin = tmp_path / "elsewhere" / "my_reward.py"
    plugin.parent.mkdir()
    plugin.write_text(PLUGIN)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(ROOT / "train_sd3_adrpo.py"), *run_args, "--output_dir", str(out)]
    done = subprocess.run([*cmd, "--reward", f"{plugin}:Redness"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["iteration"] for r in _rows(out)] == [0, 1] and "reward_Redness_mean" in _rows(out)[0]
    # a wrong return shape stops before the first rollout: exit 2, naming the file and the fix, nothing written
    bad = subprocess.run([*cmd[:-1], str(tmp_path / "bad"), "--reward", f"{plugin}:Wrong"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr
    assert f"class Wrong in {plugin}" in bad.stderr and "returned shape (2, 2) for 2 images" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad" / "metrics.jsonl").exists()
    plugin.with_name("typo.py").write_text("import numpy as np\nfrom sd3_adrpo.metrics import Metrc\n")
    typo = train_sd3_adrpo.main([*run_args, "--output_dir", str(tmp_path / "typo"), "--reward",
                                 f"{plugin.with_name('typo.py')}:Redness"])
    assert typo == 2


def _start_server(reward, tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "sd3_adrpo.reward_server", "--reward", reward, "--port", "0",
                             "--device", "cpu"], cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # "serving clip on http://127.0.0.1:PORT ..."
    if "serving" not in line:
        proc.kill()
        raise AssertionError(f"the server did not start: {line!r} {proc.stderr.read()}")
    return proc, line.split(" on ")[1].split()[0]


def test_reward_server_trains_then_a_killed_server_stops_the_run_with_its_checkpoint(run_args, tiny_models, tmp_path):
    from safetensors.torch import load_file

    from sd3_adrpo.checkpoint import list_checkpoints

    server, url = _start_server(f"clip@{tiny_models['clip']}", tmp_path)
    trainer = None
    try:
        assert url.startswith("http://127.0.0.1:")
        out = tmp_path / "run"
        trainer = subprocess.Popen(
            [sys.executable, str(ROOT / "train_sd3_adrpo.py"), *run_args, "--output_dir", str(out), "--num_iterations",
             "200", "--reward", _flow({url: {"timeout": 10, "retries": 1, "backoff": 0.2}})],
            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True)
        deadline = time.time() + 240
        while time.time() < deadline and trainer.poll() is None:
            if (out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2:
                break
            time.sleep(0.2)
        rows = _rows(out)
        assert len(rows) >= 2 and all(r["reward_clip_mean"] == pytest.approx(r["reward_mean"]) for r in rows[:2])
        server.send_signal(signal.SIGKILL)  # mid-run
        server.wait(timeout=30)
        _, err = trainer.communicate(timeout=240)
        assert trainer.returncode == 1, err
        assert f"reward server {url} did not answer" in err and "No reward was made up" in err, err
        assert "--resume_from latest" in err and "Traceback" not in err
        stopped_at = len(_rows(out))  # the rows written are the iterations that completed
        last = list_checkpoints(out / "checkpoints")[-1]
        assert last.name == f"checkpoint-{stopped_at:06d}" and str(last) in err
        assert json.loads((last / "state.json").read_text())["trainer"]["iteration"] == stopped_at
        assert all(torch.isfinite(v).all() for v in load_file(last / "trainable.safetensors").values())
        assert not (out / "final").exists()
    finally:
        for proc in (server, trainer):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def test_prompt_metadata_reaches_a_verifiable_reward_in_training(run_args, verifiable_prompts, tmp_path, capsys):
    # free wording the oracle cannot parse: it can only verify these images through each row's GenEval-style fields
    prompts, rows = verifiable_prompts
    out = tmp_path / "run"
    args = [*run_args, "--output_dir", str(out), "--train_prompts", str(prompts)]
    assert train_sd3_adrpo.main([*args, "--reward", _flow({"tinyworld.scorers:Oracle": {"partial": True}})]) == 0
    assert all(0 <= r["reward_oracle_accuracy_mean"] <= 1 for r in _rows(out))
    # the same prompts without their metadata (a .txt file) are outside the grammar: the start-up check says so
    (tmp_path / "plain.txt").write_text("\n".join(r["prompt"] for r in rows) + "\n")
    assert train_sd3_adrpo.main([*args[:-1], str(tmp_path / "plain.txt"), "--output_dir", str(tmp_path / "plain"),
                                 "--reward", "tinyworld.scorers:Oracle"]) == 2
    assert "judges only prompts of its grammar" in capsys.readouterr().err


def test_prompt_metadata_reaches_the_held_out_grids_evaluations_and_judges(run_args, tiny_models, verifiable_prompts,
                                                                            tmp_path):
    """Held-out prompts in free wording with GenEval-style fields: the sample grids, the periodic evaluation and the
    final evaluation score them through their fields (the reward and the oracle as a judge), instead of stopping the
    run at the first grid because the oracle cannot parse the wording."""
    prompts, rows = verifiable_prompts
    out = tmp_path / "run"
    args = [*run_args, "--output_dir", str(out), "--train_prompts", str(prompts), "--eval_prompts", str(prompts),
            "--final_eval_prompts", str(prompts), "--final_eval_images_per_prompt", "2", "--sample_every", "1",
            "--num_sample_prompts", "2", "--eval_every", "1", "--eval_num_prompts", "2", "--eval_images_per_prompt",
            "2", "--final_eval_clip_model", str(tiny_models["clip"]), "--judges", "tinyworld.scorers:Oracle",
            "--reward", _flow({"tinyworld.scorers:Oracle": {"partial": True}})]
    assert train_sd3_adrpo.main(args) == 0
    evals = [json.loads(line) for line in (out / "eval_metrics.jsonl").read_text().splitlines()]
    assert len(evals) == 3 and all(0 <= r["reward"] <= 1 and 0 <= r["oracle_accuracy"] <= 1 for r in evals)
    assert all(0 <= r["eval_reward_mean"] <= 1 for r in _rows(out))  # the grids' rewards
    summary = json.loads((out / "summary.json").read_text())
    assert "oracle_accuracy" in json.dumps(summary)


def test_a_reward_server_down_at_start_up_exits_2_before_the_first_rollout(run_args, tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    code = train_sd3_adrpo.main([*run_args, "--output_dir", str(tmp_path / "run"), "--reward",
                                 _flow({url: {"retries": 1, "backoff": 0.01, "timeout": 2}})])
    err = capsys.readouterr().err
    assert code == 2 and f"reward server {url} did not answer" in err and "python -m sd3_adrpo.reward_server" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
