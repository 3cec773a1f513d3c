import dataclasses

import pytest

from sd3_adrpo.config import ConfigError, TrainConfig, build_parser, parse_args

import train_sd3_adrpo


@pytest.fixture
def valid(tmp_path, tiny_models):
    """A minimal valid YAML config on the tiny models, plus its paths."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        f"pretrained_model: {tiny_models['sd3']}\nreward_model: {tiny_models['clip']}\ndrop_t5: true\n"
        f"train_prompts: {prompts}\neval_prompts: {prompts}\noutput_dir: {tmp_path / 'out'}\n"
        "prompts_per_iteration: 2\nsamples_per_prompt: 4\ntrain_batch_size: 4\nmixed_precision: no\n")
    return cfg


def test_yaml_then_command_line_overrides(valid):
    cfg = parse_args(["--config", str(valid), "--beta0", "2", "--lora_targets", "to_q,to_v",
                      "--adv_clip_min", "-0.5", "--adv_clip", "false", "--resume_from", "null"])
    assert cfg.beta0 == 2.0 and isinstance(cfg.beta0, float)
    assert cfg.lora_targets == ["to_q", "to_v"]
    assert cfg.adv_clip_min == -0.5 and cfg.adv_clip is False and cfg.clip_range is None
    assert cfg.mixed_precision == "no"  # YAML's bare `no` is read as false; the key still means fp32
    assert cfg.samples_per_prompt == 4  # from the file
    cfg.validate()


def test_default_clip_range_is_plus_minus_beta0(valid):
    cfg = parse_args(["--config", str(valid), "--beta0", "0.3"])
    assert cfg.clip_range == (-0.3, 0.3)


def test_help_documents_every_key():
    text = build_parser().format_help()
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name}" in text


@pytest.mark.parametrize("where", ["yaml", "cli"])
def test_unknown_key_suggests_the_right_one(valid, where):
    if where == "yaml":
        valid.write_text(valid.read_text() + "beta_0: 1.0\n")
        argv = ["--config", str(valid)]
    else:
        argv = ["--config", str(valid), "--learning_rat", "1e-3"]
    with pytest.raises(ConfigError, match="Did you mean '(beta0|learning_rate)'"):
        parse_args(argv)


def test_wrong_type_and_choice(valid):
    with pytest.raises(ConfigError, match="num_iterations: expected int"):
        parse_args(["--config", str(valid), "--num_iterations", "2.5"])
    with pytest.raises(ConfigError, match="adv_scale must be one of"):
        from sd3_adrpo.config import make_config

        make_config({"adv_scale": "max"})


@pytest.mark.parametrize("override, message", [
    (["--pretrained_model", "./no/such/model"], "no such model folder"),
    (["--reward_model", "/no/such/clip"], "no such model folder"),
    (["--train_prompts", "missing.txt"], "no such file"),
    (["--samples_per_prompt", "1"], "samples_per_prompt must be >= 2"),
    (["--beta0", "0"], "beta0 must be > 0"),
    (["--beta0", "-1"], "beta0 must be > 0"),
    (["--train_batch_size", "3"], "do not divide"),
    (["--gradient_accumulation_steps", "3"], "do not divide"),
    (["--adv_clip_min", "1", "--adv_clip_max", "-1"], "clip range"),
    (["--reward", "aesthetic9000"], "unknown reward"),
])
def test_bad_input_fails_before_any_model_loads(valid, monkeypatch, override, message):
    import sd3_adrpo.trainer as trainer

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the config was validated")

    monkeypatch.setattr(trainer, "load_pipeline", boom)
    monkeypatch.setattr(trainer, "build_reward", boom)
    with pytest.raises(ConfigError, match=message):
        trainer.train(parse_args(["--config", str(valid), *override]))


def test_existing_output_dir_is_never_overwritten_silently(valid, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("results")
    assert train_sd3_adrpo.main(["--config", str(valid)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "precious.txt").read_text() == "results"
    with pytest.raises(ConfigError, match="contradict"):
        parse_args(["--config", str(valid), "--resume_from", "latest", "--overwrite_output_dir", "true"]).validate()


def test_too_few_prompts_for_an_iteration(valid, monkeypatch):
    import sd3_adrpo.trainer as trainer

    monkeypatch.setattr(trainer, "load_pipeline", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match="has only 2"):
        trainer.train(parse_args(["--config", str(valid), "--prompts_per_iteration", "4"]))


def test_split_batches_divides_the_global_batch_over_processes(valid):
    cfg = parse_args(["--config", str(valid), "--prompts_per_iteration", "4", "--train_batch_size", "8",
                      "--split_batches", "true"])
    local = cfg.per_process(2)
    assert (local.prompts_per_iteration, local.train_batch_size) == (2, 4)
    assert local.optimizer_steps_per_iteration == cfg.optimizer_steps_per_iteration  # the same number of steps
    assert cfg.per_process(1) is cfg
    with pytest.raises(ConfigError, match="does not divide over 3 processes"):
        cfg.per_process(3)
    dpo = dataclasses.replace(cfg, method="dpo", train_batch_size=6)
    with pytest.raises(ConfigError, match="split_batches over 2 processes: dpo .* must be even, got 3"):
        dpo.per_process(2)  # 3 samples per process cannot hold whole (winner, loser) pairs
    per_process = dataclasses.replace(cfg, split_batches=False)
    assert per_process.per_process(2) is per_process  # the sizes already are per process


CONFIGS = sorted(p.name for p in (__import__("pathlib").Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_configs_parse_and_validate(name, tmp_path, tiny_models, monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # configs use paths relative to the repository root
    cfg = parse_args(["--config", f"configs/{name}", "--output_dir", str(tmp_path / "out")])
    if name == "tiny_random.yaml":  # its models are built by `python -m tinyworld.stand_ins`; point at the test copies
        cfg.pretrained_model, cfg.reward_model = str(tiny_models["sd3"]), str(tiny_models["clip"])
    cfg.validate()
    assert cfg.optimizer_steps_per_iteration >= 1


def test_memory_profiles_differ_where_they_should():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    base = parse_args(["--config", str(root / "configs/sd3_medium.yaml")])
    small = parse_args(["--config", str(root / "configs/sd3_medium_24gb.yaml")])
    eight = parse_args(["--config", str(root / "configs/sd3_medium_8gpu.yaml")])
    assert parse_args(["--config", str(root / "configs/sd3_medium_80gb.yaml")]) == base
    assert small.gradient_checkpointing and small.free_text_encoders and small.optimizer == "adamw8bit"
    assert not small.drop_t5 and small.resolution == base.resolution == 512
    # the same effective batch: samples per optimizer step and optimizer steps per iteration
    assert small.samples_per_iteration == base.samples_per_iteration
    assert small.optimizer_steps_per_iteration == base.optimizer_steps_per_iteration
    assert eight.samples_per_iteration * 8 == 512


def test_base_config_chain_and_cycle(tmp_path):
    (tmp_path / "a.yaml").write_text("beta0: 3.0\nlora_rank: 4\n")
    (tmp_path / "b.yaml").write_text("base_config: a.yaml\nbeta0: 5.0\n")
    cfg = parse_args(["--config", str(tmp_path / "b.yaml"), "--lora_rank", "8"])
    assert (cfg.beta0, cfg.lora_rank) == (5.0, 8)
    (tmp_path / "a.yaml").write_text("base_config: b.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        parse_args(["--config", str(tmp_path / "b.yaml")])


@pytest.mark.parametrize("name", ["multi_gpu", "multi_node"])
def test_accelerate_configs_load(name):
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(Path(__file__).resolve().parents[1] / "configs/accelerate" / f"{name}.yaml"))
    assert cfg.num_processes >= 8 and cfg.mixed_precision == "bf16"
    assert str(cfg.distributed_type).endswith("MULTI_GPU")  # DDP, the tested path (DeepSpeed and FSDP are refused)


def test_t5_8bit_needs_a_gpu(valid):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        parse_args(["--config", str(valid), "--drop_t5", "false", "--t5_8bit", "true"]).validate()
