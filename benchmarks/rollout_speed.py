#!/usr/bin/env python
"""Rollout throughput: sd3_adrpo's sampler vs diffusers' stock StableDiffusion3Pipeline call, same model and settings.

Both generate N prompts x K images (Euler ODE, CFG) and decode them. The stock call encodes the prompts on every
call, as it does in a training loop that uses it; ours encodes each prompt once and reuses the cache, as the trainer
does from its second iteration on ("warm"). Prints one table and writes JSON.

    python benchmarks/rollout_speed.py                      # tiny random model on CPU (build it first)
    python benchmarks/rollout_speed.py --pretrained_model stabilityai/stable-diffusion-3-medium-diffusers \\
        --resolution 512 --dtype bf16 --num_prompts 4 --samples_per_prompt 4
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from sd3_adrpo.models import DTYPES, load_pipeline
from sd3_adrpo.rollout import SD3Sampler, make_generator

PROMPTS = ["a red circle", "a blue square", "two green triangles", "a yellow circle to the left of a purple square",
           "an orange triangle", "three blue circles", "a red square and a green circle", "a purple triangle"]


def _timed(fn, repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pretrained_model", default="assets/tiny-random/sd3")
    ap.add_argument("--drop_t5", action="store_true", default=None, help="default: on when the folder has no T5")
    ap.add_argument("--max_sequence_length", type=int, default=4)
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance_scale", type=float, default=5.0)
    ap.add_argument("--num_prompts", type=int, default=8)
    ap.add_argument("--samples_per_prompt", type=int, default=4)
    ap.add_argument("--batch_size", type=int, default=32, help="our sampler's images per transformer call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/out/rollout_speed.json")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    drop_t5 = args.drop_t5 if args.drop_t5 is not None else not (Path(args.pretrained_model) / "text_encoder_3").exists()
    pipe = load_pipeline(args.pretrained_model, drop_t5=drop_t5, dtype=DTYPES[args.dtype]).to(device)
    prompts = (PROMPTS * ((args.num_prompts + len(PROMPTS) - 1) // len(PROMPTS)))[: args.num_prompts]
    n_images = args.num_prompts * args.samples_per_prompt
    sampler = SD3Sampler(pipe, device, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
                         max_sequence_length=args.max_sequence_length, batch_size=args.batch_size)

    def stock():
        pipe(prompts, num_images_per_prompt=args.samples_per_prompt, num_inference_steps=args.steps,
             guidance_scale=args.guidance_scale, height=args.resolution, width=args.resolution,
             max_sequence_length=args.max_sequence_length, output_type="np", generator=torch.Generator().manual_seed(0))

    def ours():
        sampler.sample(prompts, args.samples_per_prompt, args.resolution, make_generator(0))

    with torch.no_grad():
        t_cold = _timed(ours, 1, device)[0]  # includes encoding every prompt once
        stock()  # warm-up
        t_stock = statistics.median(_timed(stock, args.repeats, device))
        t_ours = statistics.median(_timed(ours, args.repeats, device))
    result = {
        "model": args.pretrained_model, "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "resolution": args.resolution, "steps": args.steps,
        "guidance_scale": args.guidance_scale, "images": n_images,
        "stock_images_per_s": n_images / t_stock, "ours_images_per_s": n_images / t_ours,
        "ours_cold_images_per_s": n_images / t_cold, "speedup_vs_stock": t_stock / t_ours,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "torch": torch.__version__,
    }
    print(f"{'':28s}{'images/s':>10s}")
    print(f"{'diffusers pipeline call':28s}{result['stock_images_per_s']:10.2f}")
    print(f"{'sd3_adrpo sampler (warm)':28s}{result['ours_images_per_s']:10.2f}")
    print(f"{'sd3_adrpo sampler (cold)':28s}{result['ours_cold_images_per_s']:10.2f}")
    print(f"speed-up vs stock (warm): {result['speedup_vs_stock']:.2f}x  [{n_images} images, {args.resolution}px, "
          f"{args.steps} steps, CFG {args.guidance_scale}, {args.dtype}, {result['device']}]")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
