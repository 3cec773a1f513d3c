#!/usr/bin/env python
"""GPU benchmark on the full-size SD3-medium, SD3.5-medium and FLUX.1-dev architectures with random weights (no
download needed).

Builds the public SD3-medium configuration (MMDiT: 24 blocks, width 1536, 16 latent channels, patch 2; the 16-channel
VAE; CLIP-L, CLIP-G and T5-XXL text encoders) in bf16, then SD3.5-medium's transformer (the same, plus RMS q/k norm
and a second, image-only attention in blocks 0-12), and measures, with the project's own code paths:

- rollout images/s (sd3_adrpo.rollout.SD3Sampler: Euler ODE + CFG + VAE decode) at 512 and 1024 px, 10 and 28
  steps, CFG on and off, and with torch.compile on and off (SD3.5: 10 steps, eager only);
- training samples/s of one ADRPO step (LoRA r=32, the adapter-off reference pass included, AdamW step) under
  loss_guidance conditional (the default) and guided;
- peak GPU memory of each config profile (SD3: configs/sd3_medium_80gb.yaml, configs/sd3_medium_24gb.yaml; SD3.5:
  configs/sd35_medium.yaml and it with the 24 GB profile's memory knobs): a rollout and a training step with the
  profile's batch sizes, gradient checkpointing and optimizer, plus the text encoders' weights where the profile
  keeps them resident (the start-up peak of encoding every prompt is reported apart);
- MFU: FLOPs counted by torch.utils.flop_counter on one transformer forward, against the card's dense bf16 peak;
- FLUX.1-dev (19 double- and 38 single-stream blocks, width 3072, the guidance embedding; the same 16-channel VAE):
  rollouts at 10 steps (one pass a step: its guidance is an input) and an ADRPO step with configs/flux1_dev.yaml
  (gradient checkpointing, prompts pre-encoded), through the same sampler and loss via its model family.

    python benchmarks/gpu_sd3_medium.py --out benchmarks/out/gpu_sd3_medium.json        # one H100: ~5-8 min + FLUX
    python benchmarks/gpu_sd3_medium.py --tiny                                          # CPU smoke test (CI)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sd3_adrpo.config import parse_args  # noqa: E402
from sd3_adrpo.families import family_for_pipeline  # noqa: E402
from sd3_adrpo.models import add_lora  # noqa: E402
from sd3_adrpo.rollout import SD3Sampler  # noqa: E402
from sd3_adrpo.update import fm_batch_loss, loss_noise  # noqa: E402

# Public SD3-medium shapes; --tiny shrinks every width and depth for a CPU smoke test. ``dual``: how many leading
# blocks of SD3.5-medium have the second attention (its dual_attention_layers 0-12).
FULL = dict(layers=24, heads=24, head_dim=64, joint_dim=4096, pooled=2048, vae=(128, 256, 512, 512), vae_layers=2,
            clip_l=(768, 12, 12, 3072), clip_g=(1280, 32, 20, 5120), t5=(4096, 24, 64, 10240), clip_len=77, t5_len=256,
            dual=13)
TINY = dict(layers=2, heads=2, head_dim=16, joint_dim=64, pooled=64, vae=(8, 16, 16, 16), vae_layers=1,
            clip_l=(32, 2, 2, 64), clip_g=(32, 2, 2, 64), t5=(64, 2, 2, 128), clip_len=16, t5_len=8, dual=1)
# What SD3.5-medium's transformer config adds to SD3-medium's (SD3Transformer2DModel arguments)
ARCHS = {"SD3-medium": lambda shapes: dict(pos_embed_max_size=192),
         "SD3.5-medium": lambda shapes: dict(pos_embed_max_size=384, qk_norm="rms_norm",
                                             dual_attention_layers=tuple(range(shapes["dual"])))}
# Public FLUX.1-dev shapes (FluxTransformer2DModel); context: T5 tokens only (CLIP-L gives the pooled vector)
FLUX_FULL = dict(double=19, single=38, heads=24, head_dim=128, rope=(16, 56, 56), joint_dim=4096, pooled=768,
                 vae=(128, 256, 512, 512), vae_layers=2, ctx=256)
FLUX_TINY = dict(double=1, single=1, heads=2, head_dim=16, rope=(4, 6, 6), joint_dim=64, pooled=64,
                 vae=(8, 16, 16, 16), vae_layers=1, ctx=8)
DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def _vae(shapes: dict, dtype, shift_factor: float, scaling_factor: float):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=shapes["vae"],
        layers_per_block=shapes["vae_layers"], down_block_types=("DownEncoderBlock2D",) * len(shapes["vae"]),
        up_block_types=("UpDecoderBlock2D",) * len(shapes["vae"]), norm_num_groups=min(32, shapes["vae"][0]),
        use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift_factor,
        scaling_factor=scaling_factor).to(dtype).requires_grad_(False).eval()


def build_flux(shapes: dict, device, dtype):
    """FLUX.1-dev's transformer, VAE and dynamically shifted scheduler as a pipeline-like namespace (its family, FLUX,
    comes from the transformer's class)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    with torch.device(device):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=shapes["double"], num_single_layers=shapes["single"],
            attention_head_dim=shapes["head_dim"], num_attention_heads=shapes["heads"],
            joint_attention_dim=shapes["joint_dim"], pooled_projection_dim=shapes["pooled"], guidance_embeds=True,
            axes_dims_rope=shapes["rope"]).to(dtype)
        vae = _vae(shapes, dtype, 0.1159, 0.3611)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    return SimpleNamespace(transformer=transformer.requires_grad_(False).eval(), vae=vae, scheduler=scheduler,
                           vae_scale_factor=2 ** (len(shapes["vae"]) - 1))


def build(shapes: dict, device, dtype, arch: str = "SD3-medium"):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    if arch == "FLUX.1-dev":
        return build_flux(shapes, device, dtype)
    with torch.device(device):
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=shapes["layers"],
            attention_head_dim=shapes["head_dim"], num_attention_heads=shapes["heads"],
            joint_attention_dim=shapes["joint_dim"], caption_projection_dim=shapes["heads"] * shapes["head_dim"],
            pooled_projection_dim=shapes["pooled"], **ARCHS[arch](shapes)).to(dtype)
        vae = _vae(shapes, dtype, 0.0609, 1.5305)
    transformer.requires_grad_(False).eval()
    pipe = SimpleNamespace(transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                           vae_scale_factor=2 ** (len(shapes["vae"]) - 1))
    return pipe


def text_encoders(shapes: dict, device, dtype) -> list[torch.nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    mods = []
    with torch.device(device):
        for hidden, layers, heads, inter in (shapes["clip_l"], shapes["clip_g"]):
            mods.append(CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                projection_dim=hidden, vocab_size=49408)).to(dtype))
        d, layers, heads, ff = shapes["t5"]
        mods.append(T5EncoderModel(T5Config(d_model=d, num_layers=layers, num_heads=heads, d_kv=64, d_ff=ff,
                                            vocab_size=32128, feed_forward_proj="gated-gelu")).to(dtype))
    return [m.requires_grad_(False).eval() for m in mods]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats=2):
    fn()  # warm-up (and compilation)
    sync(device)
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    return (time.perf_counter() - t) / repeats


def embeds(shapes, n, device, dtype, g):
    length = shapes.get("ctx") or 2 * shapes["clip_len"] + shapes["t5_len"]  # FLUX: T5 only; SD3: CLIP-L, -G, T5
    ctx = torch.randn(n, length, shapes["joint_dim"], generator=g).to(device, dtype)
    return ctx, torch.randn(n, shapes["pooled"], generator=g).to(device, dtype)


def rollout_speed(pipe, shapes, device, dtype, resolution, steps, cfg_scale, batch, vae_batch=None) -> float:
    sampler = SD3Sampler(pipe, device, num_inference_steps=steps, guidance_scale=cfg_scale, max_sequence_length=0,
                         batch_size=batch, vae_batch_size=vae_batch or batch)
    g = torch.Generator().manual_seed(0)
    sampler._cache[""] = tuple(x[0] for x in embeds(shapes, 1, device, dtype, g))  # the CFG negative
    emb, pooled = embeds(shapes, batch, device, dtype, g)
    noise = torch.randn(batch, *sampler.latent_shape(resolution), generator=g)
    seconds = timed(lambda: sampler.decode(sampler.denoise(noise, emb, pooled)), device)
    return batch / seconds


def flops_per_forward(pipe, shapes, device, dtype, resolution) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    g = torch.Generator().manual_seed(0)
    emb, pooled = embeds(shapes, 1, device, dtype, g)
    x = torch.randn(1, 16, resolution // 8, resolution // 8, generator=g).to(device, dtype)
    family = family_for_pipeline(pipe, 3.5)  # FLUX.1-dev: its guidance input; SD3: no effect
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        family.forward(pipe.transformer, x, torch.tensor([500.0], device=device), emb, pooled)
    return float(counter.get_total_flops())


def train_step_speed(pipe, shapes, device, dtype, resolution, batch, profile, guided=False) -> tuple[float, float]:
    """Samples/s of ADRPO steps (forward with LoRA, reference forward, backward, optimizer) and peak GiB; ``guided``:
    loss_guidance guided (the conditional and unconditional passes of policy and reference)."""
    cfg = profile
    transformer = pipe.transformer
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    opt_cls = torch.optim.AdamW
    if cfg.optimizer == "adamw8bit":
        import bitsandbytes

        opt_cls = bitsandbytes.optim.AdamW8bit
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = opt_cls(params, lr=1e-5)
    g = torch.Generator().manual_seed(1)
    emb, pooled = embeds(shapes, batch, device, dtype, g)
    x1 = torch.randn(batch, 16, resolution // 8, resolution // 8, generator=g).to(device)  # fp32, as rollouts keep x1
    adv = torch.randn(batch, generator=g).clamp(-1, 1).to(device)
    noise, sigmas = loss_noise(cfg, tuple(x1.shape[1:]), (0,), range(batch))
    guidance = ((emb[0], pooled[0]), profile.guidance_scale) if guided else None  # a stand-in empty prompt
    family = family_for_pipeline(pipe, profile.guidance_scale)

    def step():
        transformer.train()
        loss, _ = fm_batch_loss(transformer, transformer, x1, noise.to(device), sigmas.to(device), emb, pooled,
                                adv, cfg.beta0 - adv, guidance, family)  # ADRPO's coefficients
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed(step, device)
    if cfg.gradient_checkpointing:
        transformer.disable_gradient_checkpointing()
    transformer.eval()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return batch / seconds, peak


def memory_knobs(profile: Path) -> list[str]:
    """A memory profile's own settings (without its base_config) as command-line overrides for another config."""
    knobs = yaml.safe_load(profile.read_text())
    knobs.pop("base_config", None)
    return [x for key, value in knobs.items() for x in (f"--{key}", str(value).lower() if isinstance(value, bool)
                                                         else str(value))]


def measure(arch: str, profiles: dict, shapes: dict, device, dtype, res, steps, peak_tflops, result: dict,
            args) -> list[dict]:
    """Rollout rows, FLOPs per forward and one ADRPO training step per memory profile of one architecture. SD3-medium
    gets the whole rollout grid (and torch.compile); SD3.5-medium, the 10-step rows in eager mode."""
    rows = []
    pipe = build(shapes, device, dtype, arch)
    info = result.setdefault("models", {}).setdefault(arch, {})
    info["transformer_params"] = sum(p.numel() for p in pipe.transformer.parameters())
    full_grid = arch == "SD3-medium"
    true_cfg = family_for_pipeline(pipe).true_cfg  # FLUX.1-dev: one pass a step, its guidance an input

    # rollout throughput, eager then compiled
    for compiled in ((False,) if args.no_compile or args.tiny or not full_grid else (False, True)):
        if compiled:
            pipe.transformer = torch.compile(pipe.transformer)
        for r in res[:1] if compiled else res:  # compiled: 512 px, 10 steps only (each new shape recompiles)
            for s in steps[:1] if compiled or not full_grid else steps:
                for cfg_scale in (4.5, 1.0) if true_cfg else (3.5,):
                    batch = 8 if r == res[0] else 4
                    ips = rollout_speed(pipe, shapes, device, dtype, r, s, cfg_scale, batch)
                    rows.append({"model": arch, "what": "rollout", "resolution": r, "steps": s,
                                 "cfg": cfg_scale > 1 and true_cfg,
                                 "compile": compiled, "batch": batch, "images_per_s": ips})
        if compiled:
            pipe.transformer = pipe.transformer._orig_mod
            torch._dynamo.reset()  # compiled graphs hold the weights: free them with the model
    flops = {r: flops_per_forward(pipe, shapes, device, dtype, r) for r in res}
    info["tflop_per_forward"] = {r: f / 1e12 for r, f in flops.items()}
    for row in rows:
        forwards = row["steps"] * (2 if row["cfg"] else 1)
        achieved = row["images_per_s"] * forwards * flops[row["resolution"]] / 1e12
        row["mfu"] = achieved / peak_tflops  # transformer FLOPs only; VAE decode time counts against it

    # one ADRPO training step per profile, LoRA r=32, at the profile's train batch size
    add_lora(pipe.transformer, rank=32 if not args.tiny else 4)
    for pname, profile in profiles.items():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        r = res[0]
        # the profile's rollout (its batch sizes, CFG) and then its training step, under one peak-memory window
        rollout_speed(pipe, shapes, device, dtype, r, steps[0], profile.guidance_scale, profile.rollout_batch_size,
                      profile.vae_batch_size)
        for guided in (False, True) if true_cfg else (False,):  # FLUX: guided is the conditional field
            sps, peak = train_step_speed(pipe, shapes, device, dtype, r, profile.train_batch_size, profile, guided)
            if not profile.free_text_encoders:  # this profile keeps CLIP-L, CLIP-G and T5 resident all run long
                peak += result["text_encoders_gib"]
            # assumed cost: policy forward + backward (~2 forwards: input gradients, LoRA weights only) + reference
            # forward = 4 forwards, + 1 recompute with gradient checkpointing; twice that with the guided loss
            tflops = sps * (4 + profile.gradient_checkpointing) * (1 + guided) * flops[r] / 1e12
            rows.append({"model": arch, "what": f"train step ({pname}{', guided' if guided else ''})",
                         "resolution": r, "batch": profile.train_batch_size,
                         "gradient_checkpointing": profile.gradient_checkpointing, "optimizer": profile.optimizer,
                         "loss_guidance": "guided" if guided else "conditional", "samples_per_s": sps,
                         "peak_gib": peak, "mfu": tflops / peak_tflops})
    del pipe
    gc.collect()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny shapes on CPU: a smoke test of this script")
    ap.add_argument("--no_compile", action="store_true", help="skip the torch.compile rows")
    ap.add_argument("--out", default="benchmarks/out/gpu_sd3_medium.json")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("error: no CUDA GPU; run with --tiny for the CPU smoke test")
    shapes, dtype = (TINY, torch.float32) if args.tiny else (FULL, torch.bfloat16)
    res = (64, 128) if args.tiny else (512, 1024)
    steps = (2, 3) if args.tiny else (10, 28)
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    peak_tflops = next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), float("nan"))
    profiles = {"SD3-medium": {p: parse_args(["--config", str(ROOT / f"configs/sd3_medium_{p}.yaml")])
                               for p in ("80gb", "24gb")},
                "SD3.5-medium": {"80gb": parse_args(["--config", str(ROOT / "configs/sd35_medium.yaml")]),
                                 "24gb": parse_args(["--config", str(ROOT / "configs/sd35_medium.yaml"),
                                                     *memory_knobs(ROOT / "configs/sd3_medium_24gb.yaml")])},
                "FLUX.1-dev": {"80gb": parse_args(["--config", str(ROOT / "configs/flux1_dev.yaml")])}}
    rows, result = [], {"device": name, "dense_bf16_tflops": peak_tflops, "tiny": args.tiny, "torch": torch.__version__,
                        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                                 text=True, cwd=ROOT).stdout.strip()}
    t0 = time.perf_counter()

    # 1. text encoding with every encoder resident (the start-up peak of both profiles)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    encoders = text_encoders(shapes, device, dtype)
    with torch.no_grad():
        for enc, length in zip(encoders, (shapes["clip_len"], shapes["clip_len"], shapes["t5_len"])):
            enc(torch.randint(0, 1000, (16, length), device=device))
    result["text_encoders_gib"] = sum(p.numel() * p.element_size() for e in encoders for p in e.parameters()) / 2**30
    result["encode_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    del encoders
    if device.type == "cuda":
        torch.cuda.empty_cache()

    for arch, arch_profiles in profiles.items():
        arch_shapes = shapes if arch != "FLUX.1-dev" else (FLUX_TINY if args.tiny else FLUX_FULL)
        rows += measure(arch, arch_profiles, arch_shapes, device, dtype, res, steps, peak_tflops, result, args)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next architecture's peaks start from its own weights only
    result["rows"], result["seconds"] = rows, time.perf_counter() - t0

    print(f"SD3-medium, SD3.5-medium and FLUX.1-dev architectures{' (TINY shapes)' if args.tiny else ''}, random "
          f"weights, {dtype}, "
          f"{name}, commit {result['commit']}")
    print(f"text encoders {result['text_encoders_gib']:.1f} GiB (encoding peak {result['encode_peak_gib']:.1f} GiB)")
    for arch, info in result["models"].items():
        print(f"{arch}: transformer {info['transformer_params'] / 1e9:.2f}B params; TFLOP per forward: "
              + ", ".join(f"{r}px {v:.2f}" for r, v in info["tflop_per_forward"].items()))
    print(f"{'model':14s}{'what':24s}{'res':>6s}{'steps':>6s}{'cfg':>6s}{'compile':>8s}{'batch':>6s}{'per s':>10s}"
          f"{'MFU':>7s}{'peak GiB':>9s}")
    for row in rows:
        rate = row.get("images_per_s", row.get("samples_per_s"))
        print(f"{row['model']:14s}{row['what']:24s}{row['resolution']:>6d}{row.get('steps', ''):>6}"
              f"{str(row.get('cfg', '')):>6s}{str(row.get('compile', '')):>8s}{row['batch']:>6d}{rate:>10.3f}"
              f"{row['mfu']:>7.1%}{row.get('peak_gib', float('nan')):>9.1f}")
    print(f"total {result['seconds']:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
