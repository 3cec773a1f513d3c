import numpy as np
import torch

from sd3_adrpo.rollout import SD3Sampler, make_generator


def _sampler(pipe, guidance=4.0, steps=4, batch=8):
    return SD3Sampler(pipe, "cpu", num_inference_steps=steps, guidance_scale=guidance, max_sequence_length=4,
                      batch_size=batch)


def test_denoise_matches_the_stock_pipeline(tiny_pipe):
    """Our cached-embedding Euler loop does exactly what StableDiffusion3Pipeline.__call__ does."""
    prompts = ["a red circle", "a blue square", "a green triangle"]
    noise = torch.randn(3, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    for guidance in (4.0, 1.0):  # with and without classifier-free guidance
        sampler = _sampler(tiny_pipe, guidance, batch=2)  # batch 2 also checks chunking
        emb, pooled = sampler.embed(prompts)
        ours = sampler.denoise(noise, emb, pooled)
        stock = tiny_pipe(prompts, latents=noise.clone(), num_inference_steps=4, guidance_scale=guidance,
                          height=64, width=64, max_sequence_length=4, output_type="latent").images
        assert torch.allclose(ours, stock, atol=1e-5, rtol=1e-5)
        images = sampler.decode(ours)
        stock_np = tiny_pipe(prompts, latents=noise.clone(), num_inference_steps=4, guidance_scale=guidance,
                             height=64, width=64, max_sequence_length=4, output_type="np").images
        stock_u8 = (stock_np * 255).round().astype(np.uint8)
        assert images.dtype == torch.uint8 and images.shape == (3, 64, 64, 3)
        assert np.abs(images.numpy().astype(int) - stock_u8.astype(int)).max() <= 1


def test_prompts_are_encoded_once(tiny_pipe):
    calls = []
    original = tiny_pipe.encode_prompt

    def counting(*args, **kwargs):
        calls.append(list(kwargs["prompt"]))
        return original(*args, **kwargs)

    tiny_pipe.encode_prompt = counting
    sampler = _sampler(tiny_pipe)
    sampler.sample(["a", "b", "c"], 4, 64, make_generator(0))
    sampler.sample(["b", "c", "d"], 4, 64, make_generator(1))
    encoded = [p for c in calls for p in c]
    assert sorted(encoded) == sorted(["a", "b", "c", "", "d"])  # "" is the CFG negative, encoded once too


def test_rollout_layout_reproducibility_and_same_samples(tiny_pipe):
    sampler = _sampler(tiny_pipe)
    r1 = sampler.sample(["x", "y"], 3, 64, make_generator(5, 0))
    assert r1.prompts == ["x", "x", "x", "y", "y", "y"]
    assert r1.group_ids.tolist() == [0, 0, 0, 1, 1, 1]
    assert r1.latents.shape == (6, 16, 16, 16) and r1.images.shape == (6, 64, 64, 3)
    # the images that get scored are decoded from exactly the latents that get trained on
    assert torch.equal(sampler.decode(r1.latents), r1.images)
    # the prompt embeddings travel with their samples
    emb_y, _ = sampler.embed(["y"])
    assert torch.equal(r1.prompt_embeds[4], emb_y[0])
    r2 = sampler.sample(["x", "y"], 3, 64, make_generator(5, 0))
    r3 = sampler.sample(["x", "y"], 3, 64, make_generator(5, 1))
    assert torch.equal(r1.latents, r2.latents)
    assert not torch.allclose(r1.latents, r3.latents)


def test_under_bf16_the_samples_stay_fp32_and_only_the_transformers_inputs_are_cast(tiny_models):
    """x1 (what the loss regresses onto) carries no bf16 rounding of the ODE state: the Euler state is fp32 and only
    each transformer call's input is cast; the loss's x_t, target and W2 are computed from it in fp32."""
    from sd3_adrpo.models import add_lora, load_pipeline
    from sd3_adrpo.update import fm_batch_loss

    pipe = load_pipeline(str(tiny_models["sd3"]), drop_t5=True, dtype=torch.bfloat16)
    add_lora(pipe.transformer, rank=2)  # B = 0: the policy equals the reference
    sampler = SD3Sampler(pipe, torch.device("cpu"), num_inference_steps=3, guidance_scale=3.0, max_sequence_length=4,
                         batch_size=8)
    r = sampler.sample(["a red circle"], 2, 64, make_generator(0))
    assert r.latents.dtype == torch.float32 and r.prompt_embeds.dtype == torch.bfloat16
    assert not torch.equal(r.latents, r.latents.bfloat16().float())  # finer than bf16 can hold
    noise, sigmas = torch.randn(r.latents.shape, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.7])
    loss, terms = fm_batch_loss(pipe.transformer, pipe.transformer, r.latents, noise, sigmas, r.prompt_embeds,
                                r.pooled_embeds, torch.ones(2), torch.ones(2), (r.uncond_embeds, r.guidance_scale))
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
    assert torch.all(terms["w2"] == 0)  # no adapter: the policy is the reference, the same bf16 passes


def test_the_prompt_cache_lives_on_the_cpu_and_embeddings_come_back_on_the_samplers_device(tiny_pipe):
    sampler = SD3Sampler(tiny_pipe, torch.device("cpu"), num_inference_steps=2, guidance_scale=3.0,
                         max_sequence_length=4, batch_size=8)
    emb, pooled = sampler.embed(["a red circle", "two blue squares", "a red circle"])
    assert len(sampler._cache) == 2 and all(t.device.type == "cpu" for e in sampler._cache.values() for t in e)
    assert emb.device == sampler.device and torch.equal(emb[0], emb[2]) and pooled.shape[0] == 3
    # a moved copy, not the cache itself: what a caller does to it leaves the cache intact
    assert emb[0].data_ptr() != sampler._cache["a red circle"][0].data_ptr()
