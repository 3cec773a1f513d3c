import json
import subprocess
import sys
from pathlib import Path

import pytest

import train_sd3_adrpo
from sd3_adrpo.plots import load_trajectory

ROOT = Path(__file__).resolve().parents[1]


def test_training_records_the_trajectory_and_the_plot_renders(tiny_models, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\ntwo blue squares\na green triangle\na purple square and an orange circle\n")
    out = tmp_path / "run"
    args = ["--config", str(ROOT / "configs/tiny_random.yaml"), "--pretrained_model", str(tiny_models["sd3"]),
            "--reward_model", str(tiny_models["clip"]), "--train_prompts", str(prompts),
            "--eval_prompts", str(prompts), "--eval_every", "2", "--eval_num_prompts", "3",
            "--eval_images_per_prompt", "2", "--num_iterations", "3", "--prompts_per_iteration", "2",
            "--samples_per_prompt", "2", "--train_batch_size", "2", "--num_inference_steps", "3",
            "--checkpoint_every", "0", "--sample_every", "0", "--learning_rate", "5e-2", "--output_dir", str(out),
            "--judges", "tinyworld.scorers:Oracle"]
    assert train_sd3_adrpo.main(args) == 0
    rows = load_trajectory(out)
    assert [r["iteration"] for r in rows] == [0, 2, 3]  # the base, every 2 iterations, and the end
    assert rows[0]["w2_divergence"] == 0.0  # the policy starts at the reference (LoRA B = 0)
    assert rows[-1]["w2_divergence"] > 0.0
    for key in ("reward", "clip_score", "clip_diversity", "clip_diversity_l2", "oracle_accuracy"):
        assert all(key in r for r in rows), key
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert "eval_w2_divergence" in metrics[1] and "eval_w2_divergence" not in metrics[0]

    fig = tmp_path / "fig3"
    result = subprocess.run([sys.executable, str(ROOT / "eval/plot_tradeoff.py"), "--run", f"ADRPO={out}",
                             "--run", f"again={out}", "--out", str(fig)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert fig.with_suffix(".png").stat().st_size > 10_000 and fig.with_suffix(".pdf").is_file()


def test_missing_trajectory_says_how_to_record_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="--eval_every"):
        load_trajectory(tmp_path)


def test_the_same_trajectory_gives_the_same_files(tmp_path):
    from sd3_adrpo.plots import plot_tradeoff

    rows = [{"iteration": i, "reward": 60 + i, "clip_score": 60 + i, "clip_diversity": 30 - i,
             "w2_divergence": 1e-3 * i} for i in range(4)]
    first = [p.read_bytes() for p in plot_tradeoff({"ADRPO": rows}, tmp_path / "a" / "fig3")]
    second = [p.read_bytes() for p in plot_tradeoff({"ADRPO": rows}, tmp_path / "b" / "fig3")]
    assert first == second and first[1].startswith(b"%PDF")
    assert b"/CreationDate" not in first[1]  # a date would make every rewrite a new file
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["fig3.pdf", "fig3.png"]  # no temporary left


def test_a_figure_is_saved_as_a_palette_png_and_a_dated_free_pdf_in_place(tmp_path):
    """save_figure (every committed figure): the PNG holds at most 256 colours, the stem keeps its dots
    (``fig.v1`` is not cut to ``fig``), nothing temporary is left."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from sd3_adrpo.plots import save_figure

    fig, ax = plt.subplots()
    for k in range(12):  # anti-aliased lines of many colours: thousands of distinct RGB values before the palette
        ax.plot([0, 1], [k, k + 1], lw=3)
    paths = save_figure(fig, tmp_path / "fig.v1", dpi=80)
    plt.close(fig)
    assert [p.name for p in paths] == ["fig.v1.png", "fig.v1.pdf"]
    image = Image.open(paths[0])
    assert image.mode == "P" and len(image.convert("RGB").getcolors(2**16)) <= 256
    assert paths[1].read_bytes().startswith(b"%PDF") and b"/CreationDate" not in paths[1].read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.v1.pdf", "fig.v1.png"]
