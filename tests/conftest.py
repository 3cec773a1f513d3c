"""Shared fixtures: the tiny random SD3 pipeline and CLIP, built once per test session (no hub access)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest
import torch

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Paths of a tiny random ``StableDiffusion3Pipeline`` folder (no T5) and a tiny ``CLIPModel`` folder."""
    from sd3_adrpo.tiny import build_all

    return build_all(tmp_path_factory.mktemp("tiny"), seed=0)


@pytest.fixture
def tiny_pipe(tiny_models):
    from sd3_adrpo.models import load_pipeline

    return load_pipeline(str(tiny_models["sd3"]), drop_t5=True)
