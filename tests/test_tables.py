import csv
import io
import math

import pytest

from sd3_adrpo.tables import Table, mean_and_se


def test_standard_error_hand_computed():
    mean, se = mean_and_se([1.0, 2.0, 3.0])
    assert mean == 2.0 and se == pytest.approx(1 / math.sqrt(3))  # std(ddof=1) = 1
    assert math.isnan(mean_and_se([4.0])[1])


def _table():
    return Table({"Base": {"clip_score": [29.0, 29.5, 29.6], "w2_divergence": [0.0, 0.0, 0.0]},
                  "+RAFT": {"clip_score": [29.3, 29.4, 29.35], "w2_divergence": [0.02, 0.03, 0.025]},
                  "+ADRPO": {"clip_score": [33.0, 32.9, 33.01], "w2_divergence": [0.001, 0.0008, 0.0009],
                             "image_reward": [1.6, 1.62, 1.61]}},
                 notes=["ImageReward left out for Base and +RAFT: no weights given."])


def test_markdown_marks_best_and_second_and_missing_cells():
    md = _table().to_markdown()
    lines = md.splitlines()
    assert lines[0] == "| Method | ClipScore | ImageReward | W2 divergence (sampled policy) |"
    adrpo = next(line for line in lines if line.startswith("| +ADRPO"))
    base = next(line for line in lines if line.startswith("| Base"))
    raft = next(line for line in lines if line.startswith("| +RAFT"))
    assert "**32.97 ± 0.04**" in adrpo  # best ClipScore: mean 32.97, se sqrt(0.0037 / 3) = 0.035
    assert "_29.37 ± 0.19_" in base and "_" not in raft.split("|")[2]  # second best is Base (29.367 > 29.35)
    assert "| – |" in base  # no ImageReward for Base
    assert "**" not in adrpo.split("|")[4]  # W2 is not ranked
    assert "9.00e-04 ± 5.8e-05" in adrpo  # small values keep their digits
    assert "no weights given" in md


def test_csv_and_latex_carry_the_same_numbers():
    t = _table()
    rows = list(csv.DictReader(io.StringIO(t.to_csv())))
    adrpo = next(r for r in rows if r["method"] == "+ADRPO")
    assert float(adrpo["clip_score_mean"]) == pytest.approx(32.97)
    assert float(adrpo["clip_score_se"]) == pytest.approx(mean_and_se([33.0, 32.9, 33.01])[1])
    assert adrpo["clip_score_n_seeds"] == "3" and rows[0]["image_reward_mean"] == ""
    tex = t.to_latex()
    assert r"\textbf{32.97 $\pm$ 0.04}" in tex and r"\underline{29.37 $\pm$ 0.19}" in tex
    assert r"+ADRPO &" in tex and tex.strip().endswith(r"\end{tabular}")
