"""The ``reward`` setting, parsed: which scorers, with which weights and options (no torch, no model: the config's
validation reads it in a fraction of a second). ``sd3_adrpo.rewards`` builds what it names."""

from __future__ import annotations

import math
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional

CLIP_FAMILY = ("clip", "open_clip")  # the scorers whose weights reward_model (and reward_pretrained) give
_URL = re.compile(r"^https?://")


def is_url(name: str) -> bool:
    return bool(_URL.match(str(name)))


def check_url(url: str) -> str:
    """``http://HOST:PORT[/]`` -> ``http://HOST:PORT``, or ValueError saying what to write."""
    parsed = urllib.parse.urlsplit(url)
    try:
        port = parsed.port
    except ValueError as e:
        raise ValueError(f"reward server {url!r}: {e}") from None
    if parsed.scheme != "http" or not parsed.hostname or port is None or parsed.path not in ("", "/") or parsed.query:
        raise ValueError(f"reward server {url!r}: write it as http://HOST:PORT (e.g. http://127.0.0.1:8765), the "
                         "address python -m sd3_adrpo.reward_server prints")
    return f"http://{parsed.netloc}"


def parse_metric_spec(spec: str) -> tuple[str, Optional[str]]:
    """``NAME`` or ``NAME@WEIGHTS`` (as pip writes ``name @ url``) -> (NAME, WEIGHTS or None)."""
    name, _, weights = spec.partition("@")
    return name.strip(), (weights.strip() or None)


@dataclass(frozen=True)
class RewardTerm:
    """One scorer of a reward: ``spec`` (registry name, import path, file.py:Class or server URL), its coefficient
    ``weight`` in the sum, its ``model`` weights (None: the scorer's default) and constructor ``options``."""

    spec: str
    weight: float = 1.0
    model: Optional[str] = None
    options: dict = field(default_factory=dict)
    key: Optional[str] = None  # the name its statistics are logged under (default: the scorer's column)
    model_from: str = ""  # where ``model`` came from: "reward_model", or "" for the entry itself


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: the weight must be a finite number, got {value!r}")
    return float(value)


def _term_from_string(text: str, where: str) -> RewardTerm:
    """``SPEC[@WEIGHTS][=W]`` -> a term (the weight is what follows the last '=')."""
    text, weight = text.strip(), 1.0
    if "=" in text:
        text, _, tail = text.rpartition("=")
        try:
            weight = _number(float(tail), where)
        except ValueError:
            raise ValueError(f"{where}: {text}={tail}: the weight after '=' must be a finite number, e.g. "
                             "clip=1,aesthetic=0.5") from None
    spec, model = _split_spec(text.strip())
    if not spec:
        raise ValueError(f"{where}: an empty scorer name in {text!r}")
    return RewardTerm(spec, weight, model)


def _split_spec(spec: str) -> tuple[str, Optional[str]]:
    """NAME[@WEIGHTS] -> (NAME, WEIGHTS); a server URL is a name of its own."""
    return (spec, None) if is_url(spec) else parse_metric_spec(spec)


def _term_from_entry(spec: Any, entry: Any, where: str) -> RewardTerm:
    """A mapping entry ``SPEC: W`` or ``SPEC: {weight: W, model: WEIGHTS, key: NAME, <option>: value, ...}``."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"{where}: each key of the reward mapping is a scorer name, got {spec!r}")
    name, model = _split_spec(spec.strip())
    if entry is None:
        return RewardTerm(name, 1.0, model)
    if not isinstance(entry, dict):
        return RewardTerm(name, _number(entry, f"{where}: {spec}"), model)
    options = dict(entry)
    weight = _number(options.pop("weight", 1.0), f"{where}: {spec}")
    model = options.pop("model", model)
    key = options.pop("key", None)
    if model is not None and not isinstance(model, str):
        raise ValueError(f"{where}: {spec}: model is the scorer's weights (a hub id, folder or file), got {model!r}")
    return RewardTerm(name, weight, model, options, key)


def parse_reward(value: Any, reward_model: Optional[str] = None,
                 reward_pretrained: Optional[str] = None) -> list[RewardTerm]:
    """The terms of a ``reward`` setting (a string or a mapping; see the module's docstring), with ``reward_model``
    and ``reward_pretrained`` filled in for the clip-family entries that name no weights of their own. Loads and
    imports nothing. Raises ValueError saying what to write."""
    where = "reward"
    if isinstance(value, str):
        parts = [p for p in value.split(",") if p.strip()]
        terms = [_term_from_string(p, where) for p in parts]
    elif isinstance(value, dict):
        terms = [_term_from_entry(k, v, where) for k, v in value.items()]
    else:
        raise ValueError(f"{where} must be a scorer name, NAME=WEIGHT,... or a mapping {{name: weight}}, got "
                         f"{value!r}")
    if not terms:
        raise ValueError(f"{where} names no scorer; e.g. reward: clip")
    specs = [t.spec for t in terms]
    if len(set(specs)) != len(specs) and all(t.key is None for t in terms):
        raise ValueError(f"{where} names a scorer twice ({specs}); name each once, or give each a key:")
    if not any(t.weight for t in terms):
        raise ValueError(f"{where}: every weight is 0, so the reward is constant")
    out = []
    for t in terms:
        model, model_from, options = t.model, "", dict(t.options)
        if model is None and t.spec in CLIP_FAMILY and reward_model is not None:
            model, model_from = reward_model, "reward_model"
        if t.spec == "aesthetic" and reward_model is not None and "clip" not in options:
            options["clip"] = reward_model  # the head scores the reward's CLIP's image embedding (SD3: ViT-L/14)
        if t.spec == "open_clip" and reward_pretrained is not None:
            options.setdefault("pretrained", reward_pretrained)
        out.append(RewardTerm(t.spec, t.weight, model, options, t.key, model_from))
    return out


def judge_term(spec: str) -> RewardTerm:
    """A judge (an evaluation column) named as a reward entry is: ``NAME[@WEIGHTS]``, a server URL, or one entry of a
    reward mapping written as a YAML flow string, ``{aesthetic: {model: head.pth, clip: my_clip}}``, for options."""
    if not isinstance(spec, str):
        raise ValueError(f"judges: each judge is a string, got {spec!r}; write options as '{{NAME: {{...}}}}'")
    text = spec.strip()
    if text.startswith("{"):
        import yaml

        try:
            entry = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"judge {spec!r}: not a YAML mapping ({str(e).splitlines()[0]})") from None
        if not isinstance(entry, dict) or len(entry) != 1:
            raise ValueError(f"judge {spec!r}: write one scorer as {{NAME: {{model: WEIGHTS, <option>: value}}}}")
        (name, options), = entry.items()
        term = _term_from_entry(name, options, "judge")
        return RewardTerm(term.spec, 1.0, term.model, term.options, term.key)
    name, model = _split_spec(text)
    return RewardTerm(name, 1.0, model)

