"""The reward server's protocol and the client's batching, timeout, bounded retries and refusal of garbage, against
servers in this process (the end-to-end test with a server process killed mid-run is in test_reward_training.py)."""

import threading
import time
import urllib.error
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from sd3_adrpo.metrics import Metric, ScorerUnavailable, build_metric
from sd3_adrpo.reward_server import RemoteScorer, make_server
from sd3_adrpo.reward_spec import RewardTerm, check_url
from sd3_adrpo.rewards import WeightedReward


class _Counting(Metric):
    """Mean pixel value per image, plus the metadata's "bonus"; NaN for prompt "nan"; counts its calls."""

    key, label = "brightness", "Brightness"

    def __init__(self):
        self.calls = []

    def __call__(self, images, prompts, metadata):
        self.calls.append(len(prompts))
        if "boom" in prompts:
            raise ValueError("cannot score 'boom'")
        out = np.asarray(images, float).mean(axis=(1, 2, 3)) + [m.get("bonus", 0) for m in metadata]
        return np.where([p == "nan" for p in prompts], np.nan, out)


@contextmanager
def _serving(server):
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 8, 6, 3), dtype=np.uint8)


def test_scores_round_trip_in_batches_with_metadata_and_nan():
    scorer = _Counting()
    with _serving(make_server(WeightedReward([RewardTerm("x")], [scorer]))) as url:
        remote = build_metric(url, timeout=5, batch_size=3)
        assert isinstance(remote, RemoteScorer) and remote.column == "brightness" and remote.label == "Brightness"
        images, prompts = _images(7), ["a", "b", "nan", "d", "e", "f", "g"]
        metadata = [{"bonus": i} for i in range(7)]
        got = remote(images, prompts, metadata=metadata)
    expected = images.astype(float).mean(axis=(1, 2, 3)) + np.arange(7)
    assert scorer.calls == [3, 3, 1]  # batch_size images per request
    assert np.isnan(got[2]) and np.allclose(np.delete(got, 2), np.delete(expected, 2))


def test_the_all_json_form_for_other_clients_gives_the_same_scores():
    import json
    import urllib.request

    from sd3_adrpo.reward_server import encode_request

    scorer = _Counting()
    with _serving(make_server(WeightedReward([RewardTerm("x")], [scorer]))) as url:
        images = _images(2)
        body = encode_request(images, ["a", "b"], [{"bonus": 1}, {}], binary=False)
        request = urllib.request.Request(url + "/score", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=5) as response:
            got = json.loads(response.read())["scores"]
        assert np.allclose(got, RemoteScorer(url)(images, ["a", "b"], metadata=[{"bonus": 1}, {}]))
        bad = urllib.request.Request(url + "/score", data=b'{"shape": [1, 2]}', headers={"Content-Type": "x"})
        with pytest.raises(urllib.error.HTTPError, match="400"):
            urllib.request.urlopen(bad, timeout=5)


class _Scripted(BaseHTTPRequestHandler):
    """Answers /info properly and /score as the test scripts it; counts /score requests."""

    protocol_version = "HTTP/1.1"

    def _send(self, code, body: bytes):
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def do_GET(self):
        self._send(200, b'{"key": "scripted", "label": "", "higher_is_better": true}')

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts += 1
        code, body, delay = self.server.answer
        time.sleep(delay)
        self._send(code, body)

    def log_message(self, *args):
        pass


def _scripted(code, body, delay=0.0):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Scripted)
    server.daemon_threads, server.posts, server.answer = True, 0, (code, body, delay)
    return server


@pytest.mark.parametrize("code, body, delay, says, posts", [
    (200, b"<html>not json</html>", 0.0, "answered garbage .* after 3 attempt", 3),
    (500, b'{"error": "out of memory"}', 0.0, "answered HTTP 500 \\(out of memory\\) after 3 attempt", 3),
    (200, b'{"scores": [1.0]}', 0.0, "answered .* for 2 images, not", 1),
    (200, b'{"scores": ["a", "b"]}', 0.0, "for 2 images, not", 1),
    (200, b'{"scores": [1.0, 2.0]}', 1.0, "did not answer .*timed out.* after 3 attempt", 3),
])
def test_garbage_errors_and_timeouts_are_retried_a_bounded_number_of_times_then_raised(code, body, delay, says,
                                                                                      posts):
    server = _scripted(code, body, delay)
    with _serving(server) as url:
        remote = RemoteScorer(url, timeout=0.3, retries=2, backoff=0.01)
        t0 = time.perf_counter()
        with pytest.raises(ScorerUnavailable, match=says):
            remote(_images(2), ["a", "b"])
        assert server.posts == posts and time.perf_counter() - t0 < 10


class _CutOff(_Scripted):
    """Answers /score with a longer Content-Length than it sends, then hangs up: a server killed mid-answer."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.posts += 1
        body = self.server.answer[1]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body) + 93))
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True


def test_an_answer_cut_off_mid_way_is_retried_then_reported_as_a_server_that_did_not_answer():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CutOff)
    server.daemon_threads, server.posts, server.answer = True, 0, (200, b'{"scores": [1.0, 2.0]}', 0.0)
    with _serving(server) as url:
        remote = RemoteScorer(url, timeout=5, retries=2, backoff=0.01)
        with pytest.raises(ScorerUnavailable, match="did not answer \\(IncompleteRead.* after 3 attempt"):
            remote(_images(2), ["a", "b"])
        assert server.posts == 3


def test_a_scorer_error_is_reported_not_retried_and_a_down_server_is_named():
    scorer = _Counting()
    with _serving(make_server(WeightedReward([RewardTerm("x")], [scorer]))) as url:
        remote = RemoteScorer(url, retries=3, backoff=0.01)
        with pytest.raises(ScorerUnavailable, match="refused the request \\(HTTP 422\\): the scorer failed: "
                                                    "ValueError: cannot score 'boom'"):
            remote(_images(2), ["a", "boom"])
    assert scorer.calls == [2]  # once: a 4xx is not retried
    with pytest.raises(ScorerUnavailable, match=f"reward server {url} did not answer .* after 2 attempt.*Is it "
                                                "running\\? Start it with python -m sd3_adrpo.reward_server"):
        RemoteScorer(url, timeout=1, retries=1, backoff=0.01)  # the server above is gone


def test_urls_are_checked():
    assert check_url("http://127.0.0.1:8765/") == "http://127.0.0.1:8765"
    for bad in ["http://127.0.0.1", "https://127.0.0.1:8765", "http://127.0.0.1:8765/score", "http://:80"]:
        with pytest.raises(ValueError, match="write it as http://HOST:PORT"):
            check_url(bad)
