import json

import pytest
import torch

from sd3_adrpo import table1
from sd3_adrpo.models import add_lora, load_pipeline, save_lora


@pytest.fixture(scope="module")
def lora_dir(tiny_models, tmp_path_factory):
    """A LoRA far enough from the base to change its samples."""
    pipe = load_pipeline(str(tiny_models["sd3"]), drop_t5=True)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in add_lora(pipe.transformer, rank=4):
            p.add_(torch.randn_like(p) * 0.3)
    out = tmp_path_factory.mktemp("lora")
    save_lora(pipe.transformer, out)
    return out


def _args(tiny_models, lora_dir, tmp_path, seeds=("0", "1")):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle above a yellow circle\n")
    return ["--base", str(tiny_models["sd3"]), "--run", f"ADRPO={lora_dir}", "--prompts", str(prompts),
            "--num_prompts", "2", "--seeds", *seeds, "--images_per_prompt", "2", "--steps", "3",
            "--guidance_scale", "4", "--resolution", "64", "--drop_t5", "--max_sequence_length", "4",
            "--clip", str(tiny_models["clip"]), "--judge", "tinyworld.scorers:Oracle", "--out", str(tmp_path / "eval")]


def test_table1_end_to_end_and_no_regeneration(tiny_models, lora_dir, tmp_path, monkeypatch):
    table = table1.main(_args(tiny_models, lora_dir, tmp_path))
    out = tmp_path / "eval"
    assert list(table.rows) == ["Base", "ADRPO"]
    for name in ("table.md", "table.csv", "table.tex", "runs/Base.json", "runs/ADRPO.json", "scores/ADRPO.jsonl"):
        assert (out / name).is_file(), name
    run = json.loads((out / "runs" / "ADRPO.json").read_text())["metrics"]
    for key in ("clip_score", "clip_diversity", "clip_diversity_cosine", "clip_diversity_l2", "oracle_accuracy",
                "w2_divergence"):
        assert len(run[key]["per_seed"]) == 2, key
    base = json.loads((out / "runs" / "Base.json").read_text())["metrics"]
    assert base["w2_divergence"]["mean"] == 0 and run["w2_divergence"]["mean"] > 0
    scores = [json.loads(x) for x in (out / "scores" / "ADRPO.jsonl").read_text().splitlines()]
    file_prompts = (tmp_path / "p.txt").read_text().splitlines()
    assert len(scores) == 2 * 2 * 2 and len({s["prompt"] for s in scores}) == 2  # --num_prompts 2 of the file's 3
    assert {s["prompt"] for s in scores} <= set(file_prompts)
    assert run["clip_score"]["per_seed"][0] == pytest.approx(
        sum(s["clip_score"] for s in scores if s["seed"] == 0) / 4)
    assert (out / scores[0]["file"]).is_file()
    for category in {s["category"] for s in scores}:  # per-category oracle columns: the mean over that category only
        mine = [s["oracle_accuracy"] for s in scores if s["seed"] == 1 and s["category"] == category]
        assert run[f"oracle_accuracy_{category}"]["per_seed"][1] == pytest.approx(sum(mine) / len(mine))
    assert {s["category"] for s in scores} <= {"colour", "counting", "position", "binding"}
    # the judge's columns are labelled by the judge, one per category it sorted the prompts into
    header = (out / "table.md").read_text().splitlines()[0]
    assert "Oracle acc." in header and all(f"Oracle acc. {c}" in header for c in {s["category"] for s in scores})

    # Scoring again reuses the saved images: generation must not run.
    monkeypatch.setattr(table1.SD3Sampler, "sample", lambda *a, **k: pytest.fail("regenerated"))
    again = table1.main(_args(tiny_models, lora_dir, tmp_path))
    assert again.rows == table.rows


def test_extra_metrics_become_columns_and_missing_ones_are_noted(tiny_models, lora_dir, tmp_path):
    table = table1.main([*_args(tiny_models, lora_dir, tmp_path, seeds=("0",)), "--pickscore", str(tiny_models["clip"])])
    assert "pickscore" in table.rows["ADRPO"] and "image_reward" not in table.rows["ADRPO"]
    md = (tmp_path / "eval" / "table.md").read_text()
    assert "PickScore" in md and "image_reward left out: no --image_reward weights given." in md
    assert "ImageReward" not in md.splitlines()[0]  # no empty column, never a zero


def test_changed_settings_regenerate(tiny_models, lora_dir, tmp_path):
    table1.main(_args(tiny_models, lora_dir, tmp_path, seeds=("0",)))
    manifest = json.loads((tmp_path / "eval" / "images" / "ADRPO" / "manifest.json").read_text())
    assert manifest["settings"]["seeds"] == [0]
    table = table1.main(_args(tiny_models, lora_dir, tmp_path, seeds=("0", "3")))
    assert len(table.rows["ADRPO"]["clip_score"]) == 2


def test_bad_run_folder_is_a_clear_error(tiny_models, tmp_path):
    with pytest.raises(SystemExit, match="has no pytorch_lora_weights.safetensors"):
        table1.main(_args(tiny_models, tmp_path / "nope", tmp_path))


def test_other_pipelines_are_extra_rows(tiny_models, lora_dir, tmp_path):
    args = _args(tiny_models, lora_dir, tmp_path, seeds=("0",))
    args = [a for a in args if a != f"ADRPO={lora_dir}" and a != "--run"]
    table = table1.main([*args, "--pipeline", f"Other={tiny_models['sd3']}"])
    assert list(table.rows) == ["Base", "Other"]
    other = json.loads((tmp_path / "eval" / "runs" / "Other.json").read_text())["metrics"]
    assert "clip_score" in other and "w2_divergence" not in other  # W2 only exists for our own LoRAs


def test_a_prompt_files_fields_reach_the_judges(tiny_models, lora_dir, verifiable_prompts, tmp_path):
    """Free-worded prompts the oracle cannot parse, with GenEval-style fields: the judge verifies the images through
    those fields and its per-category columns come from each row's tag (it used to stop on the wording)."""
    prompts, _ = verifiable_prompts
    args = _args(tiny_models, lora_dir, tmp_path, seeds=("0",))
    args[args.index("--prompts") + 1] = str(prompts)
    table = table1.main(args)
    for label in ("Base", "ADRPO"):
        values = table.rows[label]
        assert {"oracle_accuracy_colour", "oracle_accuracy_counting"} <= set(values)
        assert all(0 <= v <= 1 for v in values["oracle_accuracy"])
