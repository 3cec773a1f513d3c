"""The SD3-medium / SD3.5-medium / FLUX.1-dev GPU benchmark's tiny mode (its numbers mean nothing on CPU; the script must keep
working, through every row it produces on a GPU but the torch.compile ones)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROFILES = ("80gb", "24gb")


def test_gpu_benchmark_tiny_mode(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_sd3_medium.py"), "--tiny", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert "SD3-medium, SD3.5-medium and FLUX.1-dev architectures (TINY shapes)" in result.stdout
    rollouts = {m: [r for r in data["rows"] if r["what"] == "rollout" and r["model"] == m]
                for m in ("SD3-medium", "SD3.5-medium")}
    assert {(r["resolution"], r["steps"], r["cfg"]) for r in rollouts["SD3-medium"]} == {
        (res, s, c) for res in (64, 128) for s in (2, 3) for c in (True, False)}
    assert {(r["resolution"], r["steps"], r["cfg"]) for r in rollouts["SD3.5-medium"]} == {
        (res, 2, c) for res in (64, 128) for c in (True, False)}
    assert all(r["images_per_s"] > 0 for rows in rollouts.values() for r in rows)
    models = data["models"]
    flux = {m: v for m, v in models.items() if m == "FLUX.1-dev"}
    models = {m: v for m, v in models.items() if m != "FLUX.1-dev"}
    # SD3.5's extra attention (and q/k norms) make it the larger model, at more FLOPs per forward
    assert models["SD3.5-medium"]["transformer_params"] > models["SD3-medium"]["transformer_params"]
    for m in models.values():
        assert m["tflop_per_forward"]["128"] > m["tflop_per_forward"]["64"] > 0
    assert models["SD3.5-medium"]["tflop_per_forward"]["64"] > models["SD3-medium"]["tflop_per_forward"]["64"]
    for model in models:
        trains = {r["what"]: r for r in data["rows"] if r["what"].startswith("train") and r["model"] == model}
        # each memory profile, under both loss_guidance settings, with the profile's own knobs
        assert set(trains) == {f"train step ({p}{g})" for p in PROFILES for g in ("", ", guided")}
        small, big = trains["train step (24gb)"], trains["train step (80gb)"]
        assert small["gradient_checkpointing"] and small["optimizer"] == "adamw8bit"
        assert not big["gradient_checkpointing"] and big["optimizer"] == "adamw"
        assert big["batch"] > small["batch"]
        assert all(r["samples_per_s"] > 0 and "peak_gib" in r for r in trains.values())

    # FLUX.1-dev through its model family: one pass a step (no CFG rows), its one 80 GB profile's knobs, no guided row
    flux_rollouts = [r for r in data["rows"] if r["what"] == "rollout" and r["model"] == "FLUX.1-dev"]
    assert {(r["resolution"], r["steps"], r["cfg"]) for r in flux_rollouts} == {(64, 2, False), (128, 2, False)}
    assert all(r["images_per_s"] > 0 for r in flux_rollouts)
    assert flux["FLUX.1-dev"]["tflop_per_forward"]["128"] > flux["FLUX.1-dev"]["tflop_per_forward"]["64"] > 0
    trains = [r for r in data["rows"] if r["what"].startswith("train") and r["model"] == "FLUX.1-dev"]
    assert [r["what"] for r in trains] == ["train step (80gb)"]
    assert trains[0]["gradient_checkpointing"] and trains[0]["samples_per_s"] > 0
