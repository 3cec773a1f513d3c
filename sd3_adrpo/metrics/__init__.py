"""Scorers behind one name registry: each is an evaluation metric (a judge, a Table 1 column) and a training reward
(``reward:``, ``sd3_adrpo.rewards``) alike (definitions: README, "Evaluation"; docs/rewards.md). Each scores uint8
images (B, H, W, 3) against prompts and returns float64 scores (B,):

    from sd3_adrpo.metrics import build_metric
    metric = build_metric("pickscore", "yuvalkirstain/PickScore_v1", device="cuda")
    scores = metric(images, prompts)

``weights`` is a hub id or a local folder/file (what each metric expects is in its docstring). Registered:
clip_score, clip (the same CLIP score unclamped), open_clip, pickscore, aesthetic, hpsv2 (``metrics.clip``),
image_reward, blip_score (``metrics.imagereward``). A scorer outside this package is named by its import path, e.g.
``build_metric("tinyworld.scorers:Oracle")``, by a file ``path/to/file.py:ClassName``, or served over HTTP by its URL
(``sd3_adrpo.reward_server``); the same specs name the ``judges`` of a training run (``NAME`` or ``NAME@WEIGHTS``). W2 divergence is not an
(images, prompts) metric: the trainer computes it.

Add a metric:

    @register_metric("my_metric")
    class MyMetric(Metric):
        def __init__(self, weights, device="cpu", **kwargs): ...
        def __call__(self, images, prompts): return np.array([...])
"""

from sd3_adrpo.metrics.base import (METRICS, Metric, ScorerUnavailable, build_metric, call_scorer, metric_class,
                                    parse_metric_spec, register_metric)
from sd3_adrpo.metrics.clip import Aesthetic, ClipScore, ClipScoreReward, HPSv2, OpenClipScore, PickScore
from sd3_adrpo.metrics.imagereward import BlipScore, ImageReward

__all__ = ["METRICS", "Metric", "ScorerUnavailable", "build_metric", "call_scorer", "metric_class",
           "parse_metric_spec", "register_metric", "ClipScore", "ClipScoreReward", "OpenClipScore", "PickScore",
           "Aesthetic", "HPSv2", "ImageReward", "BlipScore"]
