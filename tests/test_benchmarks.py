"""The benchmarks' smoke modes (their numbers mean nothing on CPU; the scripts must keep working)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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


def test_tinyworld_reproduction_at_reduced_size(tiny_models, tmp_path):
    """The reproduction script end to end (two methods, one seed, the clipping ablation) on the tiny models."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    out = tmp_path / "repro"
    args = [sys.executable, str(ROOT / "benchmarks/reproduce_tinyworld.py"), "--quick", "--methods", "adrpo", "raft",
            "--seeds", "0", "--eval_num_prompts", "3", "--images_per_prompt", "2", "--out", str(out), "--",
            "--pretrained_model", str(tiny_models["sd3"]), "--reward_model", str(tiny_models["clip"]),
            "--train_prompts", str(prompts), "--num_iterations", "2", "--prompts_per_iteration", "2",
            "--samples_per_prompt", "2", "--train_batch_size", "2", "--num_inference_steps", "2"]
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("table1.md", "table1.csv", "table1.tex", "ablation.md", "fig3.png", "fig3.pdf", "README.md"):
        assert (out / name).is_file(), name
    table = (out / "table1.md").read_text()
    assert all(f"| {label} |" in table for label in ("Base", "ADRPO", "RAFT"))
    ablation = (out / "ablation.md").read_text()
    assert all(f"| clip ±{m}·β0 |" in ablation for m in ("0.5", "1", "2"))
    readme = (out / "README.md").read_text()
    assert "reproduce_tinyworld.py --quick" in readme and "Commit:" in readme and "not SD3 results" in readme
    for run in ("adrpo_s0", "raft_s0", "adrpo_clip0.5_s0", "adrpo_clip2_s0"):
        assert (out / "runs" / run / "final" / "pytorch_lora_weights.safetensors").is_file(), run
