"""The paper's Table 1 layout: one row per method, one column per metric, mean +- standard error over seeds, the best
and second best of each column marked. Written as Markdown, CSV and LaTeX from the same numbers."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# The paper's columns, in its order, and their direction (True: higher is better; None: no ranking). Any other
# metric (a judge, a breakdown by category) brings its own label and direction in ``Table.columns``.
COLUMNS = {
    "clip_score": ("ClipScore", True), "clip_diversity": ("ClipDiversity", True), "aesthetic": ("Aesthetic", True),
    "blip_score": ("BLIPScore", True), "image_reward": ("ImageReward", True), "pickscore": ("PickScore", True),
    "hpsv2": ("HPSv2", True),
}
LAST = {"w2_divergence": ("W2 divergence (sampled policy)", None), "w2_divergence_conditional": ("W2 (conditional)", None),
        "w2_divergence_unconditional": ("W2 (unconditional)", None)}


def mean_and_se(per_seed: list[float]) -> tuple[float, float]:
    """Mean over seeds and its standard error std(ddof=1) / sqrt(n); the error is nan for a single seed."""
    x = np.asarray(per_seed, dtype=float)
    if len(x) == 0:
        raise ValueError("no seeds to average")
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return float(x.mean()), se


@dataclass
class Table:
    """rows[label][metric] = list of per-seed values; ``notes`` say why a column is missing; ``columns`` gives the
    (label, higher is better) of metrics beyond the paper's, in the order they are shown."""

    rows: dict[str, dict[str, list[float]]]
    notes: list[str] = field(default_factory=list)
    decimals: dict[str, int] = field(default_factory=dict)
    columns: dict[str, tuple[str, Optional[bool]]] = field(default_factory=dict)

    def _columns(self) -> dict[str, tuple[str, Optional[bool]]]:
        return {**COLUMNS, **self.columns, **LAST}

    def metrics(self) -> list[str]:
        present = {m for r in self.rows.values() for m in r}
        known = self._columns()
        return [m for m in known if m in present and m not in LAST] + sorted(present - set(known)) + [
            m for m in LAST if m in present]

    def ranks(self, metric: str) -> dict[str, int]:
        """1 for the best label of a column, 2 for the second best (by mean; ties share)."""
        higher = self._columns().get(metric, (metric, True))[1]
        if higher is None:
            return {}
        means = {label: mean_and_se(r[metric])[0] for label, r in self.rows.items() if metric in r}
        order = sorted(set(means.values()), reverse=higher)
        return {label: order.index(v) + 1 for label, v in means.items() if order.index(v) < 2}

    def cell(self, label: str, metric: str) -> Optional[tuple[str, int]]:
        if metric not in self.rows[label]:
            return None
        mean, se = mean_and_se(self.rows[label][metric])
        if metric not in self.decimals and 0 < abs(mean) < 0.01:  # e.g. a W2 divergence of 8e-4
            text = f"{mean:.2e}" if math.isnan(se) else f"{mean:.2e} ± {se:.1e}"
        else:
            d = self.decimals.get(metric, 3 if abs(mean) < 10 else 2)
            text = f"{mean:.{d}f}" if math.isnan(se) else f"{mean:.{d}f} ± {se:.{d}f}"
        return text, self.ranks(metric).get(label, 0)

    def header(self) -> list[str]:
        return ["Method"] + [self._columns().get(m, (m, True))[0] for m in self.metrics()]

    def to_markdown(self) -> str:
        lines = ["| " + " | ".join(self.header()) + " |", "|" + "---|" * len(self.header())]
        for label in self.rows:
            cells = []
            for m in self.metrics():
                c = self.cell(label, m)
                cells.append("–" if c is None else {1: f"**{c[0]}**", 2: f"_{c[0]}_"}.get(c[1], c[0]))
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        notes = ["", "Mean ± standard error over seeds; **best**, _second best_."] + [f"- {n}" for n in self.notes]
        return "\n".join(lines + notes) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(["method"] + [f"{m}_{s}" for m in self.metrics() for s in ("mean", "se", "n_seeds")])
        for label, r in self.rows.items():
            row = [label]
            for m in self.metrics():
                row += [*mean_and_se(r[m]), len(r[m])] if m in r else ["", "", ""]
            writer.writerow(row)
        return buf.getvalue()

    def to_latex(self) -> str:
        cols = "l" + "c" * len(self.metrics())
        esc = lambda s: s.replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")  # noqa: E731
        lines = [r"\begin{tabular}{" + cols + "}", r"\toprule", " & ".join(esc(h) for h in self.header()) + r" \\",
                 r"\midrule"]
        for label in self.rows:
            cells = []
            for m in self.metrics():
                c = self.cell(label, m)
                text = "--" if c is None else c[0].replace("±", r"$\pm$")
                cells.append({1: r"\textbf{" + text + "}", 2: r"\underline{" + text + "}"}.get(0 if c is None else c[1], text))
            lines.append(esc(label) + " & " + " & ".join(cells) + r" \\")
        return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"
