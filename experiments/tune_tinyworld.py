#!/usr/bin/env python
"""Tune each method's main knob on the tiny world's *tune* split (never the held-out one), same budget per run.

    python experiments/tune_tinyworld.py --out results/tinyworld_tuning --jobs 2     # every method's grid
    python experiments/tune_tinyworld.py --methods adrpo --out results/tinyworld_tuning
    python experiments/tune_tinyworld.py --methods adrpo --seeds 0 1 2 --out ...      # each point at three seeds

Every run is the main job (``--config``, default configs/tiny.yaml) with one grid point's overrides and its final
before/after evaluation moved to ``prompts/tinyworld_tune.txt``. A run's score is its ClipScore gain over the base
on the tune prompts (same seeds); a grid point qualifies only when the upper end of its oracle-accuracy interval is
>= 0 (accuracy not down beyond noise). The best qualifying point per method is the recommended default. With
``--seeds`` every point is trained at each training seed, and a point's gain is the mean over its seeds; it qualifies
only when its oracle interval reaches >= 0 at every seed.
Writes ``runs/<method>/<point>/`` (each a normal run folder, kept local, not committed; ``<point>_seed<S>`` for a
seed other than the config's), ``tuning.json``, ``tuning.md`` and ``run_records.json`` (each run's settings and the
sha256 of the files behind its inputs, as it was trained) under --out.
Runs whose summary.json exists are not repeated, so an interrupted sweep resumes; a finished run trained with other
settings, or on other files behind the same paths (a rebuilt tiny world, an edited prompt file), is refused before
anything starts, never reused or overwritten.

    python experiments/tune_tinyworld.py --check <the recorded command's arguments>    # seconds, trains nothing

compares run_records.json with what that command would train now and exits 1 naming every run that differs (or has
no record, or no result in tuning.json), 0 if all are current; it needs no run folder, so it works in a fresh clone.
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
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

from sd3_adrpo.config import parse_args  # noqa: E402
from sd3_adrpo.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from sd3_adrpo.tables import mean_and_se  # noqa: E402

from _launch import (RECORDS, changed_settings, cli_overrides, equal_compute_overrides, input_fingerprint,  # noqa: E402
                     read_records, report_check, run_logged, saved_settings, write_records)

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


def run_dir(out: Path, method: str, point: dict, seed: int, config_seed: int) -> Path:
    """A run's folder: ``runs/<method>/<point>``, with ``_seed<S>`` for a training seed other than the config's (so
    a single-seed sweep's runs are the config-seed runs of a later multi-seed one)."""
    return out / "runs" / method / (point_name(point) + ("" if seed == config_seed else f"_seed{seed}"))


def run_argv(method: str, point: dict, args, out: Path, seed: int) -> list[str]:
    """The training command line of one grid point at one training seed: the main job with its final evaluation on
    the tune split, the user's overrides, then the method's equal-compute setting, the point itself and the seed."""
    cfg = parse_args(["--config", args.config, *args.train_overrides])
    return ["--config", args.config, "--method", method, "--output_dir", str(out), "--overwrite_output_dir", "true",
            "--final_eval_prompts", TUNE_PROMPTS, "--final_eval_num_prompts", str(args.eval_num_prompts),
            "--eval_prompts", TUNE_PROMPTS, "--checkpoint_every", "0", "--sample_every", "0", *args.train_overrides,
            *cli_overrides({**equal_compute_overrides(method, cfg), **point, "seed": seed})]


def run_inputs(argv: list[str]) -> dict[str, str]:
    """The sha256 of the files behind a run's model, prompts and reward (its settings are in its own config.yaml)."""
    cfg = parse_args(argv)
    return input_fingerprint(cfg.pretrained_model, cfg.train_prompts, cfg.reward_model, TUNE_PROMPTS)


def differences(settings: dict, inputs: dict, argv: list[str]) -> list[str]:
    """How a run trained with ``settings`` on files with fingerprints ``inputs`` differs from what ``argv`` would
    train: the changed settings, then each input whose file(s) changed; [] if it does not."""
    want = run_inputs(argv)
    return changed_settings(settings, argv) + [f"the file(s) behind {p}" for p in want if inputs.get(p) != want[p]]


def stale_reason(run: Path, argv: list[str]) -> str:
    """Why a finished run (one with summary.json) is not what ``argv`` would train; "" if it is, or if it is not
    finished (an unfinished run is simply trained again)."""
    if not (run / "summary.json").is_file():
        return ""
    missing = [f for f in ("config.yaml", RECORD) if not (run / f).is_file()]
    if missing:
        return f"{run.parent.name}/{run.name}: no {' or '.join(missing)} (trained before the sweep recorded its inputs)"
    keys = differences(saved_settings(run / "config.yaml"), json.loads((run / RECORD).read_text()), argv)
    return f"{run.parent.name}/{run.name}: {', '.join(keys)}" if keys else ""


def record_key(run: Path, out: Path) -> str:
    return run.relative_to(out).as_posix()


def run_record(run: Path) -> dict:
    """What run_records.json keeps of a finished run, read from its folder: its settings and input fingerprints."""
    return {"settings": saved_settings(run / "config.yaml"), "inputs": json.loads((run / RECORD).read_text())}


def check_records(jobs: list[tuple], args, out: Path) -> list[str]:
    """--check: for each run of the sweep, how its record in out/run_records.json differs from what this command
    would train, or that it has no record or no result in out/tuning.json; [] when every run is current. Reads no
    run folder."""
    records = read_records(out)
    report = json.loads((out / "tuning.json").read_text()) if (out / "tuning.json").is_file() else {}
    results = {(r["method"], point_name(r["point"]), r.get("seed")) for r in report.get("results", [])}
    problems = []
    for m, p, seed, run in jobs:
        key = record_key(run, out)
        if key not in records:
            problems.append(f"{key}: not in {RECORDS}")
            continue
        keys = differences(records[key]["settings"], records[key]["inputs"], run_argv(m, p, args, run, seed))
        keys += [] if (m, point_name(p), seed) in results else ["no result in tuning.json"]
        if keys:
            problems.append(f"{key}: {', '.join(keys)}")
    return problems


def run_point(method: str, point: dict, seed: int, args, out: Path) -> dict:
    """Train one grid point at one seed in a subprocess (``args.threads`` torch threads), unless it is already
    finished, and return its summary metrics."""
    summary = out / "summary.json"
    if not summary.is_file():
        argv = run_argv(method, point, args, out, seed)
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


def _fmt(m: dict, digits: int = 2) -> str:
    return f"{m['diff']:+.{digits}f} [{m['ci_low']:+.{digits}f}, {m['ci_high']:+.{digits}f}]"


def by_point(results: list[dict]) -> list[dict]:
    """The runs grouped per (method, point), in order: {"method", "point", "runs", "gain" (mean ClipScore gain over
    the point's seeds), "qualifies" (its oracle accuracy does not fall beyond noise at any seed)}."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["method"], point_name(r["point"])), []).append(r)
    return [{"method": runs[0]["method"], "point": runs[0]["point"], "runs": runs,
             "gain": mean_and_se([r["metrics"]["clip_score"]["diff"] for r in runs])[0],
             "qualifies": all(qualifies(r["metrics"]) for r in runs)} for runs in groups.values()]


def choose(points: list[dict]) -> dict[str, tuple[dict, bool]]:
    """Per method, (its chosen point, whether it qualified): the largest mean ClipScore gain among the points whose
    oracle accuracy does not fall beyond noise; if none qualifies, the largest gain anyway (flagged, so it is not
    hidden)."""
    best: dict[str, tuple[dict, bool]] = {}
    for p in points:
        if p["method"] not in best or (p["qualifies"], p["gain"]) > (best[p["method"]][1], best[p["method"]][0]["gain"]):
            best[p["method"]] = (p, p["qualifies"])
    return best


def _cell(runs: list[dict], metric, digits: int = 2) -> str:
    """One run: its difference with the 95% interval; several seeds: mean +- standard error over them."""
    values = [metric(r["metrics"]) for r in runs]
    if len(values) == 1:
        return _fmt(values[0], digits)
    mean, se = mean_and_se([v["diff"] for v in values])
    return f"{mean:+.{digits}f} ± {se:.{digits}f}"


def write_report(results: list[dict], args, out: Path, wall_s: float) -> None:
    points = by_point(results)
    best = choose(points)
    several = any(len(p["runs"]) > 1 for p in points)
    spread = ("mean ± standard error over the point's training seeds (each run's interval is in tuning.json)"
              if several else "95% bootstrap intervals over prompts")
    lines = ["# Tiny-world tuning sweep (tune split)", "",
             f"Command: `{args.command}`  ", f"Commit: `{args.commit}`  ", f"Machine: {platform.platform()}, "
             f"{os.cpu_count()} CPUs, {args.jobs} runs at a time, {args.threads} torch thread(s) each  ",
             f"Wall time of this invocation: {wall_s / 60:.1f} min (runs already done are reused, not repeated)", "",
             f"Each run: `{args.config}` with the overrides below; differences are trained - base on "
             f"{args.eval_num_prompts or 'all'} tune-split prompts x 4 images, same sampling seeds; {spread}. "
             "Chosen (bold): largest ClipScore gain whose oracle interval reaches >= 0 (at every training seed); "
             "where no setting qualifies, the largest gain anyway, marked (oracle falls). Loop: the training loop's "
             "minutes (metrics.jsonl; per run).", "",
             "| method | setting | seeds | ClipScore diff | ClipDiversity diff | oracle diff | loop |",
             "|---|---|---|---|---|---|---|"]
    for p in points:
        runs = p["runs"]
        chosen, ok = best[p["method"]][0] is p, best[p["method"]][1]
        setting = ", ".join(f"{k}={v}" for k, v in p["point"].items())
        setting = f"**{setting}**{'' if ok else ' (oracle falls)'}" if chosen else setting
        minutes = [r["loop_minutes"] for r in runs if r.get("loop_minutes") is not None]
        loop = f"{sum(minutes) / len(minutes):.1f} min" if minutes else "n/a"
        seeds = ", ".join(str(r.get("seed", "n/a")) for r in runs)
        oracle = _cell(runs, lambda m: m["oracle_accuracy"], 3) if all("oracle_accuracy" in r["metrics"] for r in runs) \
            else "n/a"
        lines.append(f"| {p['method']} | {setting} | {seeds} | {_cell(runs, lambda m: m['clip_score'])} | "
                     f"{_cell(runs, lambda m: m['clip_diversity_' + m['clip_diversity_default']])} | {oracle} | {loop} |")
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
    ap.add_argument("--seeds", type=int, nargs="+", default=None,
                    help="train every point at each of these training seeds and choose by the mean gain "
                         "(default: the config's seed only)")
    ap.add_argument("--check", action="store_true",
                    help=f"train nothing: say whether every run in --out's {RECORDS} is what this command would train "
                         "now (exit 1 if not); needs no run folder")
    ap.add_argument("--train_overrides", nargs=argparse.REMAINDER, default=[],
                    help="extra --key value pairs for every run (e.g. --num_iterations 4 for a smoke test)")
    args = ap.parse_args(argv)
    args.command = shlex.join(["python", "experiments/tune_tinyworld.py", *(sys.argv[1:] if argv is None else argv)])
    args.commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                 text=True).stdout.strip() or "unknown"
    if args.seeds is not None and "--seed" in args.train_overrides:
        raise SystemExit("error: pass the training seed either with --seeds or in --train_overrides, not both")
    out = Path(args.out)
    config_seed = parse_args(["--config", args.config, *args.train_overrides]).seed
    jobs = [(m, p, seed, run_dir(out, m, p, seed, config_seed))
            for m in args.methods for p in GRIDS[m] for seed in (args.seeds or [config_seed])]
    if args.check:
        report_check(check_records(jobs, args, out), len(jobs), out)
        return
    # every run is checked before any starts
    stale = [reason for m, p, seed, run in jobs if (reason := stale_reason(run, run_argv(m, p, args, run, seed)))]
    if stale:
        raise SystemExit(f"error: {len(stale)} finished run(s) under {out / 'runs'} were trained with other settings or "
                         f"inputs than this command would use (e.g. {stale[0]}). Delete them or pass another --out; "
                         "runs are never overwritten.")
    start = time.time()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_point, *job[:3], args, job[3]) for job in jobs]
        for _ in tqdm(as_completed(futures), total=len(futures), desc="sweep runs"):
            pass
        metrics = [f.result() for f in futures]
    results = [{"method": m, "point": p, "seed": seed, "metrics": x, "loop_minutes": loop_minutes(run)}
               for (m, p, seed, run), x in zip(jobs, metrics)]
    write_report(results, args, out, time.time() - start)
    # the record of exactly the runs in tuning.json, from their folders (reused runs as they were trained)
    write_records(out, {record_key(run, out): run_record(run) for _, _, _, run in jobs})


if __name__ == "__main__":
    main()
