"""A reward server: any scorer (or weighted reward) over HTTP on a local port, and the trainer's client for it.

    python -m sd3_adrpo.reward_server --reward pickscore@yuvalkirstain/PickScore_v1 --port 8765 [--device cuda]
    python train_sd3_adrpo.py --config ... --reward http://127.0.0.1:8765

This is how a reward whose dependencies clash with the trainer's runs: in its own environment, which needs only this
file's package, torch, numpy and the scorer. The protocol is JSON over HTTP/1.1 (documented in docs/rewards.md):

- ``GET /info`` -> ``{"key", "label", "higher_is_better", "reward"}``
- ``POST /score`` with a JSON header line ``{"shape": [B, H, W, 3], "prompts": [B strings], "metadata": [B dicts]}``
  then the B*H*W*3 uint8 bytes (``application/octet-stream``; or all JSON with ``"images"``: base64 of the bytes)
  -> ``{"scores": [B numbers or null]}`` (null: a non-finite score)

The standard library's ``http.server`` serves it (one local client, a few requests a minute: a server framework would
be a dependency of every reward environment for nothing); scoring holds a lock, so the scorer never runs twice at once.
The client (``RemoteScorer``) sends ``batch_size`` images per request, waits ``timeout`` seconds, retries ``retries``
times with a doubling back-off, then raises ``ScorerUnavailable``: the trainer then stops with a checkpoint.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

import numpy as np
import torch

from sd3_adrpo.metrics.base import Metric, ScorerUnavailable, as_uint8_images, batches
from sd3_adrpo.reward_spec import check_url

MAX_BODY = 1 << 30  # bytes of one request the server accepts (1 GiB: 1,300 images of 512 px)


BINARY = "application/octet-stream"


def encode_request(images: np.ndarray, prompts: list[str], metadata: Optional[list[dict]] = None,
                   binary: bool = True) -> bytes:
    """A /score request body: binary (one JSON header line ``{shape, prompts, metadata}``, then the raw uint8 bytes;
    what the client sends) or all JSON with the bytes base64-encoded (simpler for other clients, ~10x slower)."""
    images = np.ascontiguousarray(as_uint8_images(images, prompts))
    header = {"shape": list(images.shape), "prompts": list(prompts), "metadata": metadata or [{} for _ in prompts]}
    if binary:
        return json.dumps(header).encode() + b"\n" + images.tobytes()
    return json.dumps({**header, "images": base64.b64encode(images.tobytes()).decode("ascii")}).encode()


def decode_request(body: bytes, binary: bool = True) -> tuple[np.ndarray, list[str], list[dict]]:
    """The inverse of ``encode_request``; ValueError on anything malformed."""
    try:
        if binary:
            head, _, raw = body.partition(b"\n")
            req = json.loads(head)
        else:
            req = json.loads(body)
            raw = base64.b64decode(req["images"], validate=True)
        shape = [int(x) for x in req["shape"]]
        images = np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()
        prompts, metadata = req["prompts"], req.get("metadata") or [{} for _ in req["prompts"]]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"malformed request ({type(e).__name__}: {e}); send a JSON header line {{shape, prompts, "
                         "metadata}} then the uint8 bytes (application/octet-stream), or JSON with images in "
                         "base64") from None
    if (not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts) or len(prompts) != len(images)
            or not isinstance(metadata, list) or len(metadata) != len(prompts)):
        raise ValueError("malformed request: one prompt string and one metadata dict per image")
    return images, prompts, metadata


def _scores_json(scores: np.ndarray) -> list:
    return [float(s) if math.isfinite(s) else None for s in np.asarray(scores, dtype=np.float64).tolist()]


class _Handler(BaseHTTPRequestHandler):
    server_version = "sd3-adrpo-reward/1"
    protocol_version = "HTTP/1.1"

    def _send(self, code: int, payload: dict) -> None:
        body = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout); it retries or stops
            pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.rstrip("/") in ("/info", ""):
            self._send(200, self.server.info)
        elif self.path.rstrip("/") == "/health":
            self._send(200, {"ok": True})
        else:
            self._send(404, {"error": f"no such path {self.path}; GET /info, POST /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path.rstrip("/") != "/score":
            self._send(404, {"error": f"no such path {self.path}; POST /score"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_BODY:
            self._send(413, {"error": f"a request body of 1 to {MAX_BODY} bytes, got {length}; send smaller batches"})
            return
        body = self.rfile.read(length)
        try:
            binary = (self.headers.get("Content-Type") or "").startswith(BINARY)
            images, prompts, metadata = decode_request(body, binary)
        except ValueError as e:
            self._send(400, {"error": str(e)})
            return
        try:
            with self.server.lock:
                scores = self.server.reward(images, prompts, metadata)
        except Exception as e:  # noqa: BLE001 - the scorer's error goes back to the client, which says it
            self._send(422, {"error": f"the scorer failed: {type(e).__name__}: {e}"})
            return
        self._send(200, {"scores": _scores_json(scores)})

    def log_message(self, fmt, *args) -> None:  # quiet: one line per request only with --verbose
        if self.server.verbose:
            super().log_message(fmt, *args)


def make_server(reward, host: str = "127.0.0.1", port: int = 0, verbose: bool = False) -> ThreadingHTTPServer:
    """An HTTP server for ``reward`` (a ``rewards.WeightedReward``) bound to (host, port); port 0 picks one."""
    server = ThreadingHTTPServer((host, port), _Handler)
    server.daemon_threads = True
    server.reward, server.lock, server.verbose = reward, threading.Lock(), verbose
    single = reward.scorers[0] if len(reward.scorers) == 1 else None
    server.info = {"reward": reward.describe(), "key": reward.keys[0] if single is not None else "reward",
                   "label": (getattr(single, "label", "") or "") if single is not None else "",
                   "higher_is_better": bool(getattr(single, "higher_is_better", True))}
    return server


class RemoteScorer(Metric):
    """A scorer served by ``python -m sd3_adrpo.reward_server`` at ``weights`` (its URL, ``http://HOST:PORT``).

    Sends ``batch_size`` images per request with their prompts and metadata, waits ``timeout`` seconds for each,
    retries a failed request ``retries`` times (waiting ``backoff`` s, then twice that, ...), then raises
    ``ScorerUnavailable``: never a made-up score. Its column is the served scorer's."""

    def __init__(self, weights: str, device: torch.device | str = "cpu", timeout: float = 60.0, retries: int = 2,
                 batch_size: int = 32, backoff: float = 0.5):
        self.url = check_url(weights)
        if not (timeout > 0 and retries >= 0 and batch_size >= 1 and backoff >= 0):
            raise ValueError(f"reward server {self.url}: need timeout > 0, retries >= 0, batch_size >= 1, backoff >= 0")
        self.device, self.timeout, self.retries = torch.device(device), float(timeout), int(retries)
        self.batch_size, self.backoff = int(batch_size), float(backoff)
        info = self._request("GET", "/info")
        if not isinstance(info, dict) or not isinstance(info.get("key"), str):
            raise ScorerUnavailable(f"reward server {self.url}: GET /info answered {str(info)[:200]!r}, not a reward "
                                    "server's info; is another program on that port?")
        self.key, self.label = info["key"], str(info.get("label") or "")
        self.higher_is_better = bool(info.get("higher_is_better", True))
        self.name = self.url

    def _request(self, method: str, path: str, body: Optional[bytes] = None):
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url + path, data=body, method=method,
                                             headers={"Content-Type": BINARY if body else "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                try:
                    return json.loads(raw)
                except (ValueError, UnicodeDecodeError):
                    last = f"answered garbage ({raw[:80]!r})"
            except urllib.error.HTTPError as e:
                detail = e.read()[:500].decode("utf-8", "replace")
                try:
                    detail = json.loads(detail).get("error", detail)
                except (ValueError, AttributeError):
                    pass
                if 400 <= e.code < 500:  # the request or the scorer failed: retrying cannot help
                    raise ScorerUnavailable(f"reward server {self.url}{path} refused the request (HTTP {e.code}): "
                                            f"{detail}") from None
                last = f"answered HTTP {e.code} ({detail})"
            except (urllib.error.URLError, OSError, http.client.HTTPException) as e:  # refused, reset, timed out,
                reason = getattr(e, "reason", e)                                    # or cut off mid-answer
                last = f"did not answer ({type(reason).__name__}: {reason})"
        raise ScorerUnavailable(f"reward server {self.url} {last} after {self.retries + 1} attempt(s) with a "
                                f"{self.timeout:g} s timeout. Is it running? Start it with python -m "
                                "sd3_adrpo.reward_server --reward NAME --port PORT")

    def __call__(self, images, prompts: list[str], metadata: Optional[list[dict]] = None) -> np.ndarray:
        images = as_uint8_images(images, prompts)
        out = []
        for s in batches(len(images), self.batch_size):
            body = encode_request(images[s], prompts[s], metadata[s] if metadata else None)
            answer = self._request("POST", "/score", body)
            scores = answer.get("scores") if isinstance(answer, dict) else None
            n = s.stop - s.start
            if (not isinstance(scores, list) or len(scores) != n
                    or not all(x is None or (isinstance(x, (int, float)) and not isinstance(x, bool)) for x in scores)):
                raise ScorerUnavailable(f"reward server {self.url} answered {str(answer)[:200]!r} for {n} images, "
                                        f"not {{\"scores\": [{n} numbers]}}: check the server's scorer")
            out.append(np.array([np.nan if x is None else float(x) for x in scores], dtype=np.float64))
        return np.concatenate(out) if out else np.zeros(0)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="Serve a reward (any scorer, or a weighted sum) over HTTP for "
                                             "train_sd3_adrpo.py --reward http://HOST:PORT.")
    ap.add_argument("--reward", required=True, help="what train_sd3_adrpo.py's --reward takes: NAME[@WEIGHTS], "
                                                    "NAME=W,..., package.module:Class, path/to/file.py:Class")
    ap.add_argument("--reward_model", default=None, help="weights of a clip / open_clip entry that names none")
    ap.add_argument("--reward_pretrained", default=None, help="open_clip: pretrained tag or weights file")
    ap.add_argument("--options", default=None, help="a single scorer's options as JSON, e.g. '{\"batch_size\": 8}'")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (keep 127.0.0.1: there is no auth)")
    ap.add_argument("--port", type=int, default=8765, help="port (0: any free one, printed at start)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--verbose", action="store_true", help="log every request")
    args = ap.parse_args(argv)
    from sd3_adrpo.rewards import build_reward

    try:
        reward = args.reward
        if reward.strip().startswith("{"):  # a mapping, written as on the trainer's command line (YAML flow)
            import yaml

            reward = yaml.safe_load(reward)
        options = json.loads(args.options) if args.options else {}
        if not isinstance(options, dict):
            raise ValueError("--options must be a JSON object")
        reward = build_reward(reward, args.reward_model, device=args.device, pretrained=args.reward_pretrained,
                              **options)
    except Exception as e:  # noqa: BLE001 - bad input (a spec, YAML, weights): say it, exit 2, no traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    server = make_server(reward, args.host, args.port, args.verbose)
    host, port = server.server_address[:2]
    print(f"serving {reward.describe()} on http://{host}:{port} (POST /score, GET /info); stop with Ctrl-C",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
