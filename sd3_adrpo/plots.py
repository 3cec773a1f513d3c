"""The paper's Figure 3: reward against ClipDiversity and against W2 divergence over training, one trajectory per run.

Points fade in from early (transparent) to late (solid) checkpoints; a star marks the final one. Data: each run's
``eval_metrics.jsonl`` (written by the trainer when ``eval_every`` > 0).
"""

from __future__ import annotations

import io
import json
import os
import sys
from pathlib import Path

from sd3_adrpo.io import atomic_write_bytes, read_jsonl


def load_trajectory(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "eval_metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: train with --eval_every N to record the trajectory")
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path} is empty")
    return sorted(rows, key=lambda r: r["iteration"])


def _pyplot():
    """pyplot, on the Agg backend unless one is already chosen (a notebook's inline backend keeps showing figures)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules and "MPLBACKEND" not in os.environ:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tradeoff_figure(runs: dict[str, list[dict]], reward_key: str = "reward"):
    """The trade-off figure: two panels (reward vs ClipDiversity, reward vs W2 divergence), one trajectory per run."""
    plt = _pyplot()
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
    axes[1].set_xlabel("W2 divergence of the sampled (guided) policy E||v_θ − v_ref||²")
    axes[1].set_xscale("symlog", linthresh=1e-6)
    for ax in axes:
        ax.set_ylabel(reward_key)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    fig.suptitle("Reward–diversity / divergence trade-off over training (★ final)")
    fig.tight_layout()
    return fig


def figure_array(fig, dpi: int = 100, close: bool = True):
    """A matplotlib figure as an (H, W, 3) uint8 array (what a tracker logs as an image)."""
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    if close:
        _pyplot().close(fig)
    return np.asarray(Image.open(buffer).convert("RGB"))


def save_figure(fig, out: str | os.PathLike, formats: tuple[str, ...] = ("png", "pdf"), dpi: int = 150) -> list[Path]:
    """Write ``fig`` as ``out``.<format> for each format, each whole or not at all: the PDF without its creation date
    (an unchanged figure is the same file), the PNG with a 256-colour palette (line plots lose nothing visible and
    take about a third of the space, which is what keeps committed results small). Returns the paths."""
    from PIL import Image

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=dpi, metadata={"CreationDate": None} if fmt == "pdf" else None)
        if fmt == "png":
            image = Image.open(buffer).convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
            buffer = io.BytesIO()
            image.save(buffer, format="png", optimize=True)
        paths.append(out.with_name(f"{out.name}.{fmt}"))
        atomic_write_bytes(paths[-1], buffer.getvalue())
    return paths


def _stem(out: str | os.PathLike) -> Path:
    """``out`` without a .png or .pdf suffix (a figure is written in each format beside it)."""
    out = Path(out)
    return out.with_suffix("") if out.suffix in (".png", ".pdf") else out


def plot_tradeoff(runs: dict[str, list[dict]], out: str | os.PathLike, reward_key: str = "reward") -> list[Path]:
    """Two panels (reward vs ClipDiversity, reward vs W2 divergence); writes ``out``.png and ``out``.pdf."""
    plt = _pyplot()
    fig = tradeoff_figure(runs, reward_key)
    paths = save_figure(fig, _stem(out))
    plt.close(fig)
    return paths


def qualitative_grid(eval_dir: str | os.PathLike, labels: list[str] | None = None,
                     prompt_indices: list[int] | None = None, seed: int | None = None, image_index: int = 0,
                     out: str | os.PathLike | None = None):
    """Prompts (rows) x methods (columns) from the images that ``eval/table1.py`` saved (the paper's Figure 2
    layout): the same seed and image index for every method, so differences come from the methods alone. Columns:
    ``labels``, by default the base (the row without a LoRA) first, then the rest in name order; each row is labelled
    with its full prompt."""
    import textwrap

    from PIL import Image

    plt = _pyplot()

    root = Path(eval_dir)
    manifests = {p.parent.name: json.loads(p.read_text()) for p in sorted((root / "images").glob("*/manifest.json"))}
    if not manifests:
        raise FileNotFoundError(f"no images/*/manifest.json under {root}: run eval/table1.py first")
    labels = labels or sorted(manifests, key=lambda k: (manifests[k]["settings"].get("lora") is not None or
                                                        k not in _bases(manifests), k))
    first = manifests[labels[0]]
    seed = first["settings"]["seeds"][0] if seed is None else seed
    prompts = first["settings"]["prompts"]
    prompt_indices = prompt_indices if prompt_indices is not None else list(range(min(6, len(prompts))))
    fig, axes = plt.subplots(len(prompt_indices), len(labels), squeeze=False,
                             figsize=(2.2 * len(labels), 2.2 * len(prompt_indices)))
    for c, label in enumerate(labels):
        by_key = {(f["seed"], f["prompt_index"], f["j"]): f["file"] for f in manifests[label]["files"]}
        for r, p in enumerate(prompt_indices):
            ax = axes[r][c]
            ax.imshow(Image.open(root / by_key[(seed, p, image_index)]))
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(label, fontsize=10)
            if c == 0:
                ax.set_ylabel(textwrap.fill(prompts[p], 26), fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    if out is not None:
        fig.savefig(out, dpi=150)
    plt.close(fig)  # still drawable (a notebook shows it once, where it is the cell's value), but no longer open
    return fig


def _bases(manifests: dict[str, dict]) -> set[str]:
    """The labels of base rows: no LoRA, and the pipeline that the LoRA rows are trained on."""
    sources = {m["settings"]["source"] for m in manifests.values() if m["settings"].get("lora")}
    return {k for k, m in manifests.items() if not m["settings"].get("lora") and (not sources or
                                                                                  m["settings"]["source"] in sources)}


MONITOR_SIGNALS = ("reward", "clip_score", "clip_diversity", "w2_divergence", "colour_entropy", "brightness",
                   "saturation", "edge_density")


def plot_monitor(rows: list[dict], alarms: list = (), out: str | os.PathLike = "monitor",
                 extra: tuple = ()) -> Path:
    """The monitor's signals against iteration (eval_metrics.jsonl rows), one panel each: every alarm's signal with
    its threshold drawn (red, dashed), then the standard signals and ``extra`` ones (the judges' scores) that are
    present; writes ``out``.png."""
    plt = _pyplot()
    present = {k for r in rows for k in r}
    signals = list(dict.fromkeys([a.signal for a in alarms] + [s for s in (*MONITOR_SIGNALS, *extra)
                                                               if s in present]))
    cols = min(4, max(1, len(signals)))
    rows_n = -(-len(signals) // cols) or 1
    fig, axes = plt.subplots(rows_n, cols, figsize=(3.2 * cols, 2.4 * rows_n), squeeze=False)
    for ax, signal in zip(axes.flat, signals):
        points = sorted((r["iteration"], r[signal]) for r in rows if r.get(signal) is not None)
        if points:
            ax.plot(*zip(*points), marker="o", ms=3)
        for alarm in alarms:
            if alarm.signal == signal:
                ax.axhline(alarm.threshold, color="red", ls="--", lw=1, label=f"{alarm.op} {alarm.threshold:g} "
                                                                            f"({alarm.action})")
                ax.legend(fontsize=7)
        ax.set_title(signal, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(signals):]:
        ax.axis("off")
    fig.tight_layout()
    (out,) = save_figure(fig, _stem(out), ("png",), dpi=110)
    plt.close(fig)
    return out
