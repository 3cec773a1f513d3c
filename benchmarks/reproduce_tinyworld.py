#!/usr/bin/env python
"""Reproduce the paper's comparison in the tiny world: every method x seeds at equal compute, then Table 1 on
held-out prompts, the Figure 3 trade-off plots and the Table 3 advantage-clipping ablation.

    python benchmarks/reproduce_tinyworld.py --out results/tinyworld            # full: <= 3 h on 2 CPU cores
    python benchmarks/reproduce_tinyworld.py --quick --out results/tinyworld_quick   # <= 20 min

Equal compute: every method samples the same images (iterations x prompts x samples) and takes the same number of
optimizer steps (DPO, which trains on one pair per prompt, gets samples_per_prompt / 2 inner epochs). Each run's
LoRA is then evaluated by the Table 1 pipeline with its training seed as the generation seed, and the table reports
mean +- standard error over training seeds. Writes under --out: runs/, eval/, table1.{md,csv,tex}, ablation.{md,...},
fig3.{png,pdf}, and README.md with the exact command, commit and machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sd3_adrpo.config import parse_args  # noqa: E402
from sd3_adrpo.io import atomic_write_bytes  # noqa: E402
from sd3_adrpo.plots import load_trajectory, plot_tradeoff  # noqa: E402
from sd3_adrpo.tables import Table  # noqa: E402

METHOD_LABELS = {"adrpo": "ADRPO", "fixed_beta": "Fixed beta (ablation)", "orw_cfm_w2": "ORW-CFM-W2", "raft": "RAFT",
                 "dpo": "DPO"}
CLIP_MULTIPLES = (0.5, 1.0, 2.0)


def train_run(config: str, out: Path, overrides: dict) -> Path:
    """Train one run (skipped when its final LoRA already exists, so an interrupted reproduction resumes)."""
    from sd3_adrpo.trainer import train

    if (out / "final" / "pytorch_lora_weights.safetensors").is_file():
        return out
    argv = ["--config", config, "--output_dir", str(out), "--overwrite_output_dir", "true"]
    for k, v in overrides.items():
        argv += [f"--{k}", json.dumps(v) if isinstance(v, (list, bool)) else str(v)]
    train(parse_args(argv))
    return out


def evaluate_runs(runs: dict[str, dict[int, Path]], args, eval_dir: Path) -> dict[str, dict[str, list[float]]]:
    """Table 1 metrics of every run, as per-training-seed values: {label: {metric: [value per seed]}}."""
    from sd3_adrpo import table1
    from sd3_adrpo.prompts import load_prompts

    cfg = parse_args(["--config", args.config, *args.train_overrides])
    prompts = load_prompts(args.eval_prompts)[: args.eval_num_prompts or None]
    results: dict[str, dict[str, list[float]]] = {}
    for label, by_seed in runs.items():
        for seed, run_dir in by_seed.items():
            out = eval_dir / f"{label}_s{seed}"
            argv = ["--base", cfg.pretrained_model, "--prompts", args.eval_prompts, "--seeds", str(seed),
                    "--num_prompts", str(len(prompts)), "--images_per_prompt", str(args.images_per_prompt),
                    "--steps", str(cfg.num_inference_steps), "--guidance_scale", str(cfg.guidance_scale),
                    "--resolution", str(cfg.resolution), "--max_sequence_length", str(cfg.t5_length),
                    "--clip", cfg.eval_clip_model, "--out", str(out)]
            argv += ["--drop_t5"] if cfg.drop_t5 else []
            argv += ["--run", f"run={run_dir / 'final'}", "--skip_base"] if run_dir is not None else []
            table = table1.main(argv)
            row = table.rows["run" if run_dir is not None else "Base"]
            for metric, values in row.items():
                results.setdefault(label, {}).setdefault(metric, []).extend(values)
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml", help="base training config (the tiny world's)")
    ap.add_argument("--methods", nargs="+", default=list(METHOD_LABELS), choices=list(METHOD_LABELS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval_prompts", default="prompts/tinyworld_heldout.txt")
    ap.add_argument("--eval_num_prompts", type=int, default=120, help="held-out prompts in Table 1 (0: all)")
    ap.add_argument("--images_per_prompt", type=int, default=4)
    ap.add_argument("--no_ablation", action="store_true", help="skip the advantage-clipping ablation")
    ap.add_argument("--quick", action="store_true", help="fewer iterations, prompts and one seed (<= 20 min)")
    ap.add_argument("--out", default="results/tinyworld")
    ap.add_argument("train_overrides", nargs="*", help="extra --key value pairs for every training run, after --")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.eval_num_prompts = args.seeds[:1], min(args.eval_num_prompts or 10**9, 24)
        args.train_overrides = ["--num_iterations", "10", *args.train_overrides]
    out = Path(args.out)
    t0 = time.perf_counter()
    base_cfg = parse_args(["--config", args.config, *args.train_overrides])
    common = {"eval_every": max(1, base_cfg.num_iterations // 5), "eval_prompts": args.eval_prompts,
              "final_eval_prompts": "null", "sample_every": 0, "checkpoint_every": 0}
    extra = dict(zip(args.train_overrides[::2], args.train_overrides[1::2]))
    extra = {k.lstrip("-"): v for k, v in extra.items()}

    runs: dict[str, dict[int, Path]] = {"Base": {s: None for s in args.seeds}}
    for method in args.methods:
        for seed in args.seeds:
            overrides = {**common, **extra, "method": method, "seed": seed}
            if method == "dpo":  # one pair per prompt: K/2 passes give the other methods' number of optimizer steps
                overrides["inner_epochs"] = max(1, base_cfg.samples_per_prompt // 2) * base_cfg.inner_epochs
            runs.setdefault(METHOD_LABELS[method], {})[seed] = train_run(args.config, out / "runs" / f"{method}_s{seed}",
                                                                          overrides)
    ablation: dict[str, dict[int, Path]] = {}
    if not args.no_ablation and "adrpo" in args.methods:
        for m in CLIP_MULTIPLES:
            for seed in args.seeds:
                if m == 1.0:  # the default clip is +-beta0: the ADRPO runs themselves
                    ablation.setdefault(f"clip ±{m:g}·β0", {})[seed] = runs["ADRPO"][seed]
                    continue
                overrides = {**common, **extra, "method": "adrpo", "seed": seed,
                             "adv_clip_min": -m * base_cfg.beta0, "adv_clip_max": m * base_cfg.beta0}
                ablation.setdefault(f"clip ±{m:g}·β0", {})[seed] = train_run(
                    args.config, out / "runs" / f"adrpo_clip{m:g}_s{seed}", overrides)

    results = evaluate_runs(runs, args, out / "eval")
    notes = [f"Tiny world, held-out prompts ({args.eval_prompts}), mean ± s.e. over training seeds {args.seeds}."]
    table = Table({k: {m: v for m, v in r.items() if not m.startswith("clip_diversity_")} for k, r in results.items()},
                  notes=notes)
    for ext, text in (("md", table.to_markdown()), ("csv", table.to_csv()), ("tex", table.to_latex())):
        atomic_write_bytes(out / f"table1.{ext}", text.encode())
    if ablation:
        abl = evaluate_runs(ablation, args, out / "eval_ablation")
        abl_table = Table({k: {m: v for m, v in r.items() if not m.startswith("clip_diversity_")} for k, r in abl.items()},
                          notes=["ADRPO with advantage clip ±0.5, ±1, ±2 × β0 (the poster's Table 3)."])
        atomic_write_bytes(out / "ablation.md", abl_table.to_markdown().encode())
    plot_tradeoff({label: load_trajectory(by_seed[args.seeds[0]]) for label, by_seed in runs.items() if label != "Base"},
                  out / "fig3")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    command = "python benchmarks/reproduce_tinyworld.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    readme = [f"# Tiny-world reproduction{' (quick mode)' if args.quick else ''}", "",
              f"Command: `{command}`  ", f"Commit: {commit.strip()}  ",
              f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, torch threads "
              f"{__import__('torch').get_num_threads()}  ", f"Wall time: {(time.perf_counter() - t0) / 60:.1f} min", "",
              "These are tiny-world numbers (a 64 px synthetic domain with project-trained models), not SD3 results.",
              "", "## Table 1", "", table.to_markdown()]
    if ablation:
        readme += ["## Advantage clipping (Table 3)", "", (out / "ablation.md").read_text()]
    readme += ["## Figure 3", "", "![trade-off](fig3.png)", ""]
    atomic_write_bytes(out / "README.md", "\n".join(readme).encode())
    print("\n".join(readme))


if __name__ == "__main__":
    main()
