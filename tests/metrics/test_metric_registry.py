import numpy as np
import pytest
import torch

from sd3_adrpo.metrics import METRICS, Metric, build_metric, register_metric


def test_registry_lists_the_metrics_and_names_them():
    assert {"clip_score", "pickscore", "aesthetic", "hpsv2", "blip_score", "image_reward"} <= set(METRICS)
    assert all(cls.name == name for name, cls in METRICS.items())
    with pytest.raises(ValueError, match="unknown metric 'nope'; available: aesthetic, blip_score, clip, clip_score"):
        build_metric("nope", "x")
    with pytest.raises(ValueError, match="already registered"):
        register_metric("clip_score")(Metric)


@pytest.mark.parametrize("name, weights, says", [
    ("clip_score", "./no/such/clip", "Pass a CLIPModel hub id"),
    ("pickscore", "/no/such/pickscore", "Pass a CLIPModel hub id"),
    ("aesthetic", "/no/such/sac+logos+ava1-l14-linearMSE.pth", "Pass the head file"),
    ("hpsv2", "/no/such/HPS_v2_compressed.pt", "Pass the HPS checkpoint file"),
    ("blip_score", "model_large.pth", "Pass BLIP's pre-train checkpoint model_large.pth"),
    ("image_reward", "/no/such/ImageReward.pt", "Pass a hub id .*THUDM/ImageReward.*ImageReward.pt"),
])
def test_a_missing_local_path_says_what_to_pass(name, weights, says):
    with pytest.raises(FileNotFoundError, match=f"{name}: weights '.*' not found. {says}"):
        build_metric(name, weights)


def test_image_reward_folder_without_its_files_says_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageReward.pt' not found. Pass a hub id"):
        build_metric("image_reward", str(tmp_path))


def test_inputs_are_checked(tiny_models):
    metric = build_metric("clip_score", str(tiny_models["clip"]))
    with pytest.raises(ValueError, match="uint8 images of shape"):
        metric(torch.rand(2, 64, 64, 3), ["a", "b"])
    with pytest.raises(ValueError, match="one prompt per image"):
        metric(np.zeros((2, 64, 64, 3), np.uint8), ["a"])
