"""FLUX.1 through the model-family interface: a tiny random FluxPipeline (FLUX.1-dev's layout with the guidance
embedding, and FLUX.1-schnell's without) samples what the stock pipeline samples, trains from the CLI with every
method, resumes bit for bit, and its exported LoRA loads into the stock ``FluxPipeline`` and changes its output."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_sd3_adrpo

PROMPTS = ["a red circle", "a blue square"]


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from tinyworld.stand_ins import build_tiny_flux

    root = tmp_path_factory.mktemp("flux")
    return {"dev": build_tiny_flux(root / "dev"), "schnell": build_tiny_flux(root / "schnell", guidance_embeds=False)}


def _stock(path):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(path))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_latents(pipe, noise, guidance_scale=3.5):
    """The stock pipeline's clean latents from our (B, C, h, w) noise, unpacked to that layout."""
    from diffusers import FluxPipeline

    b, c, h, w = noise.shape
    packed = FluxPipeline._pack_latents(noise.clone(), b, c, h, w)
    out = pipe(PROMPTS, latents=packed, num_inference_steps=3, guidance_scale=guidance_scale, height=64, width=64,
               max_sequence_length=8, output_type="latent").images
    return FluxPipeline._unpack_latents(out, 64, 64, pipe.vae_scale_factor)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_our_sampler_samples_what_the_stock_flux_pipeline_samples(tiny_flux, variant):
    from sd3_adrpo.families import FluxFamily
    from sd3_adrpo.models import load_pipeline
    from sd3_adrpo.rollout import SD3Sampler

    pipe = load_pipeline(str(tiny_flux[variant]))
    assert type(pipe).__name__ == "FluxPipeline"
    sampler = SD3Sampler(pipe, "cpu", num_inference_steps=3, guidance_scale=3.5, max_sequence_length=8, batch_size=8)
    assert isinstance(sampler.family, FluxFamily) and not sampler.do_cfg  # one pass a step: no true CFG
    assert sampler.family.guidance == (3.5 if variant == "dev" else None)
    assert sampler.latent_shape(64) == (16, 16, 16)  # 64 packed channels a token = 16 latent channels x 2 x 2
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    ours = sampler.denoise(noise, *sampler.embed(PROMPTS))
    assert torch.allclose(ours, _stock_latents(_stock(tiny_flux[variant]), noise), atol=1e-5)
    assert not torch.allclose(ours, noise)


def test_flux_dev_guidance_is_an_input_of_one_pass_and_schnell_has_none(tiny_flux):
    from sd3_adrpo.families import FluxFamily
    from sd3_adrpo.models import load_pipeline, velocity
    from sd3_adrpo.rollout import SD3Sampler
    from sd3_adrpo.update import loss_guidance
    from sd3_adrpo.config import make_config

    pipe = load_pipeline(str(tiny_flux["dev"]))
    sampler = SD3Sampler(pipe, "cpu", num_inference_steps=2, guidance_scale=3.5, max_sequence_length=8, batch_size=8)
    emb, pooled = sampler.embed(PROMPTS)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    sigmas = torch.tensor([0.3, 0.8])
    v = {g: velocity(pipe.transformer, x, sigmas, emb, pooled, FluxFamily(g)) for g in (1.0, 3.5, 3.5)}
    assert not torch.allclose(v[1.0], v[3.5])  # the distilled guidance changes the field the model returns
    # the rollout carries the family with its guidance; the loss takes no empty-prompt branch, guided or not
    rollout = sampler.sample(PROMPTS, 2, 64, torch.Generator().manual_seed(0))
    assert rollout.uncond_embeds is None and rollout.family.guidance == 3.5
    for field in ("guided", "conditional"):
        assert loss_guidance(make_config({"loss_guidance": field}), rollout) is None
    # FLUX.1-schnell: no guidance embedding, so no guidance input whatever guidance_scale says
    schnell = SD3Sampler(load_pipeline(str(tiny_flux["schnell"])), "cpu", num_inference_steps=2, guidance_scale=3.5,
                         max_sequence_length=8, batch_size=8)
    assert schnell.family.guidance is None


def _run_args(tiny_flux, tiny_models, tmp_path, method, extra=()):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    return ["--config", "configs/tiny_random.yaml", "--pretrained_model", str(tiny_flux["dev"]), "--no-drop_t5",
            "--max_sequence_length", "8", "--guidance_scale", "3.5", "--reward_model", str(tiny_models["clip"]),
            "--train_prompts", str(prompts), "--eval_prompts", "null", "--method", method, "--num_iterations", "2",
            "--prompts_per_iteration", "2", "--samples_per_prompt", "2", "--train_batch_size", "4",
            "--num_inference_steps", "3", "--checkpoint_every", "1", "--sample_every", "0", "--learning_rate", "2e-2",
            *extra]


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["adrpo", "dpo", "fixed_beta", "orw_cfm_w2", "raft"])
def test_flux_trains_two_iterations_from_the_cli_with_every_method(tiny_flux, tiny_models, tmp_path, method):
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*_run_args(tiny_flux, tiny_models, tmp_path, method), "--checkpoint_every", "0",
                                 "--output_dir", str(out)]) == 0
    rows = _rows(out)
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["optimizer_steps"] >= 1 and torch.isfinite(torch.tensor([r["loss"], r["w2"]])).all() for r in rows)
    lora = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # it trained
    card = (out / "final" / "README.md").read_text()
    assert "FluxPipeline.from_pretrained" in card and "text_encoder_3" not in card


def test_flux_resume_is_bit_for_bit_and_the_lora_loads_into_the_stock_pipeline(tiny_flux, tiny_models, tmp_path,
                                                                                capsys):
    # with configs/flux1_dev.yaml's memory knobs: gradient checkpointing, prompts encoded once and the encoders freed
    args = _run_args(tiny_flux, tiny_models, tmp_path, "adrpo", ["--gradient_checkpointing", "--free_text_encoders"])
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*args, "--output_dir", str(out)]) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000001"]
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "final")
    capsys.readouterr()
    assert train_sd3_adrpo.main([*args, "--output_dir", str(resumed), "--resume_from", "latest"]) == 0
    assert "at iteration 1" in capsys.readouterr().out  # it continued: iteration 0 was not run again
    lines, new_lines = ((d / "metrics.jsonl").read_text().splitlines() for d in (out, resumed))
    assert len(new_lines) == 2 and new_lines[0] == lines[0]
    assert json.loads(new_lines[1])["loss"] == json.loads(lines[1])["loss"]
    first, again = (load_file(d / "final" / "pytorch_lora_weights.safetensors") for d in (out, resumed))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert any(first[k].abs().max() > 0 for k in first if "lora_B" in k)

    # the export is in FLUX's diffusers LoRA format: every tensor finds its module in the stock pipeline
    stock = _stock(tiny_flux["dev"])
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    base = _stock_latents(stock, noise)
    stock.load_lora_weights(str(out / "final"))
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in first}
    wrapped = {n for n, m in stock.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert wrapped == modules and any(m.startswith("single_transformer_blocks.") for m in modules)
    loaded = _stock_latents(stock, noise)
    assert (loaded - base).abs().max() > 1e-3  # the LoRA changes the stock pipeline's output


def test_bad_flux_settings_and_unsupported_pipelines_exit_2_before_loading(tiny_flux, tiny_models, tmp_path, capsys):
    args = _run_args(tiny_flux, tiny_models, tmp_path, "adrpo")
    assert train_sd3_adrpo.main([*args, "--drop_t5", "--output_dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "drop_t5 does not apply to FLUX" in err and "--no-drop_t5" in err and not (tmp_path / "a").exists()
    other = tmp_path / "kandinsky"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    args[args.index("--pretrained_model") + 1] = str(other)
    assert train_sd3_adrpo.main([*args, "--output_dir", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "KandinskyV22Pipeline" in err and "FluxPipeline" in err and not (tmp_path / "b" / "config.yaml").exists()


def test_table1_takes_a_flux_base_and_its_lora(tiny_flux, tiny_models, tmp_path):
    """eval/table1.py with a FLUX base: the base and LoRA rows come from our sampler (FLUX's family), W2 is measured
    on the LoRA's samples and is 0 on the base's, and the LoRA changes the images."""
    from sd3_adrpo import table1
    from sd3_adrpo.models import add_lora, load_pipeline, save_lora

    pipe = load_pipeline(str(tiny_flux["dev"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in add_lora(pipe.transformer, rank=4):
            p.add_(torch.randn_like(p) * 0.3)
    save_lora(pipe.transformer, tmp_path / "lora")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "eval"
    table = table1.main(["--base", str(tiny_flux["dev"]), "--run", f"LoRA={tmp_path / 'lora'}", "--prompts",
                         str(prompts), "--seeds", "0", "--images_per_prompt", "2", "--steps", "2",
                         "--guidance_scale", "3.5", "--resolution", "64", "--max_sequence_length", "8",
                         "--clip", str(tiny_models["clip"]), "--out", str(out)])
    assert list(table.rows) == ["Base", "LoRA"]
    runs = {label: json.loads((out / "runs" / f"{label}.json").read_text())["metrics"] for label in table.rows}
    assert runs["Base"]["w2_divergence"]["mean"] == 0 and runs["LoRA"]["w2_divergence"]["mean"] > 0
    assert runs["Base"]["clip_score"]["mean"] != runs["LoRA"]["clip_score"]["mean"]


def test_prompts_longer_than_t5s_max_sequence_length_are_said_to_be_truncated(tiny_flux, capsys):
    from sd3_adrpo.models import load_pipeline
    from sd3_adrpo.trainer import _warn_long_prompts

    pipe = load_pipeline(str(tiny_flux["dev"]))
    short, long = "a red circle", "a red circle to the left of a blue square above a green triangle"
    n_long = len(pipe.tokenizer_2(long).input_ids)
    assert len(pipe.tokenizer_2(short).input_ids) < n_long  # T5 tokens, </s> included
    _warn_long_prompts(pipe, [short, long], max_sequence_length=n_long - 1)
    out = capsys.readouterr().out
    assert f"1 of 2 prompts exceed max_sequence_length of T5 ({n_long - 1} tokens)" in out and repr(long[:80]) in out
    _warn_long_prompts(pipe, [short, long], max_sequence_length=n_long)  # exactly fits: nothing cut
    assert "max_sequence_length" not in capsys.readouterr().out
