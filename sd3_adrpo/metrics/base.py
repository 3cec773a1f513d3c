"""The scorer registry and what every scorer shares: input checks, weight resolution, preprocessing, the MLP head.

A scorer maps (uint8 images (B, H, W, 3), prompts) -> float64 scores (B,), scored in fp32, eval mode, no grad,
in batches, on the device it was built for. The same object is a training reward (``reward:``, see
``sd3_adrpo.rewards``) and an evaluation metric (``judges:``, a Table 1 column). A scorer is named by

- its registry name (``clip``, ``pickscore``, ...; ``METRICS``),
- an import path ``package.module:ClassName`` (the tiny world's oracle: ``tinyworld.scorers:Oracle``),
- a file and a class, ``path/to/file.py:ClassName`` (a plug-in: no change to the package), or
- the URL of a reward server, ``http://127.0.0.1:PORT`` (``sd3_adrpo.reward_server``).

A scorer whose ``__call__`` takes a ``metadata`` argument also gets, per image, the fields of its prompt's row in a
.jsonl/.csv prompt file besides ``prompt`` (a dict; empty for .txt files): see ``call_scorer``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import re
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from sd3_adrpo.reward_spec import is_url, parse_metric_spec  # noqa: F401 - parse_metric_spec: re-exported

METRICS: dict[str, type["Metric"]] = {}

# OpenAI CLIP normalisation, used by the CLIP family and by BLIP/ImageReward/HPSv2 preprocessing.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".json")


def register_metric(name: str) -> Callable[[type], type]:
    def wrap(cls: type) -> type:
        if name in METRICS:
            raise ValueError(f"metric {name!r} is already registered")
        cls.name = name
        METRICS[name] = cls
        return cls

    return wrap


class ScorerUnavailable(RuntimeError):
    """A scorer could not score at all (its reward server is down, timed out or answered garbage): the trainer stops
    with a checkpoint instead of training on a made-up reward."""


class Metric:
    """Base class of every scorer: ``Metric(weights, device, **options)(images_uint8, prompts) -> (B,) float64``.

    What a table or summary shows of it comes from the metric itself: its column ``key`` (default: its registry
    name), ``label`` and ``higher_is_better``, and, where it sorts prompts into categories (a GenEval-style judge),
    ``categories(prompts)``, which adds one breakdown column per category (``<key>_<category>``)."""

    name: str = ""
    key: str = ""
    label: str = ""
    higher_is_better: bool = True

    def __init__(self, weights: Optional[str] = None, device: torch.device | str = "cpu", **options):
        if weights is not None or options:
            raise TypeError(f"{type(self).__name__} takes no weights or options; define __init__(self, weights, "
                            f"device, ...) to accept them")
        self.device = torch.device(device)

    def __call__(self, images, prompts: list[str]) -> np.ndarray:
        raise NotImplementedError

    @property
    def column(self) -> str:
        return self.key or self.name or type(self).__name__

    def categories(self, prompts: list[str]) -> Optional[list[str]]:
        """One category per prompt, for per-category breakdowns; None where the metric has none."""
        return None


def _split_path(name: str) -> tuple[str, str]:
    """``left:Class`` -> (left, Class); the last ':' separates (a Windows drive letter keeps its own)."""
    left, _, attr = name.rpartition(":")
    return left, attr


def _load_file(path: str, spec: str, kind: str):
    """Import a plug-in's .py file as a module of its own (named after its resolved path, so it loads once)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"{kind} {spec!r}: no such file {str(file)!r} (relative paths are from {os.getcwd()}); "
                         f"write it as path/to/file.py:ClassName")
    file = file.resolve()
    module_name = f"sd3_adrpo_plugin_{file.stem}_{hashlib.sha1(str(file).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - any error of the user's file, re-raised saying where
        del sys.modules[module_name]
        where = ""
        tb = e.__traceback__
        while tb is not None:  # the deepest frame inside the plug-in's own file
            if tb.tb_frame.f_code.co_filename == str(file):
                where = f" (line {tb.tb_lineno})"
            tb = tb.tb_next
        if isinstance(e, SyntaxError):
            where = f" (line {e.lineno})"
        raise ValueError(f"{kind} {spec!r}: importing {str(file)!r} failed{where}: {type(e).__name__}: {e}. Fix "
                         "that file (or install what it imports) and run again") from None
    return module


def metric_class(name: str, kind: str = "metric") -> type[Metric]:
    """A registered scorer by name, or any Metric subclass by import path ``package.module:ClassName`` or plug-in
    file ``path/to/file.py:ClassName``. ``kind`` ("metric", "reward", "judge") words the errors."""
    if name in METRICS:
        return METRICS[name]
    if is_url(name):
        from sd3_adrpo.reward_server import RemoteScorer

        return RemoteScorer
    if ":" not in name:
        raise ValueError(f"unknown {kind} {name!r}; available: {', '.join(sorted(METRICS))}, an import path "
                         "package.module:ClassName or a file path/to/file.py:ClassName of a "
                         "sd3_adrpo.metrics.Metric subclass, or a reward server's URL http://HOST:PORT")
    module, attr = _split_path(name)
    if module.endswith(".py"):
        where = repr(module)
        try:
            cls = getattr(_load_file(module, name, kind), attr)
        except AttributeError:
            raise ValueError(f"{kind} {name!r}: {where} defines no {attr!r}; check the class name after ':'") from None
    else:
        where = f"module {module!r}"
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"{kind} {name!r}: cannot import {attr!r} from module {module!r} ({e}); check the "
                             "module is importable (installed, or on PYTHONPATH) and the class name; a file is "
                             "named path/to/file.py:ClassName") from None
    if not (isinstance(cls, type) and issubclass(cls, Metric)):
        raise ValueError(f"{kind} {name!r}: {attr!r} in {where} is not a subclass of sd3_adrpo.metrics.Metric; "
                         "write it as `from sd3_adrpo.metrics import Metric` then `class "
                         f"{attr}(Metric): ...` with __call__(self, images, prompts) returning one score per image")
    return cls


def takes_metadata(scorer) -> bool:
    """Whether ``scorer.__call__`` accepts ``metadata`` (a parameter of that name, or **kwargs)."""
    try:
        params = inspect.signature(scorer.__call__).parameters
    except (TypeError, ValueError):
        return False
    return "metadata" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def call_scorer(scorer, images, prompts: list[str], metadata: Optional[list[dict]] = None) -> np.ndarray:
    """``scorer(images, prompts)``, plus ``metadata=`` (one dict per image) for a scorer that takes it; the scores
    as a float64 array (whatever array type the scorer returned)."""
    if takes_metadata(scorer):
        out = scorer(images, prompts, metadata=metadata if metadata is not None else [{} for _ in prompts])
    else:
        out = scorer(images, prompts)
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu().numpy()
    return np.asarray(out, dtype=np.float64)


def build_metric(name: str, weights: Optional[str] = None, device: torch.device | str = "cpu", kind: str = "metric",
                 **kwargs) -> Metric:
    """Build a scorer by registry name, import path, plug-in file or server URL (see the module's docstring);
    ``weights=None`` takes the scorer's default weights; ``kwargs`` are its options."""
    cls = metric_class(name, kind)
    if is_url(name):
        weights, name = name, name
    metric = cls(device=device, **kwargs) if weights is None else cls(weights, device=device, **kwargs)
    metric.name = metric.name or (cls.__name__ if ":" in name and not is_url(name) else name)  # a path: its class
    return metric


def as_uint8_images(images, prompts: Optional[list[str]] = None) -> np.ndarray:
    """(B, H, W, 3) uint8 numpy from numpy or torch; checks one prompt per image when prompts are given."""
    images = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"metrics take uint8 images of shape (B, H, W, 3), got {images.dtype} {images.shape}")
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"one prompt per image: got {len(images)} images and {len(prompts)} prompts")
    return images


def looks_like_hub_id(weights: str) -> bool:
    return bool(_HUB_ID.match(weights)) and not weights.endswith(_FILE_SUFFIXES) and not os.path.exists(weights)


def resolve_weights(weights: str, metric: str, expects: str, allow_hub: bool = True) -> str:
    """``weights`` itself if it exists locally (or is a hub id and ``allow_hub``), else an error saying what to pass."""
    weights = os.path.expanduser(str(weights))
    if os.path.exists(weights) or (allow_hub and looks_like_hub_id(weights)):
        return weights
    raise FileNotFoundError(f"{metric}: weights {weights!r} not found. Pass {expects}.")


def load_pretrained(loader: Callable[[str], object], weights: str, metric: str, expects: str):
    """Call ``loader(weights)`` (a ``from_pretrained``), turning a hub/cache miss into an error saying what to pass."""
    try:
        return loader(weights)
    except OSError as e:
        raise FileNotFoundError(f"{metric}: could not load {weights!r} ({e.__class__.__name__}: {e}). Pass "
                                f"{expects}; offline (HF_HUB_OFFLINE=1) a hub id must already be in the cache.") from e


def batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


def clip_style_transform(size: int):
    """PIL -> (3, size, size): shortest edge to ``size`` (bicubic), centre crop, to [0, 1], OpenAI mean/std."""
    from torchvision import transforms as T

    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size), T.ToTensor(),
                      T.Normalize(OPENAI_MEAN, OPENAI_STD)])


def pixels(images: np.ndarray, transform) -> torch.Tensor:
    """Apply a PIL transform to each uint8 (H, W, 3) image and stack."""
    from PIL import Image

    return torch.stack([transform(Image.fromarray(im)) for im in images])


class LinearHead(nn.Module):
    """The MLP of the LAION improved aesthetic predictor v2, reused by ImageReward: Linear(d, 1024) - Linear(1024, 128)
    - Linear(128, 64) - Linear(64, 16) - Linear(16, 1) with dropouts at 1, 3, 5 and no activations, so its state-dict
    keys are ``layers.{0,2,4,6,7}.{weight,bias}`` like the original files."""

    def __init__(self, input_size: int = 768):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(input_size, 1024), nn.Dropout(0.2), nn.Linear(1024, 128),
                                    nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16),
                                    nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)


def torch_load(path: str | os.PathLike, metric: str):
    """``torch.load`` on CPU with ``weights_only=True`` (never unpickle arbitrary objects), with a clear error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with what to do
        raise RuntimeError(f"{metric}: could not load {str(path)!r} as plain tensors (weights_only=True): {e}. "
                           f"Re-save it as a state dict of tensors.") from e


def repo_file(weights: str, filename: str, metric: str, expects: str) -> Path:
    """``weights/filename`` for a folder, ``weights`` for a file, or the file downloaded (or cached) from a hub id."""
    weights = resolve_weights(weights, metric, expects)
    if os.path.isdir(weights):
        path = Path(weights) / filename
        if not path.is_file():
            raise FileNotFoundError(f"{metric}: {str(path)!r} not found. Pass {expects}.")
        return path
    if os.path.isfile(weights):
        return Path(weights)
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(weights, filename))
    except Exception as e:  # noqa: BLE001 - hub errors are many classes; re-raised with what to do
        raise FileNotFoundError(f"{metric}: could not fetch {filename!r} from hub repo {weights!r} ({e}). Pass "
                                f"{expects}.") from e
