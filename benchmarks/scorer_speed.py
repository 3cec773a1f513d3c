#!/usr/bin/env python
"""Scoring throughput (images/s) of each scorer on tiny stand-in models, and the reward server's overhead against
the same scorer in-process.

    python benchmarks/scorer_speed.py [--images 64] [--repeats 3] [--device cpu]

Stand-ins: the tiny random CLIP of ``tinyworld.stand_ins`` (clip, clip_score, pickscore), the same CLIP at 768-d
with a random LAION-layout head (aesthetic), a tiny open_clip (open_clip, hpsv2), tiny BLIP checkpoints of the
original layouts (image_reward, blip_score; built by the tests' helpers) and the oracle. The server is a real
``python -m sd3_adrpo.reward_server`` process on 127.0.0.1. Prints a markdown table; numbers measure the code path
(preprocessing, batching, transport), not real model costs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _stand_ins(out: Path) -> dict:
    import open_clip
    import torch
    from transformers import BertTokenizer, CLIPConfig, CLIPModel, CLIPProcessor

    from sd3_adrpo.metrics.base import LinearHead
    from tinyworld.stand_ins import build_tiny_clip

    clip = build_tiny_clip(out / "clip", seed=0)
    cfg = CLIPConfig.from_pretrained(clip)
    cfg.projection_dim = 768
    torch.manual_seed(1)
    CLIPModel(cfg).save_pretrained(out / "clip768")
    CLIPProcessor.from_pretrained(clip).save_pretrained(out / "clip768")
    torch.save(LinearHead(768).state_dict(), out / "head.pth")
    arch = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 16,
                                            "head_width": 16},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    (out / "BenchCLIP.json").write_text(json.dumps(arch))
    open_clip.add_model_config(out / "BenchCLIP.json")
    model = open_clip.create_model("BenchCLIP")
    torch.save(model.state_dict(), out / "open_clip.pt")
    torch.save({"state_dict": model.state_dict()}, out / "HPS.pt")
    spec = importlib.util.spec_from_file_location("blip_fixtures", ROOT / "tests/metrics/test_blip_family.py")
    blip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(blip)
    BertTokenizer(vocab={w: i for i, w in enumerate(blip.WORDS)}).save_pretrained(out / "bert")
    torch.save(blip._random_state({**blip.BLIP_SHAPES, **blip.MLP_SHAPES}), out / "ImageReward.pt")
    torch.save({"model": {k[5:]: v for k, v in blip._random_state(blip.BLIP_SHAPES, seed=1).items()}},
               out / "model_large.pth")
    bo = {"med_config": blip.MED, "vision": blip.VISION, "tokenizer": str(out / "bert")}
    return {
        "clip": {"clip": {"model": str(clip)}},
        "clip_score": {"clip_score": {"model": str(clip)}},
        "pickscore": {"pickscore": {"model": str(clip)}},
        "aesthetic": {"aesthetic": {"model": str(out / "head.pth"), "clip": str(out / "clip768")}},
        "open_clip": {"open_clip": {"model": "BenchCLIP", "pretrained": str(out / "open_clip.pt")}},
        "hpsv2": {"hpsv2": {"model": str(out / "HPS.pt"), "arch": "BenchCLIP"}},
        "image_reward": {"image_reward": {"model": str(out / "ImageReward.pt"), **bo}},
        "blip_score": {"blip_score": {"model": str(out / "model_large.pth"), **bo}},
        "oracle": {"tinyworld.scorers:Oracle": 1.0},
    }


def _rate(reward, images, prompts, repeats: int) -> float:
    reward(images, prompts)  # warm-up (the first call of a process also warms torch itself)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        reward(images, prompts)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads here and in the server process")
    ap.add_argument("--server", default="clip", help="the scorer timed through the reward server too")
    ap.add_argument("--size", type=int, default=64, help="image size in pixels (the payload the server moves)")
    ap.add_argument("--only", default=None, help="comma-separated scorers to time (default: all)")
    args = ap.parse_args()
    import torch
    import yaml

    from sd3_adrpo.rewards import build_reward
    from tinyworld.render import render_batch

    torch.set_num_threads(args.threads)
    prompts = (["a red circle", "two blue squares", "a green triangle to the left of a yellow square",
                "a purple circle and an orange triangle"] * args.images)[: args.images]
    images = render_batch(prompts, seed=0, size=args.size)
    with tempfile.TemporaryDirectory() as tmp:
        specs = _stand_ins(Path(tmp))
        rows = []
        for name, spec in specs.items():
            if args.only and name not in args.only.split(","):
                continue
            rate = _rate(build_reward(spec, device=args.device), images, prompts, args.repeats)
            rows.append((name, rate))
        server = subprocess.Popen([sys.executable, "-m", "sd3_adrpo.reward_server", "--reward",
                                   yaml.safe_dump(specs[args.server], default_flow_style=True, width=10**6).strip(),
                                   "--port", "0", "--device", args.device], cwd=ROOT, stdout=subprocess.PIPE,
                                  text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        try:
            url = server.stdout.readline().split(" on ")[1].split()[0]
            client, here = build_reward(url), build_reward(specs[args.server], device=args.device)
            local, remote = 0.0, 0.0
            for _ in range(args.repeats):  # interleaved, so a shared machine's load falls on both alike
                local = max(local, _rate(here, images, prompts, 1))
                remote = max(remote, _rate(client, images, prompts, 1))
        finally:
            server.kill()
            server.wait()
    print(f"{args.images} rendered {args.size} px images, best of {args.repeats}, device {args.device}, torch threads "
          f"{torch.get_num_threads()}\n")
    print("| scorer | images/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:.1f} |")
    print(f"| {args.server} in-process, interleaved with the server | {local:.1f} |")
    print(f"| {args.server} via reward server (127.0.0.1) | {remote:.1f} |")
    print(f"\nserver overhead for {args.server}: {1000 * (1 / remote - 1 / local):.2f} ms per image "
          f"({local / remote:.2f}x the in-process time)")


if __name__ == "__main__":
    main()
