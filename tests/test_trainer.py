import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_sd3_adrpo
from sd3_adrpo.advantages import group_advantages
from sd3_adrpo.config import make_config
from sd3_adrpo.models import add_lora, load_pipeline, save_lora
from sd3_adrpo.rollout import SD3Sampler, make_generator
from sd3_adrpo.update import update


def _setup(tiny_models, lr=1e-3, batch=8, accum=1, seed=0):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from diffusers.optimization import get_scheduler

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    cfg = make_config({"pretrained_model": str(tiny_models["sd3"]), "train_batch_size": batch,
                       "gradient_accumulation_steps": accum, "learning_rate": lr, "beta0": 1.0,
                       "prompts_per_iteration": 4, "samples_per_prompt": 4, "resolution": 64})
    pipe = load_pipeline(cfg.pretrained_model, drop_t5=True)
    torch.manual_seed(seed)
    params = add_lora(pipe.transformer, rank=4)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accum)
    opt = torch.optim.AdamW(params, lr=lr)
    sched = get_scheduler("constant", opt)
    transformer, opt, sched = accelerator.prepare(pipe.transformer, opt, sched)
    sampler = SD3Sampler(pipe, "cpu", num_inference_steps=3, guidance_scale=4.0, max_sequence_length=4, batch_size=16)
    return cfg, pipe, accelerator, transformer, opt, sched, sampler


def _step(setup, rollout, seed=0):
    cfg, pipe, accelerator, transformer, opt, sched, _ = setup
    # a reward that is a function of the samples themselves: mean brightness of the decoded image
    rewards = rollout.images.float().mean(dim=(1, 2, 3))
    adv = group_advantages(rewards, rollout.group_ids, "batch_std", clip=(-1, 1))
    return update(accelerator, transformer, pipe.transformer, opt, sched, rollout, (adv, cfg.beta0 - adv), cfg, (seed,))


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_one_update_changes_the_lora_and_nothing_else(tiny_models):
    setup = _setup(tiny_models)
    pipe, sampler = setup[1], setup[-1]
    rollout = sampler.sample(["a red circle", "a blue square", "a green circle", "a red square"], 4, 64,
                             make_generator(0))
    before = {name: _snapshot(getattr(pipe, name)) for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    stats = _step(setup, rollout)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    changed_lora, checked = [], 0
    for name, snap in before.items():
        after = getattr(pipe, name).state_dict()
        for key, value in snap.items():
            if "lora_" in key:
                changed_lora.append(not torch.equal(after[key], value))
            else:
                assert torch.equal(after[key], value), f"{name}.{key} changed"
                checked += 1
    assert checked > 50 and changed_lora and all(changed_lora)


def test_gradient_accumulation_equals_one_big_batch(tiny_models):
    a = _setup(tiny_models, batch=16, accum=1)
    rollout = a[-1].sample(["a red circle", "a blue square", "a green circle", "a red square"], 4, 64,
                           make_generator(0))
    _step(a, rollout)
    lora_a = {k: v.clone() for k, v in a[1].transformer.state_dict().items() if "lora_" in k}
    b = _setup(tiny_models, batch=8, accum=2)
    _step(b, rollout)
    lora_b = {k: v for k, v in b[1].transformer.state_dict().items() if "lora_" in k}
    for k in lora_a:
        assert torch.allclose(lora_a[k], lora_b[k], atol=1e-6), k
    c = _setup(tiny_models, batch=8, accum=1)  # two optimizer steps instead of one: a different update
    _step(c, rollout)
    lora_c = {k: v for k, v in c[1].transformer.state_dict().items() if "lora_" in k}
    assert any(not torch.allclose(lora_a[k], lora_c[k], atol=1e-6) for k in lora_a)


def test_saved_lora_reproduces_the_policy_in_a_stock_pipeline(tiny_models, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    setup = _setup(tiny_models, lr=2e-2)
    pipe, sampler = setup[1], setup[-1]
    for i in range(3):
        _step(setup, sampler.sample(["a red circle", "a blue square", "a green circle", "a red square"], 4, 64,
                                    make_generator(i)), seed=i)
    save_lora(pipe.transformer, tmp_path / "lora")

    prompts = ["a red circle", "a yellow triangle"]
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(7))
    ours = sampler.denoise(noise, *sampler.embed(prompts))
    kwargs = dict(latents=noise.clone(), num_inference_steps=3, guidance_scale=4.0, height=64, width=64,
                  max_sequence_length=4, output_type="latent")
    stock = StableDiffusion3Pipeline.from_pretrained(str(tiny_models["sd3"]), text_encoder_3=None, tokenizer_3=None)
    base = stock(prompts, **kwargs).images
    stock.load_lora_weights(str(tmp_path / "lora"))
    loaded = stock(prompts, **kwargs).images
    assert (ours - base).abs().max() > 1e-3  # training moved the policy away from the base
    assert torch.allclose(loaded, ours, atol=1e-5)


def test_cli_end_to_end_outputs_and_resume(tiny_run_args, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*tiny_run_args, "--output_dir", str(out)]) == 0
    final = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    assert final and any(v.abs().max() > 0 for k, v in final.items() if "lora_B" in k)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    for key in ("reward_mean", "reward_std", "adv_mean", "adv_std", "adv_frac_clipped", "cfm", "w2", "loss", "lr",
                "images_per_s", "time_sample", "time_score", "time_update"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["iter_000000.png", "iter_000001.png",
                                                                  "iter_000002.png"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-000001"]
    # each checkpoint also holds the policy as a diffusers LoRA with the run's config.yaml (what eval/table1.py
    # evaluates): the very weights the checkpoint resumes from, loadable by the stock pipeline
    ckpt = out / "checkpoints" / "checkpoint-000001"
    exported = load_file(ckpt / "pytorch_lora_weights.safetensors")
    trainable = load_file(ckpt / "trainable.safetensors")
    assert (ckpt / "config.yaml").is_file() and "pytorch_lora_weights.safetensors" in json.loads(
        (ckpt / "manifest.json").read_text())
    as_exported = {k.replace(".default", ""): v for k, v in trainable.items()}
    assert {k.removeprefix("transformer.") for k in exported} == set(as_exported)
    assert all(torch.equal(v, as_exported[k.removeprefix("transformer.")]) for k, v in exported.items())
    assert any(not torch.equal(exported[k], final[k]) for k in final)  # iteration 1's policy, not the final one
    from diffusers import StableDiffusion3Pipeline

    stock = StableDiffusion3Pipeline.from_pretrained(tiny_run_args[tiny_run_args.index("--pretrained_model") + 1],
                                                     text_encoder_3=None, tokenizer_3=None)
    stock.load_lora_weights(str(ckpt))

    # Resume from the iteration-1 checkpoint in a copy of the run: it continues (no re-run of iteration 0)
    # and ends at bit-for-bit the same LoRA (CPU, same thread count).
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "final")
    capsys.readouterr()
    assert train_sd3_adrpo.main([*tiny_run_args, "--output_dir", str(resumed), "--resume_from", "latest"]) == 0
    assert "at iteration 1" in capsys.readouterr().out
    lines, new_lines = (out / "metrics.jsonl").read_text().splitlines(), (resumed / "metrics.jsonl").read_text().splitlines()
    assert len(new_lines) == 2 and new_lines[0] == lines[0]  # row 0 kept as it was, row 1 written once
    assert json.loads(new_lines[1])["loss"] == json.loads(lines[1])["loss"]
    again = load_file(resumed / "final" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(final[k], again[k]) for k in final)


def test_wandb_offline_logging(tiny_run_args, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    args = [*tiny_run_args, "--num_iterations", "1", "--sample_every", "0", "--report_to", "wandb"]
    assert train_sd3_adrpo.main([*args, "--output_dir", str(tmp_path / "run")]) == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


def test_memory_options_train_checkpoint_and_resume(tiny_run_args, tmp_path):
    """Gradient checkpointing, 8-bit AdamW (bitsandbytes) and freed text encoders, through a checkpoint + resume."""
    args = [*tiny_run_args, "--gradient_checkpointing", "true", "--optimizer", "adamw8bit",
            "--free_text_encoders", "true", "--vae_batch_size", "1", "--lora_rank", "16"]
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([*args, "--output_dir", str(out)]) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "final")
    assert train_sd3_adrpo.main([*args, "--output_dir", str(resumed), "--resume_from", "latest"]) == 0
    a, b = load_file(out / "final" / "pytorch_lora_weights.safetensors"), load_file(
        resumed / "final" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and any(v.abs().max() > 0 for v in a.values())


def test_freed_text_encoders_refuse_new_prompts(tiny_pipe):
    sampler = SD3Sampler(tiny_pipe, "cpu", num_inference_steps=2, guidance_scale=1.0, max_sequence_length=4,
                         batch_size=4)
    sampler.embed(["a red circle"])
    sampler.free_text_encoders()
    assert tiny_pipe.text_encoder is None and tiny_pipe.text_encoder_2 is None
    assert sampler.sample(["a red circle"], 2, 64, make_generator(0)).images.shape == (2, 64, 64, 3)
    with pytest.raises(KeyError, match="not encoded before the text encoders were freed"):
        sampler.embed(["a blue square"])
