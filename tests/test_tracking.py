"""Tracker wiring: which trackers accelerate gets for each report_to, the settings they can store, and the shapes
each tracker's image call receives (the real tensorboard round trip is in test_run_outputs.py)."""

import numpy as np
import pytest

from sd3_adrpo.config import make_config
from sd3_adrpo.tracking import accelerator_kwargs, log_images, tracker_config


@pytest.mark.parametrize("report_to, trackers", [("none", None), ("tensorboard", ["tensorboard"]),
                                                 ("wandb", ["wandb"]), ("all", ["tensorboard", "wandb"])])
def test_report_to_picks_the_trackers(report_to, trackers, tmp_path):
    kwargs = accelerator_kwargs(make_config({"report_to": report_to, "output_dir": str(tmp_path / "run")}))
    assert kwargs["log_with"] == trackers
    assert kwargs.get("project_dir") == (str(tmp_path / "run" / "logs") if trackers else None)


def test_tracker_config_holds_only_scalars_and_strings():
    flat = tracker_config(make_config({"lora_targets": ["to_q", "to_v"], "judges": []}))
    assert flat["lora_targets"] == "to_q,to_v" and flat["judges"] == "" and flat["revision"] == "null"
    assert flat["beta0"] == 1.0 and flat["adv_clip"] is True
    assert all(isinstance(v, (bool, int, float, str)) for v in flat.values())


def test_each_tracker_gets_images_in_its_own_shape():
    calls = []

    class Tracker:
        def __init__(self, name):
            self.name = name

        def log_images(self, values, step, **kwargs):
            calls.append((self.name, {k: (type(v).__name__, np.shape(v)) for k, v in values.items()}, step, kwargs))

    class Accelerator:
        trackers = [Tracker("tensorboard"), Tracker("wandb")]

    image = np.zeros((30, 40, 3), np.uint8)
    log_images(Accelerator(), {"samples": image}, step=7)
    assert calls == [("tensorboard", {"samples": ("ndarray", (1, 30, 40, 3))}, 7, {"dataformats": "NHWC"}),
                     ("wandb", {"samples": ("list", (1, 30, 40, 3))}, 7, {})]
