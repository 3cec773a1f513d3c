#!/usr/bin/env python
"""Reproduce the paper's comparison in the tiny world: every method x seeds at equal compute, then Table 1 on
held-out prompts, the Figure 3 trade-off plots and the Table 3 advantage-clipping ablation.

    python experiments/reproduce_tinyworld.py --jobs 2 --threads 1 --out results/tinyworld    # full: <= 3 h, 2 cores
    python experiments/reproduce_tinyworld.py --quick --out results/tinyworld_quick                # <= 20 min
    python experiments/reproduce_tinyworld.py --check --jobs 2 --threads 1 --out results/tinyworld  # seconds

Equal compute: every method samples the same images (iterations x prompts x samples) and takes the same number of
optimizer steps (DPO, which trains on one pair per prompt, gets samples_per_prompt / 2 times the inner epochs). Each
run trains in its own subprocess (``--jobs`` side by side, ``--threads`` torch threads each: on 2 CPU cores, two
one-thread runs finish sooner than one after the other) and is then evaluated by the Table 1 CLI on a seeded subset
of held-out prompts, with its training seed as the generation seed; the table reports mean +- standard error over
training seeds. A run whose LoRA (or evaluation) already exists is not repeated, so an interrupted reproduction
resumes; an existing run trained with other settings or on other files is refused before anything starts. Writes
under --out: runs/, eval/, logs/ (local: LoRAs and per-run files, not committed), table1.{md,csv,tex}, ablation.md,
fig3.{png,pdf} with its data fig3.json, tasks.json (each run's metrics and time), run_records.json (each run's
settings and input fingerprints, and its evaluation's command and input fingerprints) and README.md with the exact
command, commit and machine.

``--check`` trains and evaluates nothing: with the arguments of a recorded command it compares run_records.json with
what that command would run now (settings, the sha256 of the base model, prompts and CLIPs, the evaluation commands)
and exits 1 naming every run that differs, 0 if all are current. It needs no run folder, so it works in a fresh clone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "experiments")]

from sd3_adrpo.config import parse_args  # noqa: E402
from sd3_adrpo.io import atomic_write_bytes, atomic_write_json, read_jsonl  # noqa: E402
from sd3_adrpo.plots import load_trajectory, plot_tradeoff  # noqa: E402
from sd3_adrpo.tables import Table  # noqa: E402

from _launch import (RECORDS, changed_settings, cli_overrides, cpu_kernels, equal_compute_overrides,  # noqa: E402
                     input_fingerprint, read_records, report_check, run_logged, saved_settings, write_records)

METHOD_LABELS = {"adrpo": "ADRPO", "fixed_beta": "Fixed beta (ablation)", "orw_cfm_w2": "ORW-CFM-W2", "raft": "RAFT",
                 "dpo": "DPO"}
CLIP_MULTIPLES = (0.5, 1.0, 2.0)
TUNED = "results/tinyworld_tuning/sweep_v2/tuning.json"  # what experiments/tune_tinyworld.py chose on the tune split
HEADER_FIELDS = ("Command: ", "Commit: ", "Machine: ", "Wall time of this invocation: ")
KEEP = "<!-- written by hand below this line: kept when the script rewrites this README -->"


@dataclass(frozen=True)
class Task:
    """One run: train (``overrides`` on top of the config; None for the base model, which is only evaluated), then
    evaluate on the held-out subset with its seed."""

    name: str
    seed: int
    overrides: Optional[dict] = None
    # other LoRAs of the run also evaluated: an earlier iteration (int: its checkpoint) or a folder the trainer
    # exported beside final/ (str, e.g. "best": keep_best's)
    budgets: tuple[int | str, ...] = ()


def lora_of(task: Task, out: Path, budget: Optional[int | str] = None) -> Path:
    """The folder of a task's LoRA: final/, the checkpoint at ``budget`` iterations (each holds one), or the
    exported folder named ``budget`` (e.g. best/)."""
    run_dir = out / "runs" / task.name
    if budget is None or isinstance(budget, str):
        return run_dir / (budget or "final")
    return run_dir / "checkpoints" / f"checkpoint-{budget:06d}"


def eval_dir(task: Task, out: Path, budget: Optional[int | str] = None) -> Path:
    suffix = "" if budget is None else f"_{budget}" if isinstance(budget, str) else f"_it{budget}"
    return out / "eval" / f"{task.name}{suffix}"


def plan(args, base_cfg) -> tuple[dict[str, Task], dict[str, list[str]], dict[str, list[str]]]:
    """(tasks by name, Table 1 rows {label: task names}, ablation rows {label: task names}). The ablation reuses the
    ADRPO runs for the clip range the config already has."""
    tasks: dict[str, Task] = {}
    rows: dict[str, list[str]] = {}
    ablation: dict[str, list[str]] = {}

    def add(name: str, seed: int, overrides: Optional[dict]) -> str:
        tasks[name] = Task(name, seed, overrides)
        return name

    rows["Base"] = [add(f"base_s{s}", s, None) for s in args.seeds]
    for method in args.methods:
        for guidance in args.loss_guidance:  # each setting of loss_guidance is a row of its own
            suffix = "" if guidance == "conditional" else f"_{guidance}"
            label = METHOD_LABELS[method] + ("" if len(args.loss_guidance) == 1 else f" ({guidance})")
            rows[label] = [add(f"{method}{suffix}_s{s}", s, {"method": method, "seed": s, "loss_guidance": guidance,
                                                              **equal_compute_overrides(method, base_cfg),
                                                              **args.tuned_points.get(method, {})})
                           for s in args.seeds]
    if not args.no_ablation and "adrpo" in args.methods:
        lo, hi = base_cfg.clip_range or (None, None)
        own = hi / base_cfg.beta0 if hi is not None and lo == -hi else None
        for m in CLIP_MULTIPLES:
            label = f"clip ±{m:g}·β0"
            if own is not None and abs(m - own) < 1e-9 and "conditional" in args.loss_guidance:
                ablation[label] = [f"adrpo_s{s}" for s in args.seeds]
            else:
                ablation[label] = [add(f"adrpo_clip{m:g}_s{s}", s, {"method": "adrpo", "seed": s,
                                                                    "adv_clip_min": -m * base_cfg.beta0,
                                                                    "adv_clip_max": m * base_cfg.beta0})
                                   for s in args.seeds]
    return tasks, rows, ablation


def train_argv(task: Task, args, base_cfg, out: Path) -> list[str]:
    """The training command line of a task: the reproduction's own settings, then the user's overrides, then the
    task's (method, seed, ...)."""
    common = {"eval_every": max(1, base_cfg.num_iterations // 5), "eval_prompts": args.eval_prompts,
              "final_eval_prompts": None, "sample_every": 0, "checkpoint_every": 0}
    return ["--config", args.config, "--output_dir", str(out / "runs" / task.name), "--overwrite_output_dir", "true",
            *cli_overrides(common), *args.train_overrides, *cli_overrides(task.overrides)]


def train_inputs(argv: list[str]) -> dict[str, str]:
    """The sha256 of the files behind a run's model, prompts and reward (its settings are in its config.yaml)."""
    cfg = parse_args(argv)
    return input_fingerprint(cfg.pretrained_model, cfg.train_prompts, cfg.reward_model)


def train_differences(settings: dict, inputs: Optional[dict], argv: list[str]) -> list[str]:
    """How a run trained with ``settings`` on files with fingerprints ``inputs`` (None: not recorded) differs from
    what ``train_sd3_adrpo.py argv`` would train (fields only another method reads are ignored, so tuning one
    baseline does not invalidate the others' runs); [] if it does not."""
    keys = changed_settings(settings, argv)
    if inputs is None or inputs != train_inputs(argv):
        keys.append("the files behind pretrained_model / train_prompts / reward_model (changed or not recorded)")
    return keys


def stale_settings(task: Task, args, base_cfg, out: Path) -> list[str]:
    """Settings in which an existing run (its folder under --out) differs from what this reproduction would train;
    [] if none or no run."""
    saved_path = out / "runs" / task.name / "final" / "config.yaml"
    if task.overrides is None or not saved_path.is_file():
        return []
    recorded = out / "runs" / task.name / "inputs.json"
    inputs = json.loads(recorded.read_text()) if recorded.is_file() else None
    return train_differences(saved_settings(saved_path), inputs, train_argv(task, args, base_cfg, out))


def refuse_stale(tasks: dict[str, Task], args, base_cfg, out: Path) -> None:
    """Exit (before anything runs) when an existing run folder under out/runs was trained with other settings than
    this command would use: runs are never overwritten."""
    stale = {name: keys for name, task in tasks.items() if (keys := stale_settings(task, args, base_cfg, out))}
    if stale:
        name, keys = next(iter(stale.items()))
        raise SystemExit(f"error: {len(stale)} existing run(s) under {out / 'runs'} were trained with other settings "
                         f"than this command would use (e.g. {name}: {', '.join(keys)}). Delete them or pass another "
                         "--out; runs are never overwritten.")


def eval_stamp(task: Task, args, base_cfg, out: Path, budget: Optional[int | str] = None) -> dict:
    """A task's evaluation (of its final LoRA, or of its checkpoint at ``budget``): {"command": the Table 1 CLI's
    command line, "inputs": the sha256 of the files behind the base model, the held-out prompts and the CLIP}; the
    evaluation is redone when either changes."""
    ev = eval_dir(task, out, budget)
    cmd = ["eval/table1.py", "--base", base_cfg.pretrained_model, "--prompts", args.eval_prompts,
           "--num_prompts", str(args.eval_num_prompts), "--prompt_seed", "0", "--seeds", str(task.seed),
           "--images_per_prompt", str(args.images_per_prompt), "--steps", str(base_cfg.num_inference_steps),
           "--guidance_scale", str(base_cfg.guidance_scale), "--resolution", str(base_cfg.resolution),
           "--max_sequence_length", str(base_cfg.t5_length), "--clip", base_cfg.eval_clip_model, "--out", str(ev)]
    cmd += ["--drop_t5"] if base_cfg.drop_t5 else []
    cmd += [arg for spec in base_cfg.judges for arg in ("--judge", spec)]  # the config's (the tiny world's oracle)
    cmd += [] if task.overrides is None else ["--run", f"run={lora_of(task, out, budget)}", "--skip_base"]
    return {"command": cmd, "inputs": input_fingerprint(base_cfg.pretrained_model, args.eval_prompts,
                                                         base_cfg.eval_clip_model)}


def task_record(task: Task, out: Path) -> dict:
    """What run_records.json keeps of a finished task, read from its local files: the trained run's settings
    (final/config.yaml) and input fingerprints (inputs.json), none for the base; its evaluation's stamp."""
    record = {"eval": json.loads((eval_dir(task, out) / "command.json").read_text())}
    if task.budgets:
        record["budget_evals"] = {str(b): json.loads((eval_dir(task, out, b) / "command.json").read_text())
                                  for b in task.budgets}
    if task.overrides is not None:
        run_dir = out / "runs" / task.name
        record["settings"] = saved_settings(run_dir / "final" / "config.yaml")
        record["inputs"] = json.loads((run_dir / "inputs.json").read_text())
    return record


def record_problems(task: Task, record: Optional[dict], result: Optional[dict], args, base_cfg, out: Path) -> list[str]:
    """How a task's record (its entry in run_records.json; None: none) and result (its entry in tasks.json) differ
    from what this command would train and evaluate; [] when they are current. Reads no run folder."""
    if record is None:
        return [f"not in {RECORDS}"]
    keys = []
    if task.overrides is not None:
        keys += train_differences(record.get("settings", {}), record.get("inputs"),
                                  train_argv(task, args, base_cfg, out))
    stamps = [(None, record.get("eval", {}))] + [(b, record.get("budget_evals", {}).get(str(b), {}))
                                                 for b in task.budgets]
    for budget, have in stamps:
        what = ("evaluation" if budget is None else f"evaluation of {budget}/" if isinstance(budget, str)
                else f"evaluation at iteration {budget}")
        want = eval_stamp(task, args, base_cfg, out, budget)
        if have.get("command") != want["command"]:
            keys.append(f"the {what}'s command")
        keys += [f"the file(s) behind {p} ({what})" for p in want["inputs"]
                 if have.get("inputs", {}).get(p) != want["inputs"][p]]
    if result is None:
        keys.append("no result in tasks.json")
    elif task.overrides is not None and "trajectory" not in result:
        keys.append("no trajectory in tasks.json")
    elif task.overrides is not None and getattr(args, "training_keys", ()) and "training" not in result:
        keys.append("no training statistics in tasks.json")
    elif set(result.get("budgets", {})) != {str(b) for b in task.budgets}:
        keys.append("results at other budgets in tasks.json")
    return keys


def check_records(tasks: dict[str, Task], args, base_cfg, out: Path) -> list[str]:
    """--check: for each task, how its record in out/run_records.json (and its result in out/tasks.json) differs
    from what this command would train and evaluate; [] when every task is current. Reads no run folder."""
    records = read_records(out)
    results = json.loads((out / "tasks.json").read_text()) if (out / "tasks.json").is_file() else {}
    problems = []
    for name, task in tasks.items():
        if keys := record_problems(task, records.get(name), results.get(name), args, base_cfg, out):
            problems.append(f"{name}: {', '.join(keys)}")
    return problems


def current_results(tasks: dict[str, Task], args, base_cfg, out: Path) -> dict[str, dict]:
    """{task: its result in out/tasks.json} for the tasks whose record and result are current (a driver's --report:
    the tables from what is done, without running anything). Reads no run folder."""
    results = json.loads((out / "tasks.json").read_text()) if (out / "tasks.json").is_file() else {}
    records = read_records(out)
    return {n: results[n] for n in tasks
            if n in results and not record_problems(tasks[n], records.get(n), results[n], args, base_cfg, out)}


def committed_and_current(tasks: dict[str, Task], previous: dict, records: dict, args, base_cfg, out: Path) -> set:
    """The tasks a fresh clone need not run again: no local folder of theirs (a local run folder is reused if it
    holds a finished LoRA, and trained again from scratch if not), and a committed record and result that are
    current. This is how a reproduction longer than one session
    resumes in the next checkout, where runs/ and eval/ are gone: every finished task's metrics and trajectory are in
    tasks.json, its settings and evaluation command in run_records.json."""
    return {name for name, task in tasks.items()
            if not (out / "runs" / name).exists() and not (out / "eval" / name).exists()
            and not record_problems(task, records.get(name), previous.get(name), args, base_cfg, out)}


def trim_rows(rows: list[dict], keys) -> list[dict]:
    """Each row with only its iteration and ``keys`` (all of it when ``keys`` is empty): what a driver keeps of a
    run's trajectory or training rows in tasks.json, whose size is bounded (tests/experiments/test_committed_results)."""
    return [{k: r[k] for k in ("iteration", *keys) if k in r} for r in rows] if keys else rows


def run_task(task: Task, args, base_cfg, out: Path) -> dict:
    """Train (unless its LoRA exists) and evaluate (unless the same evaluation exists) one task, each in a
    subprocess: its final LoRA, and each other LoRA of ``task.budgets``. Returns {"metrics": {metric: value at
    this seed}, "budgets": {iteration or folder: metrics} (if any), "trajectory": its held-out trajectory (trained
    runs; only the iteration and ``args.trajectory_keys`` where a driver names them), "training": its metrics.jsonl
    rows, only their iteration and ``args.training_keys`` (trained runs, when a driver asks for those keys),
    "trained_with": the commit, torch threads and CPU it was trained with (its run folder's trained_with.json),
    "seconds": time spent on it by this invocation, "worked": whether it trained or evaluated anything, "trained":
    whether it trained}."""
    t0, worked, trained = time.perf_counter(), False, False
    run_dir = out / "runs" / task.name
    if task.overrides is not None and not (lora_of(task, out) / "pytorch_lora_weights.safetensors").is_file():
        for ev in [eval_dir(task, out)] + [eval_dir(task, out, b) for b in task.budgets]:
            if ev.exists():  # the evaluation of an earlier, unfinished LoRA of this name
                print(f"removing {ev}: it belongs to an earlier attempt at {run_dir}")
                shutil.rmtree(ev)
        argv = train_argv(task, args, base_cfg, out)
        # what a retraining needs to be bitwise this run, kept with the run: an invocation stopped while it
        # evaluated leaves the next one to record it
        how = {"commit": code_commit(out),
               "torch_threads": args.threads or os.environ.get("OMP_NUM_THREADS") or "torch's default",
               "cpu": cpu_kernels()}
        run_logged(["train_sd3_adrpo.py", *argv], out / "logs" / f"{task.name}.train.log", args.threads)
        atomic_write_json(run_dir / "inputs.json", train_inputs(argv))
        atomic_write_json(run_dir / "trained_with.json", how)
        worked = trained = True

    def evaluate(budget: Optional[int | str]) -> dict:
        nonlocal worked
        ev = eval_dir(task, out, budget)
        result = ev / "runs" / ("Base.json" if task.overrides is None else "run.json")
        # the evaluation is redone when its command or the files behind the base model, prompts or CLIP change
        stamp, want = ev / "command.json", eval_stamp(task, args, base_cfg, out, budget)
        if not (result.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == want):
            run_logged(want["command"], out / "logs" / f"{ev.name}.eval.log", args.threads)
            atomic_write_json(stamp, want)
            worked = True
        return {m: v["per_seed"][0] for m, v in json.loads(result.read_text())["metrics"].items()}

    done = {"metrics": evaluate(None)}
    if task.budgets:
        done["budgets"] = {str(b): evaluate(b) for b in task.budgets}
    if task.overrides is not None:  # its held-out trajectory (Figure 3's data), kept for when runs/ is gone
        done["trajectory"] = trim_rows(load_trajectory(run_dir), getattr(args, "trajectory_keys", ()))
        if keys := getattr(args, "training_keys", ()):  # e.g. the alarm calibration's training statistics
            done["training"] = trim_rows(read_jsonl(run_dir / "metrics.jsonl"), keys)
    if (run_dir / "trained_with.json").is_file():
        done["trained_with"] = json.loads((run_dir / "trained_with.json").read_text())
    done.update(worked=worked, trained=trained, seconds=time.perf_counter() - t0 if worked else 0.0)
    return done


def run_tasks(tasks: dict[str, Task], args, base_cfg, out: Path, first: set = frozenset()) -> tuple[dict, bool]:
    """Run every task that is not done (``args.jobs`` at a time; those in ``first``, then the others, each group seed
    by seed, so an invocation stopped part-way leaves whole seeds of every row), writing out/tasks.json and the run
    records after each. Returns ({task: its result}, whether anything was trained or evaluated)."""
    previous = json.loads((out / "tasks.json").read_text()) if (out / "tasks.json").is_file() else {}
    previous_records = read_records(out)
    reused = committed_and_current(tasks, previous, previous_records, args, base_cfg, out)
    if reused:
        print(f"{len(reused)} of {len(tasks)} task(s) are recorded as done and current in {out / RECORDS}: reused")
    done: dict[str, dict] = {name: previous[name] for name in reused}
    records: dict[str, dict] = {name: previous_records[name] for name in reused}
    worked = False
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        order = sorted((name for name in tasks if name not in reused), key=lambda n: (n not in first, tasks[n].seed))
        futures = {pool.submit(run_task, tasks[name], args, base_cfg, out): name for name in order}
        try:
            for future in tqdm(as_completed(futures), total=len(futures), desc="runs"):
                name = futures[future]
                done[name] = future.result()
                worked |= done[name].pop("worked")
                # a resumed task's time is the sum over the invocations that worked on it; a run trained (again)
                # from scratch starts its count afresh: the earlier run's training and evaluation were discarded
                if not done[name].pop("trained"):
                    before = previous.get(name, {})
                    done[name]["seconds"] += before.get("seconds", 0.0)
                    if "trained_with" in before and "trained_with" not in done[name]:  # a run folder that predates it
                        done[name]["trained_with"] = before["trained_with"]
                atomic_write_json(out / "tasks.json", {**previous, **done})
                records[name] = task_record(tasks[name], out)
                write_records(out, {**previous_records, **records})
        except BaseException:
            for f in futures:  # stop what has not started; the runs under way finish (and are kept) first
                f.cancel()
            raise
    return done, worked


def code_commit(out: Path) -> str:
    """HEAD's short hash, and how many tracked files outside `out` differ from it: a stamp that says 'abc1234' of a
    run made with an edited config would be wrong."""
    def git(*a: str) -> str:
        return subprocess.run(["git", *a], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "unknown (not a git checkout)"
    inside = out.resolve().is_relative_to(ROOT.resolve())
    exclude = [f":(exclude){out.resolve().relative_to(ROOT.resolve())}"] if inside else []
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", *exclude).splitlines()
    return commit + (f" with uncommitted changes to {len(changed)} tracked file(s)" if changed else "")


def judge_table_columns(args, base_cfg) -> dict:
    """The columns the config's judges report (label, direction, one per prompt category), named as eval/table1.py
    names them in each evaluation's table (the tiny world's oracle: 'Oracle acc.' and its categories)."""
    if not base_cfg.judges:
        return {}
    from sd3_adrpo.evaluation import build_judges
    from sd3_adrpo.prompts import load_prompts, seeded_subset
    from sd3_adrpo.table1 import judge_columns

    prompts = seeded_subset(load_prompts(args.eval_prompts), args.eval_num_prompts, 0)
    return judge_columns(build_judges(list(base_cfg.judges)), prompts)[1]


def table_of(rows: dict[str, list[str]], done: dict[str, dict], notes: list[str], columns: dict) -> Table:
    per_label = {}
    for label, names in rows.items():
        metrics = done[names[0]]["metrics"]
        per_label[label] = {m: [done[n]["metrics"][m] for n in names] for m in metrics
                            if not m.startswith("clip_diversity_")}
    return Table(per_label, notes=notes, columns=columns)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny.yaml", help="base training config (the tiny world's)")
    ap.add_argument("--methods", nargs="+", default=list(METHOD_LABELS), choices=list(METHOD_LABELS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--eval_prompts", default="prompts/tinyworld_heldout.txt")
    ap.add_argument("--eval_num_prompts", type=int, default=200,
                    help="held-out prompts in Table 1, a seeded subset (0: all)")
    ap.add_argument("--images_per_prompt", type=int, default=4)
    ap.add_argument("--loss_guidance", nargs="+", default=["conditional"], choices=["conditional", "guided"],
                    help="train every method with each of these loss_guidance settings (a row each; the conditional "
                         "runs keep their names, the others get a suffix); the clipping ablation is conditional")
    ap.add_argument("--no_ablation", action="store_true", help="skip the advantage-clipping ablation")
    ap.add_argument("--tuned", default=TUNED,
                    help="a tuning sweep's tuning.json: each method's chosen setting is applied to its runs (methods "
                         "it has no entry for use the config as it is); 'none' for the config alone")
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time, each a subprocess")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="fewer iterations, prompts and one seed (<= 20 min)")
    ap.add_argument("--check", action="store_true",
                    help=f"train and evaluate nothing: say whether every run in --out's {RECORDS} is what this "
                         "command would run now (exit 1 if not); needs no run folder")
    ap.add_argument("--out", default="results/tinyworld")
    ap.add_argument("train_overrides", nargs="*", help="extra --key value pairs for every training run, after --")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.eval_num_prompts = args.seeds[:1], min(args.eval_num_prompts or 10**9, 24)
        args.train_overrides = ["--num_iterations", "10", *args.train_overrides]
    out = Path(args.out)
    t0 = time.perf_counter()
    base_cfg = parse_args(["--config", args.config, *args.train_overrides])
    args.tuned_points = {}
    if args.tuned != "none":
        if not Path(args.tuned).is_file():
            raise SystemExit(f"error: --tuned {args.tuned} does not exist: run experiments/tune_tinyworld.py first, or "
                             "pass --tuned none to use the config's settings for every method")
        args.tuned_points = json.loads(Path(args.tuned).read_text())["chosen"]
    tasks, rows, ablation = plan(args, base_cfg)
    if args.check:
        report_check(check_records(tasks, args, base_cfg, out), len(tasks), out)
        return
    refuse_stale(tasks, args, base_cfg, out)
    table_runs = {name for names in rows.values() for name in names}
    done, worked = run_tasks(tasks, args, base_cfg, out, first=table_runs)

    notes = [f"Tiny world, {args.eval_num_prompts or 'all'} held-out prompts ({args.eval_prompts}, seeded subset) x "
             f"{args.images_per_prompt} images; mean ± s.e. over training seeds {args.seeds}."]
    notes += [f"{METHOD_LABELS[m]}: " + ", ".join(f"{k}={v}" for k, v in point.items()) + f" (tuned: {args.tuned})"
              for m, point in args.tuned_points.items() if m in args.methods]
    columns = judge_table_columns(args, base_cfg)
    table = table_of(rows, done, notes, columns)
    for ext, text in (("md", table.to_markdown()), ("csv", table.to_csv()), ("tex", table.to_latex())):
        atomic_write_bytes(out / f"table1.{ext}", text.encode())
    if ablation:
        abl = table_of(ablation, done, ["ADRPO with advantage clip ±0.5, ±1, ±2 × β0 (the poster's Table 3)."],
                       columns)
        atomic_write_bytes(out / "ablation.md", abl.to_markdown().encode())
    # the figure's data is kept with it (fig3.json, in the plot's order): the run folders it is read from stay local
    trajectories = {label: done[names[0]]["trajectory"] for label, names in rows.items() if label != "Base"}
    atomic_write_bytes(out / "fig3.json", (json.dumps(trajectories, indent=1) + "\n").encode())
    plot_tradeoff(trajectories, out / "fig3")

    readme = ["## Table 1", "", table.to_markdown()]
    if ablation:
        readme += ["## Advantage clipping (Table 3)", "", (out / "ablation.md").read_text()]
    readme += ["## Figure 3", "", f"Trajectories of the seed-{args.seeds[0]} runs.", "", "![trade-off](fig3.png)", ""]
    write_readme(out, f"Tiny-world reproduction{' (quick mode)' if args.quick else ''}", "reproduce_tinyworld.py",
                 argv, args, t0, done, worked, readme)


def write_readme(out: Path, title: str, script: str, argv, args, t0: float, done: dict, worked: bool,
                 body: list[str], total: Optional[int] = None) -> None:
    """out/README.md: the title, a header (the exact command, commit, machine, wall and summed run time), the tiny-world
    caveat, then ``body``; a reading written by hand below the KEEP marker survives. When nothing was trained or
    evaluated, the header stays that of the invocation that did the work, and a line says how many runs the record
    holds now (an invocation stopped before its end, e.g. by the end of a session, writes no README); ``total``, the
    number of runs planned where fewer are done (a report of a partial record)."""
    commit = code_commit(out)
    command = f"python experiments/{script} " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    compute = sum(d["seconds"] for d in done.values())
    old = (out / "README.md").read_text() if (out / "README.md").is_file() else ""
    header = [f"Command: `{command}`  ", f"Commit: {commit}  ",
              f"Machine: {platform.machine()} ({cpu_kernels()}), {os.cpu_count()} CPUs, {args.jobs} run(s) at a time "
              f"with {args.threads or 'default'} torch thread(s) each  ",
              f"Wall time of this invocation: {(time.perf_counter() - t0) / 60:.1f} min; summed time of the "
              f"{len(done)} runs (training + evaluation, over every invocation): {compute / 60:.1f} min  "]
    previous_header = [line for line in old.splitlines() if line.startswith(HEADER_FIELDS)]
    if not worked and len(previous_header) == len(HEADER_FIELDS):
        # (every header line ends in a markdown line break, so the rerun line is not run into the wall time)
        what = (f"a report of the {len(done)} of {total} runs done, nothing was trained or evaluated"
                if total is not None and len(done) < total else
                "every run and evaluation was current, nothing was trained or evaluated again")
        header = [line.rstrip() + "  " for line in previous_header] + [
            f"Rerun on {time.strftime('%Y-%m-%d')} at commit {commit}: {what}. The record now holds {len(done)} "
            f"run(s), {compute / 60:.1f} min summed over every invocation (the wall-time line counts those done when "
            "it was written)."]
    readme = [f"# {title}", "", *header, "",
              "These are tiny-world numbers (a 64 px synthetic domain with project-trained models), not SD3 results.",
              "", *body]
    print("\n".join(readme))
    if KEEP in old:  # a reading written by hand below the generated part survives a rerun
        readme += [old[old.index(KEEP):]]
    atomic_write_bytes(out / "README.md", "\n".join(readme).encode())


if __name__ == "__main__":
    main()
