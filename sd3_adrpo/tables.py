"""The paper's Table 1 layout: one row per method, one column per metric, mean +- standard error over seeds, the best
and second best of each column marked where they are beyond the noise. Written as Markdown, CSV and LaTeX from the same
numbers.

"Beyond the noise": rows whose images share their noise (the base and its LoRAs, sampled from the same seeds) are
compared by the paired difference of their per-prompt scores, with a bootstrap interval over prompts (``paired``);
other rows by their means over seeds, |difference| > 2 * sqrt(se_a^2 + se_b^2) (needs two seeds or more each). A
leader that is not beyond the noise is not marked; the table says so."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

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
    (label, higher is better) of metrics beyond the paper's, in the order they are shown. ``paired(metric, a, b)``
    gives the paired difference a - b as a dict with ``diff``, ``ci_low``, ``ci_high`` where rows a and b share their
    noise (else None); ``differences[label][metric]`` is that difference against ``reference`` (the base), shown in a
    table of its own."""

    rows: dict[str, dict[str, list[float]]]
    notes: list[str] = field(default_factory=list)
    decimals: dict[str, int] = field(default_factory=dict)
    columns: dict[str, tuple[str, Optional[bool]]] = field(default_factory=dict)
    paired: Optional[Callable[[str, str, str], Optional[dict]]] = None
    differences: dict[str, dict[str, dict]] = field(default_factory=dict)
    reference: Optional[str] = None

    def _columns(self) -> dict[str, tuple[str, Optional[bool]]]:
        return {**COLUMNS, **self.columns, **LAST}

    def metrics(self) -> list[str]:
        present = {m for r in self.rows.values() for m in r}
        known = self._columns()
        return [m for m in known if m in present and m not in LAST] + sorted(present - set(known)) + [
            m for m in LAST if m in present]

    def beyond_noise(self, metric: str, a: str, b: str) -> bool:
        """Whether row ``a`` is better than row ``b`` in ``metric`` by more than the noise (see the module's doc)."""
        higher = self._columns().get(metric, (metric, True))[1]
        sign = 1 if higher else -1
        pair = self.paired(metric, a, b) if self.paired else None
        if pair is not None:
            return pair["ci_low"] > 0 if higher else pair["ci_high"] < 0
        (ma, sa), (mb, sb) = mean_and_se(self.rows[a][metric]), mean_and_se(self.rows[b][metric])
        if math.isnan(sa) or math.isnan(sb):
            return False  # one seed: the spread is unknown
        return sign * (ma - mb) > 2 * math.sqrt(sa ** 2 + sb ** 2)

    def ranks(self, metric: str) -> dict[str, int]:
        """1 for the best label of a column, 2 for the second best (by mean), each only where it is beyond the noise:
        the best beyond the second, the second (of three rows or more) beyond the third, and the best marked."""
        higher = self._columns().get(metric, (metric, True))[1]
        if higher is None:
            return {}
        means = {label: mean_and_se(r[metric])[0] for label, r in self.rows.items() if metric in r}
        order = sorted(means, key=means.get, reverse=higher)
        marks = {}
        if len(order) >= 2 and self.beyond_noise(metric, order[0], order[1]):
            marks[order[0]] = 1
            if len(order) > 2 and self.beyond_noise(metric, order[1], order[2]):  # (of two rows, none is second)
                marks[order[1]] = 2
        return marks

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
        notes = ["", "Mean ± standard error over seeds; **best**, _second best_, each marked only where it is beyond the "
                 "noise (rows that share their noise: the paired interval over prompts excludes 0; others: a gap of "
                 "more than 2 combined standard errors)."] + [f"- {n}" for n in self.notes]
        return "\n".join(lines + notes + self._differences_markdown()) + "\n"

    def _differences_markdown(self) -> list[str]:
        if not self.differences:
            return []
        metrics = [m for m in self.metrics() if any(m in d for d in self.differences.values())]
        header = ["Method"] + [self._columns().get(m, (m, True))[0] for m in metrics]
        lines = ["", f"Paired differences against {self.reference} (the same seeds and noise; mean over prompts, "
                     "95% bootstrap interval over prompts):", "",
                 "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for label, diffs in self.differences.items():
            cells = ["–" if m not in diffs else f"{diffs[m]['diff']:+.3g} [{diffs[m]['ci_low']:+.3g}, "
                     f"{diffs[m]['ci_high']:+.3g}]" for m in metrics]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        return lines

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.writer(buf)
        diff_cols = [m for m in self.metrics() if any(m in d for d in self.differences.values())]
        writer.writerow(["method"] + [f"{m}_{s}" for m in self.metrics() for s in ("mean", "se", "n_seeds")]
                        + [f"{m}_{s}" for m in diff_cols for s in ("diff_vs_ref", "diff_ci_low", "diff_ci_high")])
        for label, r in self.rows.items():
            row = [label]
            for m in self.metrics():
                row += [*mean_and_se(r[m]), len(r[m])] if m in r else ["", "", ""]
            for m in diff_cols:
                d = self.differences.get(label, {}).get(m)
                row += [d["diff"], d["ci_low"], d["ci_high"]] if d else ["", "", ""]
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
