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
    # Base (29.367 +- 0.19) is second by its mean but not beyond RAFT's 29.35 +- 0.03: not marked
    assert "_" not in base.split("|")[2] and "_" not in raft.split("|")[2]
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
    assert r"\textbf{32.97 $\pm$ 0.04}" in tex and r"\underline" not in tex
    assert r"+ADRPO &" in tex and tex.strip().endswith(r"\end{tabular}")


def test_a_lead_inside_the_noise_is_not_marked():
    # the case: 68.87 +- 1.30 over 68.56 +- 0.33 (se over 3 seeds) is no evidence of a best
    t = Table({"fixed beta": {"clip_score": [66.62, 68.87, 71.12]}, "ADRPO": {"clip_score": [67.99, 68.56, 69.13]}})
    assert mean_and_se(t.rows["fixed beta"]["clip_score"]) == pytest.approx((68.87, 1.30), abs=0.005)
    assert mean_and_se(t.rows["ADRPO"]["clip_score"]) == pytest.approx((68.56, 0.33), abs=0.005)
    assert t.ranks("clip_score") == {} and "**" not in t.to_markdown().split("\n\n")[0]
    # the same means with standard errors of 0.058: 0.31 > 2 * sqrt(2) * 0.058 = 0.16
    tight = Table({"fixed beta": {"clip_score": [68.77, 68.87, 68.97]}, "ADRPO": {"clip_score": [68.46, 68.56, 68.66]}})
    assert tight.ranks("clip_score") == {"fixed beta": 1}  # of two rows, the other is not "second best"
    assert Table({"A": {"clip_score": [1.0]}, "B": {"clip_score": [0.0]}}).ranks("clip_score") == {}  # one seed: unknown


def test_rows_that_share_noise_are_judged_by_their_paired_difference():
    rows = {"Base": {"clip_score": [60.0, 62.0]}, "ADRPO": {"clip_score": [60.5, 62.5]}}  # se 1.0 each
    assert Table(rows).ranks("clip_score") == {}  # unpaired, 0.5 is inside 2 * sqrt(2)
    gaps = {("ADRPO", "Base"): {"diff": 0.5, "ci_low": 0.3, "ci_high": 0.7}}
    paired = lambda metric, a, b: gaps.get((a, b)) or (  # noqa: E731
        {"diff": -gaps[(b, a)]["diff"], "ci_low": -gaps[(b, a)]["ci_high"], "ci_high": -gaps[(b, a)]["ci_low"]}
        if (b, a) in gaps else None)
    t = Table(rows, paired=paired, reference="Base", differences={"ADRPO": {"clip_score": gaps[("ADRPO", "Base")]}})
    assert t.ranks("clip_score") == {"ADRPO": 1}  # every prompt improved by about 0.5: beyond the noise
    md = t.to_markdown()
    assert "Paired differences against Base" in md and "| ADRPO | +0.5 [+0.3, +0.7] |" in md
    row = next(r for r in csv.DictReader(io.StringIO(t.to_csv())) if r["method"] == "ADRPO")
    assert (float(row["clip_score_diff_vs_ref"]), float(row["clip_score_diff_ci_low"])) == (0.5, 0.3)
    gaps[("ADRPO", "Base")] = {"diff": 0.5, "ci_low": -0.1, "ci_high": 1.1}
    assert Table(rows, paired=paired).ranks("clip_score") == {}


def test_table1_pairs_the_base_and_its_loras_per_prompt(tmp_path):
    import json

    from sd3_adrpo.table1 import per_prompt_values, write_outputs

    def rows(scores):  # scores[seed][prompt] = the two images' ClipScores
        return [{"file": "x.png", "seed": s, "prompt_index": p, "j": j, "prompt": f"p{p}", "clip_score": v}
                for s, per_prompt in enumerate(scores) for p, pair in enumerate(per_prompt) for j, v in enumerate(pair)]

    base = rows([[[60, 62], [70, 70], [50, 54]], [[61, 61], [71, 69], [52, 52]]])
    lora = rows([[[61, 63], [71, 72], [50, 55]], [[62, 62], [72, 70], [53, 54]]])
    other = rows([[[90, 90], [90, 90], [90, 90]], [[90, 90], [90, 90], [90, 90]]])
    # per prompt, over seeds and images: base 61, 70, 52; lora 62, 71.25, 53
    assert per_prompt_values(lora)["clip_score"] == {0: 62.0, 1: 71.25, 2: 53.0}
    results = {"Base": {"clip_score": [59.67, 60.67]}, "ADRPO": {"clip_score": [60.33, 62.17]},
               "FLUX": {"clip_score": [90.0, 90.0]}}
    meta = {"num_prompts": 3, "images_per_prompt": 2, "seeds": [0, 1], "steps": 3, "guidance_scale": 4,
            "resolution": 64}
    table = write_outputs(tmp_path, results, {"Base": base, "ADRPO": lora, "FLUX": other}, [], meta,
                          shared_noise=("Base", "ADRPO"), reference="Base")
    record = json.loads((tmp_path / "runs" / "ADRPO.json").read_text())["paired_vs_Base"]["clip_score"]
    assert record["diff"] == pytest.approx((1 + 1.25 + 1) / 3)  # the mean of the per-prompt differences
    assert record["ci_low"] > 0 and record["n_clusters"] == 3  # every prompt improved: the interval excludes 0
    assert table.paired("clip_score", "FLUX", "Base") is None  # another pipeline does not share the noise
    assert "FLUX" not in table.differences and "Paired differences against Base" in (tmp_path / "table.md").read_text()
