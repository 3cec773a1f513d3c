"""SD3.5 runs through the same code: a tiny random SD3.5-like pipeline (RMS q/k norm, dual attention) trains for two
iterations from the CLI, and its LoRA, which covers the dual-attention blocks' attn2, loads into the stock pipeline."""

import json

import pytest
import torch
from safetensors.torch import load_file

import train_sd3_adrpo


@pytest.fixture(scope="module")
def tiny_sd35(tmp_path_factory):
    from tinyworld.stand_ins import build_tiny_sd35

    return build_tiny_sd35(tmp_path_factory.mktemp("sd35") / "sd3.5")


def test_the_stand_in_has_sd35s_transformer_features(tiny_sd35):
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd35, subfolder="transformer")
    blocks = transformer.transformer_blocks
    assert [b.use_dual_attention for b in blocks] == [True, True, False]
    assert type(blocks[0].attn.norm_q).__name__ == "RMSNorm" and type(blocks[0].attn2.norm_k).__name__ == "RMSNorm"


def test_sd35_trains_end_to_end_and_its_lora_loads_into_the_stock_pipeline(tiny_sd35, tiny_models, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from sd3_adrpo.models import load_pipeline
    from sd3_adrpo.rollout import SD3Sampler

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = tmp_path / "run"
    assert train_sd3_adrpo.main([
        "--config", "configs/tiny_random.yaml", "--pretrained_model", str(tiny_sd35),
        "--reward_model", str(tiny_models["clip"]), "--train_prompts", str(prompts), "--eval_prompts", "null",
        "--num_iterations", "2", "--prompts_per_iteration", "2", "--samples_per_prompt", "2", "--train_batch_size", "4",
        "--num_inference_steps", "3", "--checkpoint_every", "0", "--learning_rate", "2e-2",
        "--output_dir", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["optimizer_steps"] == 1 and torch.isfinite(torch.tensor([r["loss"], r["w2"]])).all() for r in rows)

    lora = load_file(out / "final" / "pytorch_lora_weights.safetensors")
    modules = {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in lora}
    # the default targets reach both attentions of a dual-attention block, and the joint attention of every block
    for block in range(3):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            assert f"transformer_blocks.{block}.attn.{proj}" in modules
            assert (f"transformer_blocks.{block}.attn2.{proj}" in modules) == (block < 2)
    assert not any("norm" in m for m in modules)
    trained_b = [k for k in lora if "attn2" in k and "lora_B" in k]
    assert any(lora[k].abs().max() > 0 for k in trained_b)  # attn2 was trained, not just wrapped

    prompts_ = ["a red circle", "a yellow triangle"]
    noise = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    kwargs = dict(latents=noise.clone(), num_inference_steps=3, guidance_scale=5.0, height=64, width=64,
                  max_sequence_length=4, output_type="latent")
    stock = StableDiffusion3Pipeline.from_pretrained(str(tiny_sd35), text_encoder_3=None, tokenizer_3=None)
    stock.set_progress_bar_config(disable=True)
    base = stock(prompts_, **kwargs).images
    stock.load_lora_weights(str(out / "final"))
    wrapped = {n for n, m in stock.transformer.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert wrapped == modules  # every tensor of the file found its module: nothing dropped by name
    loaded = stock(prompts_, **kwargs).images
    assert (loaded - base).abs().max() > 1e-3  # the LoRA changes the stock pipeline's output

    # and our sampler, given the same LoRA, samples what the stock pipeline samples
    ours = load_pipeline(str(tiny_sd35), drop_t5=True)
    ours.load_lora_weights(str(out / "final"))
    sampler = SD3Sampler(ours, "cpu", num_inference_steps=3, guidance_scale=5.0, max_sequence_length=4, batch_size=8)
    assert torch.allclose(sampler.denoise(noise, *sampler.embed(prompts_)), loaded, atol=1e-5)
