"""The paper's Figure 3: reward against ClipDiversity and against W2 divergence over training, one trajectory per run.

Points fade in from early (transparent) to late (solid) checkpoints; a star marks the final one. Data: each run's
``eval_metrics.jsonl`` (written by the trainer when ``eval_every`` > 0).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def load_trajectory(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "eval_metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train with --eval_every N to record the trajectory")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty")
    return sorted(rows, key=lambda r: r["iteration"])


def plot_tradeoff(runs: dict[str, list[dict]], out: str | os.PathLike, reward_key: str = "reward") -> list[Path]:
    """Two panels (reward vs ClipDiversity, reward vs W2 divergence); writes ``out``.png and ``out``.pdf."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgba

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for (label, rows), colour in zip(runs.items(), colours * 10):
        reward = [r[reward_key] for r in rows]
        n = len(rows)
        alphas = [0.15 + 0.85 * i / max(n - 1, 1) for i in range(n)]
        for ax, key in zip(axes, ("clip_diversity", "w2_divergence")):
            x = [r[key] for r in rows]
            ax.plot(x, reward, color=colour, alpha=0.35, linewidth=1)
            ax.scatter(x, reward, color=[to_rgba(colour, a) for a in alphas], s=18)
            ax.scatter(x[-1:], reward[-1:], color=colour, marker="*", s=180, edgecolor="black", linewidth=0.5,
                       label=label, zorder=3)
    axes[0].set_xlabel("ClipDiversity (higher: more diverse)")
    axes[1].set_xlabel("W2 divergence E||v_θ − v_ref||²")
    axes[1].set_xscale("symlog", linthresh=1e-6)
    for ax in axes:
        ax.set_ylabel(reward_key)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle("Reward–diversity / divergence trade-off over training (★ final)")
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out.with_suffix(".png"), out.with_suffix(".pdf")]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths
