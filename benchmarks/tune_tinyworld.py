#!/usr/bin/env python
"""Tune each method's main knob on the tiny world's *tune* split (never the held-out one), same budget per run.

    python benchmarks/tune_tinyworld.py --out results/tinyworld_tuning --jobs 2     # every method's grid
    python benchmarks/tune_tinyworld.py --methods adrpo --out results/tinyworld_tuning

Every run is the main job (``--config``, default configs/tiny.yaml) with one grid point's overrides and its final
before/after evaluation moved to ``prompts/tinyworld_tune.txt``. A run's score is its ClipScore gain over the base
on the tune prompts (same seeds); a grid point qualifies only when the upper end of its oracle-accuracy interval is
>= 0 (accuracy not down beyond noise). The best qualifying point per method is the recommended default.
Writes ``runs/<method>/<point>/`` (each a normal run folder), ``tuning.json`` and ``tuning.md`` under --out.
Runs whose summary.json exists are not repeated, so an interrupted sweep resumes; a finished run trained with other
settings, or on other files behind the same paths (a rebuilt tiny world, an edited prompt file), is refused before
anything starts, never reused or overwritten.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from sd3_adrpo.config import parse_args  # noqa: E402
from sd3_adrpo.io import atomic_write_bytes, atomic_write_json  # noqa: E402

from _launch import changed_settings, cli_overrides, equal_compute_overrides, input_fingerprint, run_logged  # noqa: E402

# One knob (or the pair the issue names) per method, three or four points each. ADRPO's advantages are group-normalised
# (configs/tiny.yaml: adv_scale group_std, clip +-2 beta0), so beta0 moves the clip with it; its other knobs were
# chosen by the hand probes in results/tinyworld_tuning/README.md. Rewards are 100 * cosine (a group's spread is a
# few points), so ORW's tau spans weak (0.1: e^0.1 per point) to sharp (0.5) reward weighting.
GRIDS: dict[str, list[dict]] = {
    "adrpo": [{"beta0": b, "adv_clip_min": -2 * b, "adv_clip_max": 2 * b} for b in (0.5, 1.0, 2.0)],
    "orw_cfm_w2": [{"orw_tau": t, "orw_alpha": a} for t in (0.1, 0.5) for a in (1.0, 4.0)],
    # RAFT has no regulariser: at the shared learning rate it collapses at every fraction, so its fourth point
    # asks whether a 10x smaller step only slows that down
    "raft": [{"raft_fraction": f} for f in (0.125, 0.25, 0.5)] + [{"raft_fraction": 0.25, "learning_rate": 1e-4}],
    # DPO: the first sweep's best beta (500) was its smallest, so a fourth point goes one step further
    "dpo": [{"dpo_beta": b} for b in (125.0, 500.0, 2000.0, 8000.0)],
}
TUNE_PROMPTS = "prompts/tinyworld_tune.txt"
RECORD = "sweep_inputs.json"  # in each run folder: run_inputs() as the run was trained (its settings: config.yaml)


def point_name(point: dict) -> str:
    return "_".join(f"{k}={v}" for k, v in point.items())


def run_argv(method: str, point: dict, args, out: Path) -> list[str]:
    """The training command line of one grid point: the main job with its final evaluation on the tune split, the
    user's overrides, then the method's equal-compute setting and the point itself."""
    cfg = parse_args(["--config", args.config, *args.train_overrides])
    return ["--config", args.config, "--method", method, "--output_dir", str(out), "--overwrite_output_dir", "true",
            "--final_eval_prompts", TUNE_PROMPTS, "--final_eval_num_prompts", str(args.eval_num_prompts),
            "--eval_prompts", TUNE_PROMPTS, "--checkpoint_every", "0", "--sample_every", "0", *args.train_overrides,
            *cli_overrides({**equal_compute_overrides(method, cfg), **point})]


def run_inputs(argv: list[str]) -> dict[str, str]:
    """The sha256 of the files behind a run's model, prompts and reward (its settings are in its own config.yaml)."""
    cfg = parse_args(argv)
    return input_fingerprint(cfg.pretrained_model, cfg.train_prompts, cfg.reward_model, TUNE_PROMPTS)


def stale_reason(run: Path, argv: list[str]) -> str:
    """Why a finished run (one with summary.json) is not what ``argv`` would train; "" if it is, or if it is not
    finished (an unfinished run is simply trained again)."""
    if not (run / "summary.json").is_file():
        return ""
    missing = [f for f in ("config.yaml", RECORD) if not (run / f).is_file()]
    if missing:
        return f"{run.parent.name}/{run.name}: no {' or '.join(missing)} (trained before the sweep recorded its inputs)"
    saved, want = json.loads((run / RECORD).read_text()), run_inputs(argv)
    keys = changed_settings(run / "config.yaml", argv)
    keys += [f"the file(s) behind {p}" for p in want if saved.get(p) != want[p]]
    return f"{run.parent.name}/{run.name}: {', '.join(keys)}" if keys else ""


def run_point(method: str, point: dict, args, out: Path) -> dict:
    """Train one grid point in a subprocess (``args.threads`` torch threads), unless it is already finished, and
    return its summary metrics."""
    summary = out / "summary.json"
    if not summary.is_file():
        argv = run_argv(method, point, args, out)
        inputs = run_inputs(argv)  # as training starts
        run_logged(["train_sd3_adrpo.py", *argv], out.parent / f"{out.name}.log", args.threads)
        # written once training has finished: the trainer empties `out` first (--overwrite_output_dir true)
        atomic_write_json(out / RECORD, inputs)
    return json.loads(summary.read_text())["metrics"]


def loop_minutes(run: Path):
    """The training loop's time of a run (the sum of its iterations' time_total), or None without metrics.jsonl."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    return sum(json.loads(line).get("time_total", 0.0) for line in path.read_text().splitlines() if line) / 60


def qualifies(metrics: dict) -> bool:
    oracle = metrics.get("oracle_accuracy")
    return oracle is None or oracle["ci_high"] >= 0


def _fmt(m: dict) -> str:
    return f"{m['diff']:+.2f} [{m['ci_low']:+.2f}, {m['ci_high']:+.2f}]"


def choose(results: list[dict]) -> dict[str, tuple[dict, bool]]:
    """Per method, (its chosen run, whether that run qualified): the largest ClipScore gain among the runs whose oracle
    accuracy does not fall beyond noise; if none qualifies, the largest gain anyway (flagged, so it is not hidden)."""
    best: dict[str, tuple[dict, bool]] = {}
    for r in results:
        key = (qualifies(r["metrics"]), r["metrics"]["clip_score"]["diff"])
        if r["method"] not in best or key > (best[r["method"]][1], best[r["method"]][0]["metrics"]["clip_score"]["diff"]):
            best[r["method"]] = (r, key[0])
    return best


def write_report(results: list[dict], args, out: Path, wall_s: float) -> None:
    best = choose(results)
    lines = ["# Tiny-world tuning sweep (tune split)", "",
             f"Command: `{args.command}`  ", f"Commit: `{args.commit}`  ", f"Machine: {platform.platform()}, "
             f"{os.cpu_count()} CPUs, {args.jobs} runs at a time, {args.threads} torch thread(s) each  ",
             f"Wall time of this invocation: {wall_s / 60:.1f} min (runs already done are reused, not repeated)", "",
             f"Each run: `{args.config}` with the overrides below; differences are trained - base on "
             f"{args.eval_num_prompts or 'all'} tune-split prompts x 4 images, same seeds, 95% bootstrap intervals over "
             "prompts. Chosen (bold): largest ClipScore gain whose oracle interval reaches >= 0; where no setting "
             "qualifies, the largest gain anyway, marked (oracle falls). Loop: the training loop's minutes "
             "(metrics.jsonl).", "",
             "| method | setting | ClipScore diff | ClipDiversity diff | oracle diff | loop |", "|---|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"]
        chosen, ok = best[r["method"]][0] is r, best[r["method"]][1]
        setting = ", ".join(f"{k}={v}" for k, v in r["point"].items())
        setting = f"**{setting}**{'' if ok else ' (oracle falls)'}" if chosen else setting
        loop = f"{r['loop_minutes']:.1f} min" if r.get("loop_minutes") is not None else "n/a"
        lines.append(f"| {r['method']} | {setting} | {_fmt(m['clip_score'])} | "
                     f"{_fmt(m['clip_diversity_' + m['clip_diversity_default']])} | "
                     f"{_fmt(m['oracle_accuracy']) if 'oracle_accuracy' in m else 'n/a'} | {loop} |")
    atomic_write_bytes(out / "tuning.md", ("\n".join(lines) + "\n").encode())
    data = {"command": args.command, "commit": args.commit, "wall_s": wall_s, "results": results,
            "chosen": {k: v["point"] for k, (v, _) in best.items()},
            "qualified": {k: ok for k, (_, ok) in best.items()}}
    atomic_write_bytes(out / "tuning.json", json.dumps(data, indent=2).encode())
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--out", default="results/tinyworld_tuning")
    ap.add_argument("--methods", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    ap.add_argument("--eval_num_prompts", type=int, default=0, help="tune-split prompts in each run's evaluation (0: all)")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (each a subprocess)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--train_overrides", nargs=argparse.REMAINDER, default=[],
                    help="extra --key value pairs for every run (e.g. --num_iterations 4 for a smoke test)")
    args = ap.parse_args(argv)
    args.command = shlex.join(["python", "benchmarks/tune_tinyworld.py", *(sys.argv[1:] if argv is None else argv)])
    args.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip() or "unknown"
    out = Path(args.out)
    jobs = [(m, p, out / "runs" / m / point_name(p)) for m in args.methods for p in GRIDS[m]]
    # every run is checked before any starts
    stale = [reason for m, p, run in jobs if (reason := stale_reason(run, run_argv(m, p, args, run)))]
    if stale:
        raise SystemExit(f"error: {len(stale)} finished run(s) under {out / 'runs'} were trained with other settings or "
                         f"inputs than this command would use (e.g. {stale[0]}). Delete them or pass another --out; "
                         "runs are never overwritten.")
    start = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        metrics = list(pool.map(lambda job: run_point(job[0], job[1], args, job[2]), jobs))
    results = [{"method": m, "point": p, "metrics": x, "loop_minutes": loop_minutes(run)}
               for (m, p, run), x in zip(jobs, metrics)]
    write_report(results, args, out, time.time() - start)


if __name__ == "__main__":
    main()
