"""Build the trained tiny world from scratch: tokenizer, CLIP judge, VAE, SD3 pipeline, quality figures, model cards.

    python -m tinyworld.build --out assets/tinyworld            # full build (about 2 h on 2 CPU cores)
    python -m tinyworld.build --out /tmp/tw --quick              # < 1 min, tiny step counts, no gates
    python -m tinyworld.build --out assets/tinyworld --stage sd3 # re-run one stage (needs earlier ones)

Layout: ``OUT/clip`` (CLIPModel + CLIPProcessor) and ``OUT/sd3`` (StableDiffusion3Pipeline without T5; the VAE
stage writes ``OUT/sd3/vae``). Each stage writes a ``build_<stage>.json`` summary next to its model; the ``report``
stage measures the quality figures, prints them and writes ``MODEL_CARD.md`` into ``OUT/sd3`` and ``OUT/clip``.
Deterministic for a seed on a given machine and thread count.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

STAGES = ("tokenizer", "clip", "vae", "sd3", "report")


def _write_json(path: Path, data: dict) -> None:
    _write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _write_text(path: Path, text: str) -> None:
    from sd3_adrpo.io import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def _read_json(path: Path) -> dict:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the stage that writes it first (see --stage)")
    return json.loads(path.read_text())


def stage_tokenizer(out: Path, args) -> dict:
    from .tokenizer import build_tokenizer, check_tokenizer

    start = time.time()
    tokenizer = build_tokenizer()
    summary = {"vocab_size": len(tokenizer), "longest_prompt_tokens": check_tokenizer(tokenizer),
               "model_max_length": tokenizer.model_max_length, "wall_s": time.time() - start}
    print(f"tokenizer: {summary['vocab_size']} tokens, longest prompt {summary['longest_prompt_tokens']} tokens "
          f"(limit {summary['model_max_length']}), no unknowns")
    return summary


def stage_clip(out: Path, args) -> dict:
    from .clip import ClipTrainConfig, train_clip

    cfg = ClipTrainConfig(seed=args.seed)
    if args.quick:
        cfg = replace(cfg, steps=8, batch_size=16, negatives=2, warmup=2)
    summary = train_clip(out / "clip", cfg, log_every=2 if args.quick else 100, save_every=0 if args.quick else 500)
    summary["command"] = _command()
    _write_json(out / "clip" / "build_clip.json", summary)
    print(f"clip: {summary['params']} params, {cfg.steps} steps, loss {summary['final_loss']:.4f}, "
          f"{summary['wall_s']:.0f}s")
    return summary


def stage_vae(out: Path, args) -> dict:
    from .vae import VaeTrainConfig, train_vae

    cfg = VaeTrainConfig(seed=args.seed)
    if args.quick:
        cfg = replace(cfg, steps=4, batch_size=8, warmup=2)
    summary = train_vae(out / "sd3" / "vae", cfg, log_every=2 if args.quick else 50,
                        save_every=0 if args.quick else 250)
    summary["command"] = _command()
    _write_json(out / "sd3" / "build_vae.json", summary)
    print(f"vae: {summary['params']} params, {cfg.steps} steps, reconstruction loss "
          f"{summary['final_reconstruction_loss']:.4f}, {summary['wall_s']:.0f}s")
    return summary


def stage_sd3(out: Path, args) -> dict:
    from .sd3 import SamplerSettings, SD3TrainConfig, train_sd3

    cfg = SD3TrainConfig(seed=args.seed)
    sampler = SamplerSettings(max_sequence_length=cfg.max_sequence_length)
    if args.quick:
        cfg = replace(cfg, steps=6, batch_size=16, warmup=2, renders_per_category=16)
    checkpoints = None if args.quick else Path(args.checkpoint_dir)
    summary = train_sd3(out / "sd3", out / "sd3" / "vae", cfg, sampler=sampler, log_every=2 if args.quick else 100,
                        checkpoint_dir=checkpoints, checkpoint_every=0 if args.quick else 500,
                        tune_n=0 if args.quick else 200)
    summary["command"] = _command()
    _write_json(out / "sd3" / "build_sd3.json", summary)
    print(f"sd3: {summary['params']} params, {cfg.steps} steps, loss {summary['final_loss']:.4f}, "
          f"{summary['wall_s']:.0f}s")
    return summary


def stage_report(out: Path, args) -> dict:
    from .clip import evaluate_clip, gate_failures
    from .sd3 import evaluate_sd3
    from .vae import evaluate_vae

    n_clip, n_sd3, n_vae = (20, 8, 16) if args.quick else (500, 4000, 400)
    eval_seed = 1000 + args.seed  # fresh renders: training uses seeds >= 10**6
    start = time.time()
    clip = evaluate_clip(out / "clip", n=n_clip, seed=eval_seed)
    vae = evaluate_vae(out / "sd3" / "vae", n=n_vae, seed=eval_seed)
    sd3 = evaluate_sd3(out / "sd3", split="heldout", n=n_sd3, seed=eval_seed)
    sd3_train = evaluate_sd3(out / "sd3", split="train", n=n_sd3, seed=eval_seed)
    figures = {"clip_ranking": clip, "vae": vae, "sd3_heldout": sd3, "sd3_train": sd3_train,
               "eval_seed": eval_seed, "wall_s": time.time() - start}
    _write_json(out / "quality.json", figures)
    print(f"CLIP ranking accuracy, true caption vs one-attribute negative (n={clip['n']} each, fresh renders):")
    print("  " + ", ".join(f"{k} {v:.3f}" for k, v in clip.items() if k != "n"))
    print(f"VAE on held-out renders (n={vae['n']}): PSNR {vae['psnr']:.2f} dB, oracle accuracy on reconstructions "
          f"{vae['oracle_accuracy']:.3f} (originals {vae['oracle_accuracy_originals']:.3f})")
    for name, rep in (("held-out", sd3), ("train", sd3_train)):
        print(f"SD3 oracle accuracy on {name} prompts (n={rep['n']}): {rep['accuracy']:.3f}; "
              + ", ".join(f"{k} {v:.3f}" for k, v in rep["per_category"].items())
              + "; aspects " + ", ".join(f"{k} {v:.3f}" for k, v in rep["per_aspect"].items())
              + "; counting by number " + ", ".join(f"{k}: {v:.3f}" for k, v in rep["per_count"].items()))
    print("Held-out: " + _category_gaps(sd3))
    print("Train: " + _category_gaps(sd3_train))
    print("Held-out: " + _composition_target(sd3))
    failures = gate_failures(clip)
    if not args.quick:
        if failures:
            print("CLIP quality gates NOT met: " + "; ".join(failures))
        if not 0.25 <= sd3["accuracy"] <= 0.75:
            print(f"SD3 held-out accuracy {sd3['accuracy']:.3f} is outside the 0.25-0.75 target")
    write_model_cards(out, figures, args)
    return figures


CLEARLY_LOWER_SE = 3.0  # "clearly lower than colour": at least this many standard errors of the difference below
TARGET_CATEGORIES = ("counting of 2-4 objects", "position", "binding")


def _gaps(report: dict) -> dict[str, tuple[float, float]]:
    """{category: (colour accuracy minus the category's, that gap in standard errors)} for the composition
    categories, and for counting also without its one-object prompts (GenEval's counting task asks for two to four;
    one object is its single-object task)."""
    p, n = dict(report["per_category"]), dict(report["n_per_category"])
    many = {k: m for k, m in report.get("n_per_count", {}).items() if k != "1"}
    if many:
        n["counting of 2-4 objects"] = sum(many.values())
        p["counting of 2-4 objects"] = sum(report["per_count"][k] * m for k, m in many.items()) / sum(many.values())
    gaps = {}
    for category in ("counting", "counting of 2-4 objects", "position", "binding"):
        if category in p:
            gap = p["colour"] - p[category]
            se = (p["colour"] * (1 - p["colour"]) / n["colour"] + p[category] * (1 - p[category]) / n[category]) ** 0.5
            gaps[category] = (gap, gap / se if se > 0 else float("nan"))
    return gaps


def _category_gaps(report: dict) -> str:
    """How far each composition category's accuracy lies below colour's, in standard errors (see `_gaps`)."""
    parts = [f"{c} {gap * 100:+.1f} points" + (f" ({z:.1f} s.e.)" if z == z else "")
             for c, (gap, z) in _gaps(report).items()]
    return "colour accuracy minus " + ", ".join(parts) + "."


def _composition_target(report: dict) -> str:
    """The tiny SD3's target "clearly lower on counting, position and binding than on colour", judged as: each of
    counting of two to four objects, position and binding at least `CLEARLY_LOWER_SE` standard errors below colour."""
    gaps = _gaps(report)
    short = [c for c in TARGET_CATEGORIES if not gaps.get(c, (0.0, 0.0))[1] >= CLEARLY_LOWER_SE]
    verdict = "met" if not short else "NOT met (" + ", ".join(short) + ")"
    return (f"Target for composition (counting of 2-4 objects, position and binding each at least "
            f"{CLEARLY_LOWER_SE:g} s.e. below colour): {verdict}.")


def _machine() -> str:
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores visible, torch threads {args_threads()}, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}")


def args_threads() -> int:
    import torch

    return torch.get_num_threads()


def _command() -> str:
    return "python -m tinyworld.build " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def write_model_cards(out: Path, figures: dict, args) -> None:
    import torch

    from .clip import gate_failures
    import diffusers
    import transformers

    clip_s = _read_json(out / "clip" / "build_clip.json")
    vae_s = _read_json(out / "sd3" / "build_vae.json")
    sd3_s = _read_json(out / "sd3" / "build_sd3.json")
    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    c = figures["clip_ranking"]
    clip_rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in c.items() if k != "n")
    failures = gate_failures(c)
    limitations = "Quality gates NOT met: " + "; ".join(failures) + "." if failures else "All ranking gates met."
    from .clip import GATES

    margin = {k: c[k] - g for k, g in GATES.items()}
    weakest = min(margin, key=margin.get)
    limitations += (f" Closest to its gate: {weakest} ({c[weakest]:.3f} vs {GATES[weakest]}). The judge knows only the "
                    "grammar's words and 64 px renders; off-grammar captions get arbitrary scores.")
    _write_text(out / "clip" / "MODEL_CARD.md", f"""# tiny-world CLIP judge

A `transformers.CLIPModel` ({clip_s['params']:,} parameters) with a `CLIPProcessor` (64 px, OpenAI mean/std,
the tiny-world BPE tokenizer). Load it like openai/clip-vit-large-patch14: `ClipScoreReward("{out / 'clip'}")`.

- Data: fresh renders (`tinyworld.render`) of every caption of the grammar (categories in equal shares),
  seeds >= 10**6; one-attribute hard negatives from `grammar.variants` ({clip_s['config']['negatives']} per image).
- Loss: symmetric in-batch InfoNCE, image -> (batch captions + all negatives), text -> batch images; plus a
  cross-entropy of each image over its own caption and own negatives, a margin keeping a caption's text embedding
  below cosine {clip_s['config'].get('text_margin')} to its negatives', and a layout probe on fixed axes shared by
  both towers (per-colour presence, count, side). The vision position table starts from 2-D sine-cosine.
  Relation captions stayed at chance without the last three (`tinyworld/clip.py` module notes).
- Config: {json.dumps(clip_s['config'])}
- Steps {clip_s['steps']}, wall time {clip_s['wall_s'] / 60:.1f} min, final loss {clip_s['final_loss']:.4f}.

## Quality (fresh renders, seed {figures['eval_seed']}, n = {c['n']} per change type)

Fraction of images whose true caption scores above a random one-attribute negative of that type
(`tinyworld.clip.evaluate_clip`). Gates: colour, shape >= 0.95; count, relation, swap >= 0.80.

| change | accuracy |
|---|---|
{clip_rows}

## Known limitations

{limitations}

## Provenance

- Training command: `{clip_s.get('command', '?')}`
- Quality figures: `{_command()}`{' (quick mode: NOT a usable model)' if args.quick else ''}
- Machine: {_machine()} (the build machine has 2 CPU cores, no GPU; training times depend on its load that day).
- Versions: {versions}
""")
    h, t, v = figures["sd3_heldout"], figures["sd3_train"], figures["vae"]
    rows = "\n".join(f"| {k} | {h['per_category'].get(k, float('nan')):.3f} | {t['per_category'].get(k, float('nan')):.3f} |"
                     for k in h["per_category"])
    aspects = "\n".join(f"| {k} | {h['per_aspect'][k]:.3f} | {t['per_aspect'].get(k, float('nan')):.3f} |"
                        for k in h["per_aspect"])
    counts = "\n".join(f"| {k} | {h['per_count'][k]:.3f} (n = {h['n_per_count'][k]}) | "
                       f"{t['per_count'].get(k, float('nan')):.3f} (n = {t['n_per_count'].get(k, 0)}) |"
                       for k in h.get("per_count", {}))
    s = sd3_s["sampler"]
    tuning = "; ".join(f"cfg {r['settings']['guidance_scale']} shift {r['settings']['shift']}: {r['accuracy']:.3f}"
                       for r in sd3_s.get("sampler_tuning", [])) or "not run"
    _write_text(out / "sd3" / "MODEL_CARD.md", f"""# tiny-world SD3

A complete `StableDiffusion3Pipeline` folder without T5: load with
`sd3_adrpo.models.load_pipeline("{out / 'sd3'}", drop_t5=True)`.

| component | what |
|---|---|
| transformer | `SD3Transformer2DModel`, {sd3_s['params']:,} parameters: {sd3_s['config']['num_layers']} layers, {sd3_s['config']['num_heads']} heads x {sd3_s['config']['head_dim']}, patch {sd3_s['config']['patch_size']} on 8x8x16 latents (16 image tokens); EMA {sd3_s['config']['ema_decay']} weights |
| vae | `AutoencoderKL`, {vae_s['params']:,} parameters, 8x down (64 px -> 8x8x16), blocks {vae_s['config']['block_out_channels']}, KL weight {vae_s['config']['kl_weight']}; shift_factor {vae_s['shift_factor']:.4f}, scaling_factor {vae_s['scaling_factor']:.4f} |
| text_encoder, text_encoder_2 | `CLIPTextModelWithProjection`, random init (seeds 10000+seed, 10001+seed), frozen, never trained |
| tokenizer, tokenizer_2 | tiny-world byte-level BPE as `CLIPTokenizer`, model_max_length 16 |
| scheduler | `FlowMatchEulerDiscreteScheduler`, shift {s['shift']} |

## Recommended sampler (chosen on the tune split; also in `tinyworld_sampler.json`)

`SD3Sampler(pipe, device, num_inference_steps={s['num_inference_steps']}, guidance_scale={s['guidance_scale']},
max_sequence_length={s['max_sequence_length']}, batch_size=...)`, resolution 64.

## Training

- Data: renders of the {sd3_s['train_prompts']} `train`-split prompts only (held-out prompts are combinations it
  never saw: see below); a pool of {sd3_s['pool_size']:,} renders (categories in equal shares), encoded once,
  a fresh posterior sample each step; {sd3_s['config']['empty_prompt_prob']:.0%} empty-prompt dropout.
- Rectified flow matching, SD3 conventions: sigma ~ logit-normal({sd3_s['config']['logit_mean']}, {sd3_s['config']['logit_std']}),
  x_t = (1 - sigma) x1 + sigma noise, target noise - x1, timestep 1000 sigma, MSE.
- Config: {json.dumps(sd3_s['config'])}
- Transformer: {sd3_s['steps']} steps, {sd3_s['train_s'] / 60:.1f} min training (+{sd3_s['encode_s']:.0f}s encoding), final loss {sd3_s['final_loss']:.4f}.
- VAE: {vae_s['steps']} steps, {vae_s['wall_s'] / 60:.1f} min, final reconstruction loss (L1 + MSE) {vae_s['final_reconstruction_loss']:.4f}.

## Quality (seed {figures['eval_seed']})

VAE on held-out renders (n = {v['n']}): PSNR {v['psnr']:.2f} dB; oracle accuracy on reconstructions
{v['oracle_accuracy']:.3f} (on the originals {v['oracle_accuracy_originals']:.3f}).

Oracle accuracy of generated images (`tinyworld.sd3.evaluate_sd3`, categories in equal shares), overall
held-out {h['accuracy']:.3f} (n = {h['n']}), train {t['accuracy']:.3f} (n = {t['n']}):

| category | held-out | train |
|---|---|---|
{rows}

Target for held-out accuracy: 0.25-0.75 ({'met' if 0.25 <= h['accuracy'] <= 0.75 else 'NOT met'}). Held-out:
{_category_gaps(h)} {_composition_target(h)} Counting prompts also ask for one object, which
GenEval counts as its own single-object task; the table below gives counting by number.
Held-out prompts (`tinyworld/grammar.py`): counting, position and binding prompts with one of three
colour-shape pairs the generator never saw counted, placed or bound, and colour prompts with a colour-shape-style
combination it never saw. Sampler tuning on the tune split (200 prompts each): {tuning}.

| aspect (fraction right) | held-out | train |
|---|---|---|
{aspects}

| counting prompts asking for | held-out | train |
|---|---|---|
{counts}

## Provenance

- VAE training command: `{vae_s.get('command', '?')}`
- Transformer training command: `{sd3_s.get('command', '?')}`
- Quality figures: `{_command()}`{' (quick mode: NOT a usable model)' if args.quick else ''}
- Machine: {_machine()} (the build machine has 2 CPU cores, no GPU; training times depend on its load that day).
- Versions: {versions}
""")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="assets/tinyworld", help="output folder (gets clip/ and sd3/)")
    parser.add_argument("--quick", action="store_true", help="tiny step counts (< 1 min): for tests, not for use")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stage", choices=("all", *STAGES), default="all", help="run one stage only")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--checkpoint-dir", default="/tmp/tinyworld_checkpoints",
                        help="where the SD3 stage saves intermediate transformers (not shipped)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    stages = STAGES if args.stage == "all" else (args.stage,)
    for stage in stages:
        start = time.time()
        globals()[f"stage_{stage}"](out, args)
        print(f"[stage {stage} done in {time.time() - start:.0f}s]", flush=True)


if __name__ == "__main__":
    main()
