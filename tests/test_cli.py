"""The training CLI as a user of diffusers' scripts meets it: their names, flags, a readable --help, and bad input
answered at once (exit 2, before torch loads) without leaving anything in output_dir."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import train_sd3_adrpo
from sd3_adrpo.config import ConfigError, build_parser, load_yaml, parse_args
from sd3_adrpo.tracking import banner

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def test_diffusers_names_and_boolean_flags():
    cfg = parse_args(["--config", TINY, "--pretrained_model_name_or_path", "org/model", "--rank", "4",
                      "--use_8bit_adam", "--gradient_checkpointing", "--no-adv_clip", "--resume_from_checkpoint",
                      "latest", "--lora_layers", "to_q,to_v", "--tracker_project_name", "p"])
    assert (cfg.pretrained_model, cfg.lora_rank, cfg.optimizer) == ("org/model", 4, "adamw8bit")
    assert cfg.gradient_checkpointing is True and cfg.adv_clip is False and cfg.resume_from == "latest"
    assert cfg.lora_targets == ["to_q", "to_v"] and cfg.wandb_project == "p"
    assert parse_args(["--config", TINY]).drop_t5 is True  # the file's value ...
    assert parse_args(["--config", TINY, "--no-drop_t5"]).drop_t5 is False  # ... and the flag's
    # what scripts and tests already write keeps working
    cfg = parse_args(["--config", TINY, "--gradient_checkpointing", "false", "--drop_t5=false", "--cpu", "true"])
    assert (cfg.gradient_checkpointing, cfg.drop_t5, cfg.cpu) == (False, False, True)
    with pytest.raises(ConfigError, match="takes no value"):
        parse_args(["--no-drop_t5", "true"])
    with pytest.raises(ConfigError, match="drop_t5: expected bool"):
        parse_args(["--drop_t5", "maybe"])
    with pytest.raises(ConfigError, match="Did you mean 'rank' \\(diffusers' name for 'lora_rank'\\)"):
        parse_args(["--rnak", "4"])


def test_diffusers_names_in_yaml(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("pretrained_model_name_or_path: org/model\nrank: 2\nuse_8bit_adam: true\n")
    cfg = parse_args(["--config", str(path)])
    assert (cfg.pretrained_model, cfg.lora_rank, cfg.optimizer) == ("org/model", 2, "adamw8bit")
    path.write_text("rank: 2\nlora_rank: 4\n")
    with pytest.raises(ConfigError, match="sets 'lora_rank' twice"):
        parse_args(["--config", str(path)])


def test_help_is_grouped_typed_and_shows_the_config_values():
    text = build_parser(load_yaml(TINY), "configs/tiny.yaml").format_help()
    assert "OPTIONAL" not in text
    headings = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert headings[:4] == ["options", "model", "prompts", "reward"] and "ADRPO" in headings and "outputs" in headings
    assert "--beta0 FLOAT" in text and "--lora_rank INT, --rank INT" in text
    assert "--gradient_checkpointing [BOOL], --no-gradient_checkpointing" in text
    flat = " ".join(text.split())
    assert "(default: 0.5, from configs/tiny.yaml)" in flat  # beta0 in tiny.yaml; the dataclass default is 1.0
    assert "(default: 1.0)" in flat  # a key the file leaves alone shows the built-in default
    assert "--use_8bit_adam diffusers' name for --optimizer adamw8bit" in flat
    result = subprocess.run([sys.executable, "train_sd3_adrpo.py", "--config", "configs/tiny.yaml", "--help"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and "from configs/tiny.yaml" in result.stdout


def test_a_config_error_answers_before_torch_is_imported():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-X", "importtime", "train_sd3_adrpo.py", "--config", "configs/tiny.yaml",
                             "--beta0", "0"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 2 and "beta0 must be > 0" in result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "yaml" in imported  # the import trace is there ...
    assert not imported & {"torch", "diffusers", "transformers", "accelerate"}  # ... and holds none of these


@pytest.fixture
def run_args(tiny_models, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    return ["--config", "configs/tiny_random.yaml", "--pretrained_model", str(tiny_models["sd3"]),
            "--reward_model", str(tiny_models["clip"]), "--train_prompts", str(prompts), "--eval_prompts",
            str(prompts), "--prompts_per_iteration", "2", "--samples_per_prompt", "2", "--train_batch_size", "2"]


def _bad_prompt_file(tmp_path, kind):
    path = tmp_path / f"{kind}.txt"
    path.write_bytes({"empty": b"", "comments": b"# only a comment\n\n   \n# another\n",
                      "latin1": "caf\u00e9 red circle\n".encode("latin-1")}[kind])
    return path


@pytest.mark.parametrize("case, message", [
    ("empty", "no prompts found; write one prompt per line"),
    ("comments", "no prompts found; write one prompt per line"),
    ("latin1", "not UTF-8 text .*re-save it as UTF-8"),
    ("output_file", "is a file, not a folder: choose another output_dir"),
    ("hub_id", "could not be loaded from the hub .*pass a local diffusers folder"),
])
def test_bad_input_exits_2_saying_what_to_do_and_writes_nothing(run_args, tmp_path, monkeypatch, capsys, case,
                                                                 message):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "out"
    args = [*run_args, "--output_dir", str(out)]
    if case in ("empty", "comments", "latin1"):
        args += ["--train_prompts", str(_bad_prompt_file(tmp_path, case))]
    elif case == "output_file":
        out.write_text("not a folder")
    else:  # offline, a hub id that is not in the cache fails at load time, after the reward has loaded
        args += ["--pretrained_model", "no-such-org/no-such-model"]
    for attempt in range(2):  # the same rerun gets the same answer (nothing left behind makes it "not empty")
        assert train_sd3_adrpo.main(args) == 2
        assert re.search(message, capsys.readouterr().err), case
    if case == "output_file":
        assert out.read_text() == "not a folder"
    else:
        assert not out.exists() or {p.name for p in out.iterdir()} <= {".lock"}  # no config.yaml


def test_banner_numbers_are_the_runs():
    cfg = parse_args(["--config", TINY])  # 8 prompts x 8 samples, batch 16, inner_epochs 4, split over processes
    two = banner(cfg.per_process(2), 2)
    # 64 images per iteration; 16 samples per optimizer step; 64 / 16 * 4 epochs = 16 steps per iteration
    assert "8 prompts x 8 samples = 64 images" in two
    assert "effective batch 16 samples per optimizer step (train_batch_size 8 x gradient_accumulation_steps 1 x 2" in two
    assert "16 optimizer step(s) per iteration" in two
    assert "120 iterations = 1920 optimizer steps, 7680 images sampled" in two
    assert "adrpo on assets/tinyworld/sd3" in two and "beta0 0.5" in two and "runs/tiny" in two
    one = banner(cfg, 1)  # the same run on one process: the same images and steps, a batch twice the size
    assert "effective batch 16 samples per optimizer step (train_batch_size 16 x gradient_accumulation_steps 1 x 1" in one
    assert one.splitlines()[-2:] == two.splitlines()[-2:] and one.splitlines()[2] == two.splitlines()[2]
