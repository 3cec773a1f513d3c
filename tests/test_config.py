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


@pytest.mark.parametrize("name", ["tiny.yaml", "sd3_medium.yaml"])
def test_shipped_configs_parse_and_validate(name, tmp_path, tiny_models, monkeypatch):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # configs use paths relative to the repository root
    cfg = parse_args(["--config", f"configs/{name}", "--output_dir", str(tmp_path / "out")])
    if name == "tiny.yaml":  # its models are built by `python -m sd3_adrpo.tiny`; point at the test copies
        cfg.pretrained_model, cfg.reward_model = str(tiny_models["sd3"]), str(tiny_models["clip"])
    cfg.validate()
    assert cfg.optimizer_steps_per_iteration >= 1
