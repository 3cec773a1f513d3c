import json
import os
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_qualitative_grid_notebook_runs_with_the_readme_command(tmp_path):
    """`jupyter execute` (the README's command) on the shipped tiny world and a stand-in for the main job's run:
    the grid is shown inline, the base is the first column, and the rows carry their full prompts."""
    from sd3_adrpo.models import add_lora, load_pipeline, save_lora

    pipe = load_pipeline(str(ROOT / "assets/tinyworld/sd3"), drop_t5=True)  # a main job's final/, perturbed
    torch.manual_seed(0)
    with torch.no_grad():
        for p in add_lora(pipe.transformer, rank=4):
            p.add_(0.3 * torch.randn_like(p))
    save_lora(pipe.transformer, tmp_path / "run" / "final")
    executed = tmp_path / "executed.ipynb"
    env = {**os.environ, "EVAL_DIR": str(tmp_path / "eval"), "RUN_DIR": str(tmp_path / "run"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(["jupyter", "execute", "--timeout=300", f"--output={executed.with_suffix('')}",
                             str(ROOT / "notebooks" / "qualitative_grids.ipynb")], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    import nbformat

    cells = [c for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code"]
    outputs = [o for c in cells for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert "columns: Base, ADRPO" in text and "no main job run" not in text  # the run given, the base first
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # the grid, shown inline once (not "<Figure size ...>")
    assert not any("<Figure size" in str(o.get("data", {}).get("text/plain", "")) and "image/png" not in o.get("data", {})
                   for o in outputs)
    assert any("text/markdown" in o.get("data", {}) and "| ADRPO |" in o["data"]["text/markdown"] for o in outputs)

    from sd3_adrpo.plots import qualitative_grid

    fig = qualitative_grid(tmp_path / "eval")  # the rows' labels: each prompt in full (wrapped, never cut)
    manifest = json.loads((tmp_path / "eval" / "images" / "Base" / "manifest.json").read_text())
    prompts = manifest["settings"]["prompts"]
    labels = [ax.get_ylabel().replace("\n", " ") for ax in fig.axes if ax.get_ylabel()]
    assert labels == prompts[: len(labels)] and max(map(len, labels)) > 40
    assert manifest["settings"]["source"].endswith("assets/tinyworld/sd3")  # the shipped tiny world
