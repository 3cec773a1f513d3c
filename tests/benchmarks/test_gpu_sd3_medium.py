"""The SD3-medium speed benchmark's tiny mode (its numbers mean nothing on CPU; the script must keep working)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_tiny_mode(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_sd3_medium.py"), "--tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    rollouts = [r for r in data["rows"] if r["what"] == "rollout"]
    assert {(r["resolution"], r["steps"], r["cfg"]) for r in rollouts} == {
        (res, s, c) for res in (64, 128) for s in (2, 3) for c in (True, False)}
    assert all(r["images_per_s"] > 0 for r in rollouts)
    trains = {r["what"]: r for r in data["rows"] if r["what"].startswith("train")}
    assert trains["train step (24gb)"]["gradient_checkpointing"] and trains["train step (24gb)"]["optimizer"] == "adamw8bit"
    assert trains["train step (80gb)"]["batch"] > trains["train step (24gb)"]["batch"]
    assert data["tflop_per_forward"]["128"] > data["tflop_per_forward"]["64"] > 0
    assert "SD3-medium architecture (TINY shapes)" in result.stdout
