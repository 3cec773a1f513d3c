"""Shared fixtures: the tiny random SD3 pipeline and CLIP, built once per test session (no hub access)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, and in the runs they start
    os.environ["OMP_NUM_THREADS"] = "1"  # (a CPU run is bit-for-bit only at the same thread count)

import pytest
import torch

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of a tiny random ``StableDiffusion3Pipeline`` folder (no T5) and a tiny ``CLIPModel`` folder."""
    from tinyworld.stand_ins import build_all

    return build_all(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def tiny_pipe(tiny_models):
    from sd3_adrpo.models import load_pipeline

    return load_pipeline(str(tiny_models["sd3"]), drop_t5=True)


@pytest.fixture
def tiny_run_args(tiny_models, tmp_path):
    """train_sd3_adrpo.py arguments for a 2-iteration run on the tiny random stand-ins (3 prompts, checkpoints and
    grids every iteration); add --output_dir."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green triangle\n")
    return ["--config", "configs/tiny_random.yaml", "--pretrained_model", str(tiny_models["sd3"]),
            "--reward_model", str(tiny_models["clip"]), "--train_prompts", str(prompts), "--eval_prompts", str(prompts),
            "--num_iterations", "2", "--prompts_per_iteration", "2", "--samples_per_prompt", "2",
            "--train_batch_size", "2", "--num_inference_steps", "3", "--checkpoint_every", "1", "--sample_every", "1",
            "--num_sample_prompts", "2", "--sample_images_per_prompt", "2"]


@pytest.fixture
def verifiable_prompts(tmp_path):
    """A .jsonl prompt file in free wording the tiny world's oracle cannot parse, whose rows carry GenEval-style fields
    (tag, include) it verifies images by; returns (its path, its rows)."""
    import json

    rows = [{"prompt": "a picture of one crimson disc", "tag": "colour",
             "include": [{"class": "circle", "color": "red", "count": 1}]},
            {"prompt": "a pair of blue boxes", "tag": "counting",
             "include": [{"class": "square", "color": "blue", "count": 2}]}]
    path = tmp_path / "verifiable.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


@pytest.fixture(scope="session")
def tiny_open_clip(tmp_path_factory):
    """A tiny open_clip architecture registered as 'TinyTestCLIP', and a random model of it (seed 0)."""
    import json

    import open_clip

    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "patch_size": 16,
                                         "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}
    path = tmp_path_factory.mktemp("open_clip") / "TinyTestCLIP.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return "TinyTestCLIP", open_clip.create_model("TinyTestCLIP").eval()
