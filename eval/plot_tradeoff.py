#!/usr/bin/env python
"""Plot the reward / ClipDiversity / W2 trade-off (the paper's Figure 3) for several training runs.

    python eval/plot_tradeoff.py --run ADRPO=runs/adrpo --run ORW-CFM-W2=runs/orw --out results/fig3

Each run folder needs eval_metrics.jsonl (train with --eval_every N). Writes <out>.png and <out>.pdf.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sd3_adrpo.plots import load_trajectory, plot_tradeoff  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, metavar="LABEL=RUN_DIR")
    ap.add_argument("--out", required=True, help="output path without extension")
    ap.add_argument("--reward_key", default="reward", help="y axis: reward (the training reward) or clip_score")
    args = ap.parse_args(argv)
    runs = {}
    for spec in args.run:
        label, _, path = spec.partition("=")
        if not path:
            ap.error(f"--run expects LABEL=RUN_DIR, got {spec!r}")
        runs[label] = load_trajectory(path)
    for p in plot_tradeoff(runs, args.out, args.reward_key):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
