from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def test_qualitative_grid_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    monkeypatch.setenv("EVAL_DIR", str(tmp_path / "demo"))
    nb = nbformat.read(ROOT / "notebooks" / "qualitative_grids.ipynb", as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    grid = tmp_path / "demo" / "qualitative_grid.png"
    assert grid.stat().st_size > 5_000
    from PIL import Image

    w, h = Image.open(grid).size
    assert w > 300 and h > 500  # 2 methods x 4 prompts
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "| Perturbed |" in outputs
