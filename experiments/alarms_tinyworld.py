#!/usr/bin/env python
"""Calibrate the monitor's alarms in the tiny world (issue #22): which thresholds fire before an over-optimising run
has lost held-out oracle accuracy, and never in the healthy main job.

    python experiments/alarms_tinyworld.py --jobs 2 --threads 1          # train, evaluate, choose, report: ~2 h
    python experiments/alarms_tinyworld.py --report                      # the report from what is done
    python experiments/alarms_tinyworld.py --check --jobs 2 --threads 1  # is the record current? seconds
    python experiments/alarms_tinyworld.py --replay RUN_DIR ...          # the chosen rules on other runs' rows
    python experiments/alarms_tinyworld.py --replay RUN_DIR ... --choose_on TUNE_DIR ...  # rules chosen on those

Runs: the healthy main job (configs/tiny.yaml as it is) and three configurations that over-optimise here (RAFT at the
shared learning rate 1e-3, fast; DPO at beta 125; RAFT at its tuned 1e-4, slow), in two groups that share nothing: the *tune*
group's monitor watches prompts of the tune split (training seeds --tune_seeds), the *held-out* group's watches
held-out prompts (--heldout_seeds). Every run is monitored every --every iterations on --monitor_prompts prompts
balanced over the oracle's categories, keeps its best policy by oracle accuracy as best/ (keep_best) and acts on no
alarm: each records its whole trajectory and its training statistics (metrics.jsonl, every iteration), and every
candidate rule is replayed on them afterwards (``sd3_adrpo.monitor``'s own alarm logic: evaluation signals at each
evaluation, ``train_`` signals, means over --alarm_window iterations, after each iteration), so one set of runs answers
for every threshold.

Damage: the first monitored iteration from which a run's oracle accuracy stays more than --damage below its base's
(the iteration-0 evaluation of the same prompts and noise) for --damage_confirm evaluations in a row. A rule is
chosen when, on the tune group, it never fires in a healthy run and fires strictly before the damage in at least one
damaged run; its threshold is placed halfway (geometrically for W2) between the healthy runs' most extreme value and
the least extreme value one of the runs it warns of reached before its damage (the runs it cannot warn of are listed:
one slow collapse that no label-free signal sees must not hide the rules that see the others). The chosen rules together (an alarm is any of
them firing) are then reported on the held-out group: the lead (iterations from the first alarm to the damage) in
each damaged run, and every firing in a healthy one (false alarms). keep-best: each run's final/ and best/ are
evaluated on --eval_num_prompts held-out prompts x --images_per_prompt images (the reproduction's set), compared for
the tune group only, whose best/ was chosen on tune prompts, never on the prompts it is judged on.

The runs, their records and resuming across sessions are the reproduction's (``reproduce_tinyworld.run_tasks``).
Writes under --out: tasks.json, run_records.json, alarms.json (the chosen rules and every candidate's figures),
monitor.{png,pdf} and README.md; runs/, eval/, logs/ stay local.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

from sd3_adrpo.config import parse_args  # noqa: E402
from sd3_adrpo.plots import save_figure  # noqa: E402
from sd3_adrpo.io import atomic_write_bytes, atomic_write_json  # noqa: E402
from sd3_adrpo.monitor import TRAINING, Monitor, parse_alarm, training_key, with_changes  # noqa: E402

import reproduce_tinyworld as R  # noqa: E402
from _launch import equal_compute_overrides, report_check  # noqa: E402

SPLITS = {"tune": "prompts/tinyworld_tune.txt", "heldout": "prompts/tinyworld_heldout.txt"}
# the configurations: (settings on top of the config, whether it over-optimises here)
CONFIGS = {
    "main": ({}, False),
    "raft_lr1e-3": ({"method": "raft", "raft_fraction": 0.25, "learning_rate": 1e-3}, True),
    "dpo_b125": ({"method": "dpo", "dpo_beta": 125.0}, True),
    # RAFT at its tuned rate over-optimises too, more slowly (results/tinyworld: held-out oracle 0.18 -> 0.06 by 120)
    "raft_lr1e-4": ({"method": "raft", "raft_fraction": 0.25, "learning_rate": 1e-4}, True),
}
# the signals an alarm may watch without a judge (what would catch hacking on SD3 too), each with the direction(s)
# in which it departs when a run goes wrong; the oracle is the damage being predicted, never a candidate
CANDIDATES = (("w2_divergence", ">"), ("clip_diversity_rel_change", "<"), ("reward_change", ">"),
              ("colour_entropy_rel_change", "<"), ("colour_entropy_rel_change", ">"),
              ("edge_density_rel_change", "<"), ("edge_density_rel_change", ">"),
              ("brightness_rel_change", "<"), ("brightness_rel_change", ">"),
              ("saturation_rel_change", "<"), ("saturation_rel_change", ">"))
# the training statistics an alarm may watch (``train_`` signals: metrics.jsonl, every iteration, no evaluation)
TRAIN_CANDIDATES = (("train_reward_group_std_rel_change", "<"), ("train_w2", ">"), ("train_reward_mean_change", ">"),
                    ("train_grad_norm_rel_change", ">"))
CANDIDATES += TRAIN_CANDIDATES
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

def points(trajectory: list[dict], training: Optional[list[dict]] = None, window: int = 3) -> list[dict]:
    """A run's monitored points in order, each with its changes from the first (the base), as the monitor saw them;
    with its ``training`` rows (metrics.jsonl), also a point after every iteration holding the ``train_`` candidates
    as the monitor computes them (marked ``"train": True``, at the iteration count after that row's update, when an
    alarm on it would act)."""
    rows = sorted(trajectory, key=lambda r: r["iteration"])
    base = {k: v for k, v in rows[0].items() if not k.endswith(("_change", "_rel_change"))}
    pts = [with_changes({k: v for k, v in r.items() if not k.endswith(("_change", "_rel_change"))}, base)
           for r in rows]
    if training:
        watch = Monitor([parse_alarm(f"{signal} {op} 0") for signal, op in TRAIN_CANDIDATES], window=window)
        for row in sorted(training, key=lambda r: r["iteration"]):
            pts.append({"iteration": row["iteration"] + 1, "train": True,
                        **watch.observe_training(row["iteration"] + 1, row)[0]})
    return sorted(pts, key=lambda p: (p["iteration"], p.get("train", False)))


def evaluations(pts: list[dict]) -> list[dict]:
    """The evaluation points of a run (the base first), without its training points."""
    return [p for p in pts if not p.get("train")]


def first_chance(rule: str, pts: list[dict]) -> Optional[int]:
    """The first iteration after the base at which ``rule`` is checked: the first evaluation's, or for a ``train_``
    rule the first training point's (an alarm on the training statistics can act before any evaluation)."""
    kind = [p for p in pts[1:] if bool(p.get("train")) == parse_alarm(rule).signal.startswith(TRAINING)]
    return kind[0]["iteration"] if kind else None


def damage_iteration(pts: list[dict], drop: float, confirm: int = 1) -> Optional[int]:
    """The first iteration from which the judge stays more than ``drop`` below the base's for ``confirm``
    evaluations in a row (fewer at the end of the run): one evaluation's noise is not damage. None if never."""
    pts = evaluations(pts)
    below = [p.get(f"{JUDGE}_change", 0.0) < -drop for p in pts[1:]]
    return next((pts[1 + j]["iteration"] for j in range(len(below)) if all(below[j : j + confirm])), None)


def first_firing(rule: str, pts: list[dict]) -> Optional[int]:
    """The first iteration after the base at which ``rule`` fires; None if it never does."""
    alarm = parse_alarm(rule)
    return next((p["iteration"] for p in pts[1:] if alarm.fired(p)), None)


def extreme(values: list[float], op: str) -> Optional[float]:
    """The value furthest in the alarm's direction (the largest for '>', the smallest for '<')."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    return (max(values) if op == ">" else min(values)) if values else None


def qualifies(rule: str, runs: dict[str, list[dict]], drop: float, confirm: int) -> bool:
    """Replayed on ``runs``: ``rule`` never fires in a healthy run and fires strictly before the damage in every
    damaged one that it was checked on at least once before its damage."""
    for name, pts in runs.items():
        fired, dmg, chance = first_firing(rule, pts), damage_iteration(pts, drop, confirm), first_chance(rule, pts)
        if not group(name)[2] and fired is not None:
            return False
        if group(name)[2] and dmg is not None and chance is not None and dmg > chance and (
                fired is None or fired >= dmg):
            return False
    return True


def choose(tune: dict[str, list[dict]], drop: float, confirm: int = 1) -> list[dict]:
    """For every candidate (signal, direction): the healthy tune runs' most extreme value, each damaged tune run's
    most extreme value before its damage, and the damaged runs it can warn of (those that went beyond every healthy
    value before their damage). A candidate with at least one is chosen: its threshold goes halfway (geometrically
    for W2) between the healthy extreme and the least extreme of the runs it warns of, written to 3 significant
    digits where that still fires before their damage and never in a healthy run. The runs it cannot warn of are
    listed, not allowed to veto it: the chosen rules together are the alarm, and the report says what none of them
    saw. A run of an over-optimising configuration that is never damaged constrains nothing; one damaged at its
    first evaluation after the base (``too_fast``) cannot be warned of at this monitoring interval by any evaluation
    rule (a ``train_`` rule is checked after every iteration)."""
    rows = []
    for signal, op in CANDIDATES:
        healthy, before, too_fast = [], {}, []
        for name, pts in tune.items():
            dmg, chance = damage_iteration(pts, drop, confirm), first_chance(f"{signal} {op} 0", pts)
            if not group(name)[2]:
                healthy += [p.get(signal) for p in pts[1:]]
            elif dmg is not None and (chance is None or dmg <= chance):
                too_fast.append(name)
            elif dmg is not None:
                before[name] = extreme([p.get(signal) for p in pts[1:] if p["iteration"] < dmg], op)
        h = extreme(healthy, op)
        beyond = {} if h is None else {n: v for n, v in before.items()
                                       if v is not None and (v > h if op == ">" else v < h)}
        threshold, rule = None, None
        if beyond:
            least = min(beyond.values()) if op == ">" else max(beyond.values())
            threshold = math.sqrt(h * least) if signal in ("w2_divergence", "train_w2") and h > 0 else (h + least) / 2
            judged = {n: p for n, p in tune.items() if not group(n)[2] or n in beyond}
            rule = next((r for r in (f"{signal} {op} {threshold:.3g}", f"{signal} {op} {threshold!r}")
                         if qualifies(r, judged, drop, confirm)), None)
        separable = rule is not None
        rows.append({"signal": signal, "op": op, "healthy_extreme": h, "collapsing_before_damage": before,
                     "too_fast": too_fast, "separable": separable, "threshold": threshold if separable else None,
                     "rule": rule, "warns_of": sorted(beyond) if separable else [],
                     "misses": sorted(set(before) - set(beyond)) if separable else sorted(before)})
    return rows


def evaluate_rules(rules: list[str], runs: dict[str, list[dict]], drop: float, confirm: int = 1) -> dict[str, dict]:
    """Per run, the chosen rules together (an alarm is any of them firing): its damage iteration, each rule's first
    firing, the earliest firing of any and the judge's change from the base there, the lead (damage minus that earliest firing; None where
    either is missing)."""
    out = {}
    for name, pts in runs.items():
        fires = {rule: first_firing(rule, pts) for rule in rules}
        first = min((f for f in fires.values() if f is not None), default=None)
        dmg = damage_iteration(pts, drop, confirm)
        # the judge as last evaluated when the first alarm came (a train_ alarm may come between evaluations)
        at_first = None if first is None else [p for p in evaluations(pts) if p["iteration"] <= first][-1].get(
            f"{JUDGE}_change")
        out[name] = {"damage": dmg, "fires": fires, "first": first, "judge_change_at_first": at_first,
                     "lead": None if dmg is None or first is None else dmg - first,
                     "last_iteration": pts[-1]["iteration"]}
    return out


def verdict(results: dict[str, dict]) -> dict:
    """The issue's two figures: false alarms in the healthy runs, and the lead in each damaged over-optimising run
    (None: missed, the alarm came at or after the damage, or never); plus how often the damage test itself marked a
    healthy run (the noise of the damage definition)."""
    healthy = [n for n in results if not group(n)[2]]
    damaged = {n: r for n, r in results.items() if group(n)[2] and r["damage"] is not None}
    return {"healthy_runs": len(healthy), "false_alarms": sorted(n for n in healthy if results[n]["first"] is not None),
            "healthy_marked_damaged": sorted(n for n in healthy if results[n]["damage"] is not None),
            "leads": {n: (r["lead"] if r["lead"] is not None and r["lead"] > 0 else None) for n, r in damaged.items()},
            "undamaged_collapsing": sorted(n for n, r in results.items() if group(n)[2] and r["damage"] is None)}


# ---------------------------------------------------------------------------------------------------------------
# Report

def _v(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.3g}"


def candidates_table(rows: list[dict]) -> list[str]:
    lines = ["| Signal | Fires when | Healthy runs' extreme | Damaged runs' extreme before damage | Rule | Warns of | "
             "Cannot warn of |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        before = ", ".join(f"{_v(v)}" for v in r["collapsing_before_damage"].values()) or "–"
        lines.append(f"| `{r['signal']}` | {r['op']} | {_v(r['healthy_extreme'])} | {before} | "
                     + (f"**`{r['rule']}`**" if r["separable"] else "none: no damaged run went beyond the healthy")
                     + f" | {', '.join(r['warns_of']) or '–'} | {', '.join(r['misses']) or '–'} |")
    return lines


def judge_noise(runs: dict[str, list[dict]]) -> Optional[float]:
    """The healthy runs' lowest judge change from their base: how far the monitor's own noise moves it (a judge
    alarm must sit beyond it)."""
    return extreme([p.get(f"{JUDGE}_change") for n, pts in runs.items() if not group(n)[2] for p in pts[1:]], "<")


def _lead(r: dict) -> str:
    """A run's lead as the tables write it: iterations ahead of the damage, 'missed' or 'no damage'."""
    return "no damage" if r["damage"] is None else "missed" if r["lead"] is None or r["lead"] <= 0 else f"{r['lead']}"


def runs_table(results: dict[str, dict], rules: list[str]) -> list[str]:
    lines = ["| Run | Over-optimises | Damage at | " + " | ".join(f"`{r}`" for r in rules)
             + f" | Lead | {JUDGE} change at the first alarm |", "|" + "---|" * (5 + len(rules))]
    for name, r in results.items():
        collapses = group(name)[2]
        lead = _lead(r)
        if not collapses:
            lead = "false alarm" if r["first"] is not None else "none fired (correct)"
        lines.append(f"| {name} | {'yes' if collapses else 'no'} | "
                     f"{'–' if r['damage'] is None else r['damage']} | "
                     + " | ".join("–" if r["fires"][rule] is None else str(r["fires"][rule]) for rule in rules)
                     + f" | {lead} | {_v(r.get('judge_change_at_first'))} |")
    return lines


def verdict_lines(v: dict) -> list[str]:
    leads = ", ".join(f"{n}: {'missed' if x is None else f'{x} iterations'}" for n, x in v["leads"].items()) or "none"
    return [f"- False alarms: {len(v['false_alarms'])} of {v['healthy_runs']} healthy runs"
            + (f" ({', '.join(v['false_alarms'])})" if v["false_alarms"] else "") + ".",
            f"- Lead before the damage, per damaged over-optimising run: {leads}.",
            f"- Over-optimising runs never damaged: {', '.join(v['undamaged_collapsing']) or 'none'}; healthy runs the "
            f"damage test marked (its own noise): {', '.join(v['healthy_marked_damaged']) or 'none'}."]


def run_name(directory: str) -> Optional[str]:
    """The task name a training output directory's name ends with (``<split>_<configuration>_s<seed>``, after any
    prefix such as ``lownoise_``), or None where it holds none: what says whether a replayed run is healthy."""
    m = re.search(r"(?:^|_)((?:%s)_(%s)_s\d+)$" % ("|".join(SPLITS), "|".join(map(re.escape, CONFIGS))),
                  Path(directory).name)
    return m.group(1) if m else None


def load_runs(dirs: list[str], window: int) -> dict[str, list[dict]]:
    """Training output directories' monitored points (eval_metrics.jsonl and, where present, metrics.jsonl), by
    directory name."""
    from sd3_adrpo.io import read_jsonl

    runs = {}
    for d in map(Path, dirs):
        training = read_jsonl(d / "metrics.jsonl") if (d / "metrics.jsonl").is_file() else None
        runs[d.name] = points(read_jsonl(d / "eval_metrics.jsonl"), training, window)
    return runs


def by_task(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """The runs keyed by their task names (what ``group`` reads)."""
    return {run_name(name): pts for name, pts in runs.items()}


def replay(dirs: list[str], rules: list[str], drop: float, confirm: int, window: int) -> list[str]:
    """The rules replayed on training output directories: per run its damage, each rule's first firing and the
    alarm's lead, as the report reads them; where every directory is named after a task, the verdict too (false
    alarms, leads). For runs trained outside the driver, e.g. a record's runs trained again with a larger monitor
    to measure their damage with less noise."""
    runs = load_runs(dirs, window)
    results = evaluate_rules(rules, runs, drop, confirm)
    lines = ["| Run | Damage at | " + " | ".join(f"`{r}`" for r in rules) + " | Lead | Lowest "
             f"{JUDGE} change |", "|" + "---|" * (4 + len(rules))]
    for name, r in results.items():
        lead = _lead(r)
        lowest = min(p.get(f"{JUDGE}_change", 0.0) for p in evaluations(runs[name]))
        lines.append(f"| {name} | {'–' if r['damage'] is None else r['damage']} | "
                     + " | ".join("–" if r["fires"][rule] is None else str(r["fires"][rule]) for rule in rules)
                     + f" | {lead} | {_v(lowest)} |")
    if all(map(run_name, runs)):
        lines += [""] + verdict_lines(verdict(by_task(results)))
    return lines


def keep_best_table(done: dict) -> list[str]:
    """final/ against best/ on the held-out evaluation, tune-group runs only: their best/ was chosen on tune prompts,
    never on the prompts it is judged on (a held-out run's monitor prompts overlap the held-out evaluation)."""
    lines = ["| Run | best/ from iteration | Held-out oracle: final/ | best/ | best − final |", "|---|---|---|---|---|"]
    for name, r in done.items():
        best = r.get("budgets", {}).get("best")
        if best is None or JUDGE not in r["metrics"] or group(name)[0] != "tune" or len(r["trajectory"]) < 2:
            continue
        # the monitor's choice: the first evaluation after the base with the highest judge (strictly better wins)
        it = max(r["trajectory"][1:], key=lambda p: p.get(JUDGE, -1))["iteration"]
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
    cols = min(4, len(signals))
    rows_n = math.ceil(len(signals) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.4 * rows_n), squeeze=False)
    colours = dict(zip([c for c, (_, bad) in CONFIGS.items() if bad], ("tab:red", "tab:purple", "tab:orange")))
    for ax in axes.flat[len(signals):]:  # the first spare panel holds the legend, off the data
        ax.axis("off")
    for ax, (signal, threshold) in zip(axes.flat, signals):
        labelled = set()
        log = signal in ("w2_divergence", "train_w2")  # 1e-6 to 100 over these runs: a linear axis hides the threshold
        for name, pts in runs.items():
            split, config, collapses = group(name)
            shown = [p for p in pts if signal in p and (p[signal] > 0 or not log)]  # the base's W2 is 0
            ax.plot([p["iteration"] for p in shown], [p[signal] for p in shown], color=colours.get(config, "0.6"),
                    ls="-" if split == "heldout" else "--", lw=1, alpha=0.9 if collapses else 0.6,
                    label=None if (config, split) in labelled else f"{config} ({split})")
            labelled.add((config, split))
        ax.axhline(threshold, color="k", lw=0.8, ls=":")
        if log:
            ax.set_yscale("log")
        ax.set_title(signal if signal != JUDGE + "_change" else f"{JUDGE}_change (damage below {-drop:g})", fontsize=9)
        ax.set_xlabel("iteration")
    if len(signals) < axes.size:
        axes.flat[len(signals)].legend(*axes.flat[0].get_legend_handles_labels(), loc="center", fontsize=9)
    else:
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)
    plt.close(fig)


def report(args, argv, out: Path, tasks: dict, done: dict, t0: float, worked: bool) -> None:
    trajectories = {n: points(r["trajectory"], r.get("training"), args.alarm_window) for n, r in done.items()
                    if len(r.get("trajectory", [])) > 1}
    tune = {n: p for n, p in trajectories.items() if group(n)[0] == "tune"}
    heldout = {n: p for n, p in trajectories.items() if group(n)[0] == "heldout"}
    missing = len(tasks) - len(done)
    status = (f"All {len(tasks)} runs are done." if not missing else
              f"**Partial**: {len(done)} of {len(tasks)} runs are done (rerun the command to continue).")
    drop, confirm = args.damage, args.damage_confirm
    rows = choose(tune, drop, confirm) if tune else []
    rules = [r["rule"] for r in rows if r["separable"]]
    results = {g: evaluate_rules(rules, runs, drop, confirm) for g, runs in (("tune", tune), ("heldout", heldout))}
    verdicts = {g: verdict(r) for g, r in results.items()}
    noise = {g: judge_noise(runs) for g, runs in (("tune", tune), ("heldout", heldout))}
    atomic_write_json(out / "alarms.json", {"damage": drop, "damage_confirm": confirm, "every": args.every,
                                            "alarm_window": args.alarm_window,
                                            "monitor_prompts": args.monitor_prompts, "chosen": rules,
                                            "healthy_lowest_judge_change": noise,
                                            "verdict": verdicts, "candidates": rows, "runs": results})
    body = [status, "", f"Monitor: every {args.every} iterations, {args.monitor_prompts} prompts balanced over the "
            f"oracle's categories x {args.monitor_images} images; `train_` signals after every iteration, each a mean "
            f"over {args.alarm_window} iterations (changes from the first {args.alarm_window}). Damage: oracle accuracy "
            f"more than {drop:g} below the "
            f"base's (the same prompts and noise at iteration 0) at {confirm} evaluation(s) in a row. Rules chosen on "
            "the tune group, reported on the held-out group; the alarm is any chosen rule firing, its lead the "
            "iterations from the first firing to the damage.", "",
            "## The verdict (held-out group)", "", *verdict_lines(verdicts["heldout"]),
            f"- The monitor's own noise: the healthy runs' lowest {JUDGE} change from their base was "
            f"{_v(noise['tune'])} (tune group) and {_v(noise['heldout'])} (held-out group); a judge alarm "
            f"(`{JUDGE}_change < ...`) must sit beyond it.", "",
            "## Candidates (tune group)", "", *candidates_table(rows), "",
            "## The chosen rules on every run", "", "Iteration of each rule's first firing (–: never).", "",
            "### Held-out group (the report)", "", *runs_table(results["heldout"], rules), "",
            "### Tune group (where they were chosen)", "", *runs_table(results["tune"], rules), "",
            *verdict_lines(verdicts["tune"]), "",
            "## keep-best", "", f"final/ and best/ (by {JUDGE} on the run's tune-split monitor prompts) on "
            f"{args.eval_num_prompts or 'all'} prompts of {args.eval_prompts} (seeded) x {args.images_per_prompt} "
            "images; tune-group runs only (a held-out run's best/ was chosen on prompts that overlap these).", "",
            *keep_best_table(done), ""]
    if trajectories:
        plot_monitor(trajectories, rules, drop, out / "monitor")
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
    ap.add_argument("--alarm_window", type=int, default=3,
                    help="train_ candidates: the mean over this many iterations (the trainer's alarm_window)")
    ap.add_argument("--damage", type=float, default=0.02, help="an oracle-accuracy drop beyond this is damage")
    ap.add_argument("--damage_confirm", type=int, default=2,
                    help="... at this many evaluations in a row (one evaluation's noise is not damage)")
    ap.add_argument("--eval_prompts", default=SPLITS["heldout"], help="keep-best's final evaluation: held-out prompts")
    ap.add_argument("--eval_num_prompts", type=int, default=200)
    ap.add_argument("--images_per_prompt", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="train nothing: is every run in the record current?")
    ap.add_argument("--report", action="store_true", help="train nothing: write the report from what is done")
    ap.add_argument("--replay", nargs="+", metavar="RUN_DIR",
                    help="train nothing: replay the record's chosen rules (or --rules) on these training output "
                         "directories and print each one's damage, firings and lead")
    ap.add_argument("--rules", nargs="+", help="with --replay: these rules instead of the record's chosen ones")
    ap.add_argument("--choose_on", nargs="+", metavar="RUN_DIR",
                    help="with --replay: choose the rules on these training output directories instead (the tune "
                         "group trained again, each named <prefix>_tune_<configuration>_s<seed>); prints the "
                         "candidates table, then replays the chosen rules")
    ap.add_argument("--out", default="results/tinyworld_alarms")
    ap.add_argument("train_overrides", nargs="*", help="extra --key value pairs for every training run, after --")
    args = ap.parse_args(argv)
    if min(args.collapse_seeds, args.every, args.damage_confirm, args.alarm_window) < 1 or args.monitor_prompts < 0 \
            or not 0 < args.damage < 1:
        ap.error("--collapse_seeds, --every, --damage_confirm and --alarm_window must be >= 1, --monitor_prompts >= 0, "
                 "--damage in (0, 1)")
    if args.replay:
        rules = args.rules
        for d in args.replay + (args.choose_on or []):
            if not (Path(d) / "eval_metrics.jsonl").is_file():
                ap.error(f"{d} has no eval_metrics.jsonl: --replay reads training output directories (--output_dir)")
        if args.choose_on:
            if args.rules:
                ap.error("--choose_on chooses the rules: give it or --rules, not both")
            unnamed = [d for d in args.choose_on if run_name(d) is None or group(run_name(d))[0] != "tune"]
            if unnamed:
                ap.error(f"--choose_on needs tune-group directories named <prefix>_tune_<configuration>_s<seed> "
                         f"(configurations: {', '.join(CONFIGS)}); not: {', '.join(unnamed)}")
            rows = choose(by_task(load_runs(args.choose_on, args.alarm_window)), args.damage, args.damage_confirm)
            rules = [r["rule"] for r in rows if r["separable"]]
            print("\n".join(candidates_table(rows)) + "\n")
        if rules is None:
            record = Path(args.out) / "alarms.json"
            if not record.is_file():
                ap.error(f"--replay needs {record} (run the calibration) or --rules")
            rules = json.loads(record.read_text())["chosen"]
        try:
            for rule in rules:
                parse_alarm(rule)
        except ValueError as e:
            ap.error(str(e))
        if not rules:
            print("No rule separates the healthy runs from a damaged one before its damage: nothing to replay.")
            return
        print("\n".join(replay(args.replay, rules, args.damage, args.damage_confirm, args.alarm_window)))
        return
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.quick, args.training_keys = False, sorted({training_key(s) for s, _ in TRAIN_CANDIDATES})
    base_cfg = parse_args(["--config", args.config, *args.train_overrides])
    args.monitor_images = base_cfg.eval_images_per_prompt
    tasks = plan(args, base_cfg)
    if args.check:
        report_check(R.check_records(tasks, args, base_cfg, out), len(tasks), out)
        return
    if args.report:
        report(args, argv, out, tasks, R.current_results(tasks, args, base_cfg, out), t0, False)
        return
    R.refuse_stale(tasks, args, base_cfg, out)
    # the tune group first (the choice), then the held-out group; seed by seed
    done, worked = R.run_tasks(tasks, args, base_cfg, out, first={n for n in tasks if n.startswith("tune_")})
    report(args, argv, out, tasks, {n: done[n] for n in tasks if n in done}, t0, worked)


if __name__ == "__main__":
    main()
