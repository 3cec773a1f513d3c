"""SANA through the model-family interface: a tiny random SanaPipeline (Gemma-2 text encoder, AutoencoderDC,
DPM-Solver++ with flow prediction) samples what the stock pipeline samples, trains from the CLI with every method,
resumes bit for bit, and its exported LoRA loads into the stock ``SanaPipeline`` and changes its output."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_sd3_adrpo

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def tiny_sana(tmp_path_factory):
    from tinyworld.stand_ins import build_tiny_sana

    return build_tiny_sana(tmp_path_factory.mktemp("sana") / "sana")


def _stock(path):
    from diffusers import SanaPipeline

    pipe = SanaPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_call(pipe, noise, output_type="latent"):
    return pipe(PROMPTS, latents=noise.clone(), num_inference_steps=3, guidance_scale=4.5, height=64, width=64,
                max_sequence_length=8, use_resolution_binning=False, output_type=output_type).images


def test_our_sampler_samples_and_decodes_what_the_stock_sana_pipeline_does(tiny_sana):
    from sd3_adrpo.families import SanaFamily
    from sd3_adrpo.models import load_pipeline
    from sd3_adrpo.rollout import SD3Sampler

    pipe = load_pipeline(str(tiny_sana))
    assert type(pipe).__name__ == "SanaPipeline"
    sampler = SD3Sampler(pipe, "cpu", num_inference_steps=3, guidance_scale=4.5, max_sequence_length=8, batch_size=8)
    assert isinstance(sampler.family, SanaFamily) and sampler.do_cfg
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"  # multistep: not an Euler step
    noise = torch.randn(2, *sampler.latent_shape(64), generator=torch.Generator().manual_seed(0))
    assert noise.shape == (2, 8, 16, 16)
    ours = sampler.denoise(noise, *sampler.embed(PROMPTS))
    stock = _stock(tiny_sana)
    assert torch.allclose(ours, _stock_call(stock, noise), atol=1e-5) and not torch.allclose(ours, noise)
    images = _stock_call(stock, noise, "np")  # decoded as the stock pipeline decodes (DC-AE, no shift factor)
    assert (torch.from_numpy((images * 255).round()).int() - sampler.decode(ours).int()).abs().max() <= 1
    # the sampler steps a fresh copy of the scheduler: the pipeline's own is untouched, a second call is the same
    assert torch.equal(sampler.denoise(noise, *sampler.embed(PROMPTS)), ours)


def _run_args(tiny_sana, tiny_models, tmp_path, method, extra=()):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    return ["--config", "configs/tiny_random.yaml", "--pretrained_model", str(tiny_sana), "--no-drop_t5",
            "--max_sequence_length", "8", "--guidance_scale", "4.5", "--reward_model", str(tiny_models["clip"]),
            "--train_prompts", str(prompts), "--eval_prompts", "null", "--method", method, "--num_iterations", "2",
            "--prompts_per_iteration", "2", "--samples_per_prompt", "2", "--train_batch_size", "4",
            "--num_inference_steps", "3", "--checkpoint_every", "1", "--sample_every", "0", "--learning_rate", "2e-2",
            *extra]


@pytest.mark.parametrize("method", ["adrpo", "dpo", "fixed_beta", "orw_cfm_w2", "raft"])
def test_sana_trains_two_iterations_from_the_cli_with_every_method(tiny_sana, tiny_models, tmp_path, method):
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*_run_args(tiny_sana, tiny_models, tmp_path, method), "--checkpoint_every", "0",
                                 "--output_dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["optimizer_steps"] >= 1 and torch.isfinite(torch.tensor([r["loss"], r["w2"]])).all() for r in rows)
    lora = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)
    card = (out / "final" / "README.md").read_text()
    assert "SanaPipeline.from_pretrained" in card and "max_sequence_length=8" in card and "Euler" not in card


def test_sana_resume_is_bit_for_bit_and_the_lora_loads_into_the_stock_pipeline(tiny_sana, tiny_models, tmp_path,
                                                                                capsys):
    args = _run_args(tiny_sana, tiny_models, tmp_path, "adrpo", ["--gradient_checkpointing", "--free_text_encoders",
                                                                 "--loss_guidance", "guided"])
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*args, "--output_dir", str(out)]) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "final")
    capsys.readouterr()
    assert train_sd3_adrpo.main([*args, "--output_dir", str(resumed), "--resume_from", "latest"]) == 0
    assert "at iteration 1" in capsys.readouterr().out
    lines, new_lines = ((d / "metrics.jsonl").read_text().splitlines() for d in (out, resumed))
    assert len(new_lines) == 2 and new_lines[0] == lines[0]
    assert json.loads(new_lines[1])["loss"] == json.loads(lines[1])["loss"]
    assert "w2_unconditional" in json.loads(lines[1])  # guided: the empty prompt's branch is trained and logged
    first, again = (load_file(d / "final" / "pytorch_lora_weights.safetensors") for d in (out, resumed))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)

    stock = _stock(tiny_sana)
    noise = torch.randn(2, 8, 16, 16, generator=torch.Generator().manual_seed(3))
    base = _stock_call(stock, noise)
    stock.load_lora_weights(str(out / "final"))
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in first}
    wrapped = {n for n, m in stock.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert wrapped == modules and any(".attn2." in m for m in modules)  # self- and cross-attention both
    assert (_stock_call(stock, noise) - base).abs().max() > 1e-3


def test_t5_settings_on_sana_exit_2_before_loading(tiny_sana, tiny_models, tmp_path, capsys):
    args = _run_args(tiny_sana, tiny_models, tmp_path, "adrpo")
    assert train_sd3_adrpo.main([*args, "--drop_t5", "--output_dir", str(tmp_path / "a")]) == 2
    assert "do not apply to SANA" in capsys.readouterr().err


def test_a_resolution_the_dc_ae_cannot_divide_exits_2_before_the_run_starts(tiny_sana, tiny_models, tmp_path, capsys,
                                                                            monkeypatch):
    """SANA's DC-AE downsamples x32 (patch 1), more than the x16 the config checks: 48 px would round the latent down
    to one token a side and sample 32 px images. The tiny stand-in's DC-AE is x4, so its factor is raised here."""
    from types import SimpleNamespace

    from sd3_adrpo.families import SD3, FluxFamily, SanaFamily
    from sd3_adrpo.models import load_pipeline

    SANA, FLUX = SanaFamily(), FluxFamily()
    pipe = load_pipeline(str(tiny_sana))
    assert SANA.resolution_multiple(pipe) == 4  # 64 px -> 16 x 16 latents of patch 1 (its three DC-AE blocks)
    real = lambda k, patch: SimpleNamespace(vae_scale_factor=k, transformer=SimpleNamespace(  # noqa: E731
        config=SimpleNamespace(patch_size=patch)))
    with pytest.raises(ValueError, match="multiple of 32.*e.g. 32"):
        SANA.check_resolution(real(32, 1), 48)
    SANA.check_resolution(real(32, 1), 1024)
    SD3.check_resolution(real(8, 2), 1024)
    with pytest.raises(ValueError, match="multiple of 16.*e.g. 1008"):
        SD3.check_resolution(real(8, 2), 1020)
    with pytest.raises(ValueError, match="multiple of 16"):
        FLUX.check_resolution(real(8, 1), 1000)  # FLUX's transformer patch is 1, its 2 x 2 packing makes it 16

    monkeypatch.setattr(SanaFamily, "resolution_multiple", lambda self, pipe: 32)
    args = _run_args(tiny_sana, tiny_models, tmp_path, "adrpo")
    assert train_sd3_adrpo.main([*args, "--resolution", "48", "--output_dir", str(tmp_path / "run")]) == 2
    assert "resolution 48 does not suit this SanaPipeline: it must be a multiple of 32" in capsys.readouterr().err
    assert not (tmp_path / "run" / "config.yaml").exists()  # a failed start leaves no run behind


def test_prompts_longer_than_gemmas_max_sequence_length_are_said_to_be_truncated(tiny_sana, capsys):
    from sd3_adrpo.models import load_pipeline
    from sd3_adrpo.trainer import _warn_long_prompts

    pipe = load_pipeline(str(tiny_sana))
    _warn_long_prompts(pipe, ["a red circle", "a blue square to the left of a red circle"], max_sequence_length=20)
    out = capsys.readouterr().out  # the tiny Gemma tokenizer is one token a character, plus <bos>
    assert "1 of 2 prompts exceed max_sequence_length of Gemma-2 (20 tokens)" in out and "CLIP" not in out
