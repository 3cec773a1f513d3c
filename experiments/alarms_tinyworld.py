#!/usr/bin/env python
"""Calibrate the monitor's alarms in the tiny world (issue #22): which thresholds fire before an over-optimising run
has lost held-out oracle accuracy, and never in the healthy main job.

    python experiments/alarms_tinyworld.py --jobs 2 --threads 1          # train, evaluate, choose, report: ~2 h
    python experiments/alarms_tinyworld.py --report                      # the report from what is done
    python experiments/alarms_tinyworld.py --check --jobs 2 --threads 1  # is the record current? seconds

Runs: the healthy main job (configs/tiny.yaml as it is) and two configurations that over-optimise here (RAFT at the
shared learning rate, configs/tiny_collapse.yaml's; DPO at beta 125), in two groups that share nothing: the *tune*
group's monitor watches prompts of the tune split (training seeds --tune_seeds), the *held-out* group's watches
held-out prompts (--heldout_seeds). Every run is monitored every --every iterations on --monitor_prompts prompts
balanced over the oracle's categories, keeps its best policy by oracle accuracy as best/ (keep_best) and acts on no
alarm: each records its whole trajectory, and every candidate rule is replayed on it afterwards
(``sd3_adrpo.monitor``'s own alarm logic), so one set of runs answers for every threshold.

Damage: the first monitored iteration at which a run's oracle accuracy is more than --damage below its base's (the
iteration-0 evaluation of the same prompts and noise). A rule is a candidate default when, on the tune group, it
fires strictly before the damage in every collapsing run and never in a healthy one; its threshold is then placed
halfway (geometrically for W2) between the healthy runs' most extreme value and the least extreme value a collapsing
run reached before its damage. The chosen rules are then reported on the held-out group: the lead (iterations from
the first alarm to the damage) in each collapsing run, and every firing in a healthy one (false alarms). keep-best:
each run's final/ and best/ are evaluated on --eval_num_prompts held-out prompts x 4 images (the reproduction's set;
for the tune group best/ was chosen on tune prompts, so that comparison is on prompts the choice never saw).

The runs, their records and resuming across sessions are the reproduction's (``reproduce_tinyworld.run_tasks``).
Writes under --out: tasks.json, run_records.json, alarms.json (the chosen rules and every candidate's figures),
monitor.{png,pdf} and README.md; runs/, eval/, logs/ stay local.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

from sd3_adrpo.config import parse_args  # noqa: E402
from sd3_adrpo.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from sd3_adrpo.monitor import parse_alarm, with_changes  # noqa: E402

import reproduce_tinyworld as R  # noqa: E402
from _launch import equal_compute_overrides, report_check  # noqa: E402

SPLITS = {"tune": "prompts/tinyworld_tune.txt", "heldout": "prompts/tinyworld_heldout.txt"}
# the configurations: (settings on top of the config, whether it over-optimises here)
CONFIGS = {
    "main": ({}, False),
    "raft_lr1e-3": ({"method": "raft", "raft_fraction": 0.25, "learning_rate": 1e-3}, True),
    "dpo_b125": ({"method": "dpo", "dpo_beta": 125.0}, True),
}
# the signals an alarm may watch without a judge (what would catch hacking on SD3 too), each with the direction(s)
# in which it departs when a run goes wrong; the oracle is the damage being predicted, never a candidate
CANDIDATES = (("w2_divergence", ">"), ("clip_diversity_rel_change", "<"), ("reward_change", ">"),
              ("colour_entropy_rel_change", "<"), ("colour_entropy_rel_change", ">"),
              ("edge_density_rel_change", "<"), ("edge_density_rel_change", ">"),
              ("brightness_rel_change", "<"), ("brightness_rel_change", ">"),
              ("saturation_rel_change", "<"), ("saturation_rel_change", ">"))
JUDGE = "oracle_accuracy"


def plan(args, base_cfg) -> dict[str, R.Task]:
    tasks = {}
    for split, prompts in SPLITS.items():
        seeds = args.tune_seeds if split == "tune" else args.heldout_seeds
        for config in args.configs:
            overrides, collapses = CONFIGS[config]
            method = overrides.get("method", base_cfg.method)
            for s in seeds[:args.collapse_seeds] if collapses else seeds:
                monitor = {"eval_every": args.every, "eval_prompts": prompts, "eval_num_prompts": args.monitor_prompts,
                           "alarms": [], "keep_best": JUDGE}
                name = f"{split}_{config}_s{s}"
                tasks[name] = R.Task(name, s, {**overrides, **equal_compute_overrides(method, base_cfg), **monitor,
                                               "seed": s}, ("best",))
    return tasks


def group(name: str) -> tuple[str, str, bool]:
    """(split, configuration, whether it over-optimises) of a task name."""
    split, rest = name.split("_", 1)
    config = rest.rsplit("_s", 1)[0]
    return split, config, CONFIGS[config][1]


# ---------------------------------------------------------------------------------------------------------------
# Replaying rules on recorded trajectories

def points(trajectory: list[dict]) -> list[dict]:
    """A run's monitored points in order, each with its changes from the first (the base), as the monitor saw them."""
    rows = sorted(trajectory, key=lambda r: r["iteration"])
    base = {k: v for k, v in rows[0].items() if not k.endswith(("_change", "_rel_change"))}
    return [with_changes({k: v for k, v in r.items() if not k.endswith(("_change", "_rel_change"))}, base)
            for r in rows]


def damage_iteration(pts: list[dict], drop: float) -> Optional[int]:
    """The first iteration at which the judge is more than ``drop`` below the base's; None if it never is."""
    return next((p["iteration"] for p in pts[1:] if p.get(f"{JUDGE}_change", 0.0) < -drop), None)


def first_firing(rule: str, pts: list[dict]) -> Optional[int]:
    """The first iteration after the base at which ``rule`` fires; None if it never does."""
    alarm = parse_alarm(rule)
    return next((p["iteration"] for p in pts[1:] if alarm.fired(p)), None)


def extreme(values: list[float], op: str) -> Optional[float]:
    """The value furthest in the alarm's direction (the largest for '>', the smallest for '<')."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return (max(values) if op == ">" else min(values)) if values else None


def choose(tune: dict[str, list[dict]], drop: float) -> list[dict]:
    """For every candidate (signal, direction): the healthy tune runs' most extreme value, each damaged tune run's
    most extreme value before its damage (None: no evaluation before it), whether a threshold separates them, and
    where it is put. A run of an over-optimising configuration that is never damaged constrains nothing."""
    rows = []
    for signal, op in CANDIDATES:
        healthy, before = [], {}
        for name, pts in tune.items():
            dmg = damage_iteration(pts, drop)
            if not group(name)[2]:
                healthy += [p.get(signal) for p in pts[1:]]
            elif dmg is not None:
                before[name] = extreme([p.get(signal) for p in pts[1:] if p["iteration"] < dmg], op)
        h = extreme(healthy, op)
        reached = [v for v in before.values() if v is not None]
        least = (min(reached) if op == ">" else max(reached)) if len(reached) == len(before) and reached else None
        separable = h is not None and least is not None and (least > h if op == ">" else least < h)
        threshold = None
        if separable:
            threshold = math.sqrt(h * least) if signal == "w2_divergence" and h > 0 else (h + least) / 2
        rows.append({"signal": signal, "op": op, "healthy_extreme": h, "collapsing_before_damage": before,
                     "separable": separable, "threshold": threshold,
                     "rule": None if threshold is None else f"{signal} {op} {threshold:.3g}"})
    return rows


def evaluate_rules(rules: list[str], runs: dict[str, list[dict]], drop: float) -> dict[str, dict]:
    """Per run: its damage iteration, each rule's first firing, the earliest firing of any, the lead (damage minus
    the earliest firing; None where either is missing)."""
    out = {}
    for name, pts in runs.items():
        fires = {rule: first_firing(rule, pts) for rule in rules}
        first = min((f for f in fires.values() if f is not None), default=None)
        dmg = damage_iteration(pts, drop)
        out[name] = {"damage": dmg, "fires": fires, "first": first,
                     "lead": None if dmg is None or first is None else dmg - first,
                     "last_iteration": pts[-1]["iteration"]}
    return out


# ---------------------------------------------------------------------------------------------------------------
# Report

def _v(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.3g}"


def candidates_table(rows: list[dict]) -> list[str]:
    lines = ["| Signal | Fires when | Healthy runs' extreme | Collapsing runs' extreme before damage | Threshold |",
             "|---|---|---|---|---|"]
    for r in rows:
        before = ", ".join(f"{_v(v)}" for v in r["collapsing_before_damage"].values())
        lines.append(f"| `{r['signal']}` | {r['op']} | {_v(r['healthy_extreme'])} | {before} | "
                     + (f"**{r['threshold']:.3g}**" if r["separable"] else "does not separate") + " |")
    return lines


def runs_table(results: dict[str, dict], rules: list[str]) -> list[str]:
    lines = ["| Run | Over-optimises | Damage at | " + " | ".join(f"`{r}`" for r in rules) + " | Lead |",
             "|" + "---|" * (4 + len(rules))]
    for name, r in results.items():
        collapses = group(name)[2]
        lead = ("–" if not collapses else "no damage" if r["damage"] is None else
                "missed" if r["lead"] is None or r["lead"] <= 0 else f"{r['lead']}")
        if not collapses:
            lead = "false alarm" if r["first"] is not None else "none fired (correct)"
        lines.append(f"| {name} | {'yes' if collapses else 'no'} | "
                     f"{'–' if r['damage'] is None else r['damage']} | "
                     + " | ".join("–" if r["fires"][rule] is None else str(r["fires"][rule]) for rule in rules)
                     + f" | {lead} |")
    return lines


def keep_best_table(done: dict) -> list[str]:
    lines = ["| Run | best/ from iteration | Held-out oracle: final/ | best/ | best − final |", "|---|---|---|---|---|"]
    for name, r in done.items():
        best = r.get("budgets", {}).get("best")
        if best is None or JUDGE not in r["metrics"]:
            continue
        it = max(r["trajectory"][1:], key=lambda p: p.get(JUDGE, -1))["iteration"] if len(r["trajectory"]) > 1 else "–"
        lines.append(f"| {name} | {it} | {r['metrics'][JUDGE]:.3f} | {best[JUDGE]:.3f} | "
                     f"{best[JUDGE] - r['metrics'][JUDGE]:+.3f} |")
    return lines


def plot_monitor(runs: dict[str, list[dict]], rules: list[str], drop: float, path: Path) -> None:
    """Each chosen rule's signal (and the judge) against iteration, one line per run: healthy grey, collapsing in
    colour, the held-out group solid and the tune group dashed; thresholds and the damage line drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    signals = [(JUDGE + "_change", -drop)] + [(parse_alarm(r).signal, parse_alarm(r).threshold) for r in rules]
    fig, axes = plt.subplots(1, len(signals), figsize=(4.5 * len(signals), 3.6), squeeze=False)
    colours = dict(zip([c for c, (_, bad) in CONFIGS.items() if bad], ("tab:red", "tab:purple", "tab:orange")))
    for ax, (signal, threshold) in zip(axes[0], signals):
        for name, pts in runs.items():
            split, config, collapses = group(name)
            xs = [p["iteration"] for p in pts if signal in p]
            ax.plot(xs, [p[signal] for p in pts if signal in p], color=colours.get(config, "0.6"),
                    ls="-" if split == "heldout" else "--", lw=1, alpha=0.9 if collapses else 0.6,
                    label=f"{config} ({split})" if name.endswith(("_s0", "_s3")) else None)
        ax.axhline(threshold, color="k", lw=0.8, ls=":")
        ax.set_title(signal if signal != JUDGE + "_change" else f"{JUDGE}_change (damage below {-drop:g})", fontsize=9)
        ax.set_xlabel("iteration")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    for ext in ("png", "pdf"):
        fig.savefig(f"{path}.{ext}", dpi=110)
    plt.close(fig)


def report(args, argv, out: Path, tasks: dict, done: dict, t0: float, worked: bool) -> None:
    trajectories = {n: points(r["trajectory"]) for n, r in done.items() if len(r.get("trajectory", [])) > 1}
    tune = {n: p for n, p in trajectories.items() if group(n)[0] == "tune"}
    heldout = {n: p for n, p in trajectories.items() if group(n)[0] == "heldout"}
    missing = len(tasks) - len(done)
    status = (f"All {len(tasks)} runs are done." if not missing else
              f"**Partial**: {len(done)} of {len(tasks)} runs are done (rerun the command to continue).")
    rows = choose(tune, args.damage) if tune else []
    rules = [r["rule"] for r in rows if r["separable"]]
    results = {"tune": evaluate_rules(rules, tune, args.damage), "heldout": evaluate_rules(rules, heldout, args.damage)}
    atomic_write_json(out / "alarms.json", {"damage": args.damage, "every": args.every,
                                            "monitor_prompts": args.monitor_prompts, "chosen": rules,
                                            "candidates": rows, "runs": results})
    body = [status, "", f"Monitor: every {args.every} iterations, {args.monitor_prompts} prompts balanced over the "
            f"oracle's categories x {args.monitor_images} images; damage: "
            f"oracle accuracy more than {args.damage:g} below the base's. Candidates chosen on the tune group; "
            "reported on the held-out group.", "", "## Candidates (tune group)", "", *candidates_table(rows), "",
            "## The chosen rules on every run", "", "Iteration of each rule's first firing (– : never).", "",
            "### Held-out group (the report)", "", *runs_table(results["heldout"], rules), "",
            "### Tune group (where they were chosen)", "", *runs_table(results["tune"], rules), "",
            "## keep-best", "", f"final/ and best/ (by {JUDGE} on the run's monitor prompts) on {args.eval_num_prompts} "
            "held-out prompts x 4 images; in the tune group best/ was chosen on tune prompts.", "",
            *keep_best_table(done), ""]
    if trajectories:
        plot_monitor(trajectories, rules, args.damage, out / "monitor")
        body += ["## Trajectories", "", "![monitor](monitor.png)", ""]
    R.write_readme(out, "Tiny-world alarm calibration", "alarms_tinyworld.py", argv, args, t0, done, worked, body)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml", help="base training config (the main job's)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS),
                    help="the healthy main job and the over-optimising configurations to run")
    ap.add_argument("--tune_seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--heldout_seeds", type=int, nargs="+", default=[3, 4, 5])
    ap.add_argument("--collapse_seeds", type=int, default=2,
                    help="the over-optimising configurations run the first N seeds of each group")
    ap.add_argument("--every", type=int, default=10, help="monitor every N iterations")
    ap.add_argument("--monitor_prompts", type=int, default=64)
    ap.add_argument("--damage", type=float, default=0.02, help="an oracle-accuracy drop beyond this is damage")
    ap.add_argument("--eval_prompts", default=SPLITS["heldout"], help="keep-best's final evaluation: held-out prompts")
    ap.add_argument("--eval_num_prompts", type=int, default=200)
    ap.add_argument("--images_per_prompt", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="train nothing: is every run in the record current?")
    ap.add_argument("--report", action="store_true", help="train nothing: write the report from what is done")
    ap.add_argument("--out", default="results/tinyworld_alarms")
    ap.add_argument("train_overrides", nargs="*", help="extra --key value pairs for every training run, after --")
    args = ap.parse_args(argv)
    if args.collapse_seeds < 1 or args.every < 1 or args.monitor_prompts < 0 or not 0 < args.damage < 1:
        raise SystemExit("error: --collapse_seeds and --every must be >= 1, --monitor_prompts >= 0, --damage in (0, 1)")
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.quick = False
    base_cfg = parse_args(["--config", args.config, *args.train_overrides])
    args.monitor_images = base_cfg.eval_images_per_prompt
    tasks = plan(args, base_cfg)
    if args.check:
        report_check(R.check_records(tasks, args, base_cfg, out), len(tasks), out)
        return
    if args.report:
        results = json.loads((out / "tasks.json").read_text()) if (out / "tasks.json").is_file() else {}
        records = R.read_records(out)
        current = {n for n in tasks if n in results and not R.record_problems(tasks[n], records.get(n), results[n],
                                                                             args, base_cfg, out)}
        report(args, argv, out, tasks, {n: results[n] for n in tasks if n in current}, t0, False)
        return
    R.refuse_stale(tasks, args, base_cfg, out)
    # the tune group first (the choice), then the held-out group; seed by seed
    done, worked = R.run_tasks(tasks, args, base_cfg, out, first={n for n in tasks if n.startswith("tune_")})
    report(args, argv, out, tasks, {n: done[n] for n in tasks if n in done}, t0, worked)


if __name__ == "__main__":
    main()
