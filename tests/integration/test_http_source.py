"""Manifest paths that are http(s) URLs (a CDN, a web crawl), fetched through fsspec's HTTP filesystem from a real
HTTP server on loopback: status codes typed as the object store's are, and bodies without a Content-Length."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pipeline.config import StorageConfig
from pipeline.errors import AccessDeniedError, FetchError, NotFoundError, TransientFetchError
from pipeline.storage import TieredFetcher

BODY = bytes(range(256)) * 400  # 100 kB


class _Handler(BaseHTTPRequestHandler):
    hits: dict[str, int] = {}
    media: str = ""  # a directory served under /media/

    def log_message(self, *args):  # keep the test output clean
        pass

    def _status(self):
        path = self.path.split("?")[0]
        n = self.hits[path] = self.hits.get(path, 0) + 1
        if path.startswith("/status/"):
            return int(path.rsplit("/", 1)[1])
        if path == "/flaky.bin" and n <= 2:
            return 503
        if path.startswith("/media/"):
            return 200 if os.path.isfile(os.path.join(self.media, path[7:])) else 404
        known = ("/plain.bin", "/chunked.bin", "/flaky.bin", "/endless.bin", "/short.bin", "/pause.bin")
        return 200 if path in known else 404

    def do_HEAD(self):
        self._reply(head=True)

    def do_GET(self):
        self._reply(head=False)

    def _reply(self, head: bool):
        status = self._status()
        if status != 200:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if self.path.startswith("/media/"):
            body = open(os.path.join(self.media, self.path.split("?")[0][7:]), "rb").read()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)
            return
        if self.path == "/pause.bin":  # the server goes silent for 2 s half way through
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            if not head:
                self.wfile.write(BODY[: len(BODY) // 2])
                self.wfile.flush()
                time.sleep(2.0)
                try:
                    self.wfile.write(BODY[len(BODY) // 2:])
                except OSError:  # the client gave up
                    pass
            return
        if self.path == "/short.bin":  # the connection drops half way through the announced body
            self.send_header("Content-Length", str(len(BODY)))
            self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                self.wfile.write(BODY[: len(BODY) // 2])
            self.close_connection = True
            return
        if self.path in ("/chunked.bin", "/endless.bin"):  # a dynamic endpoint: no length, chunked
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            if head:
                return
            chunks = [BODY[i:i + 8192] for i in range(0, len(BODY), 8192)]
            if self.path == "/endless.bin":
                chunks = chunks * 50  # 5 MB, over the test's item cap
            try:
                for c in chunks:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(c), c))
                self.wfile.write(b"0\r\n\r\n")
            except OSError:  # the client stopped reading (the item cap): not the server's error to print
                self.close_connection = True
            return
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        if not head:
            self.wfile.write(BODY)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return  # a client that dropped its connection (a retry, the item cap): not the server's error to print
        super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server():
    httpd = _QuietServer(("127.0.0.1", 0), _Handler)
    httpd.protocol_version = "HTTP/1.1"
    _Handler.protocol_version = "HTTP/1.1"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def _fetcher(tmp_path, **kw):
    return TieredFetcher(StorageConfig(cache_dir=str(tmp_path / "cache"), tiers=(), backoff_base_s=0.01,
                                       backoff_max_s=0.02, **kw))


@pytest.mark.parametrize("name", ["plain.bin", "chunked.bin"])
def test_a_body_with_or_without_its_length_is_fetched_whole(tmp_path, server, name):
    got = _fetcher(tmp_path).fetch(f"{server}/{name}")
    assert open(got.local_path, "rb").read() == BODY and got.bytes == len(BODY) and got.attempts == 1


def test_server_errors_are_retried_and_client_errors_are_not(tmp_path, server):
    f = _fetcher(tmp_path)
    assert f.fetch(f"{server}/flaky.bin").attempts == 3  # two 503s ridden out
    for status, error in ((404, NotFoundError), (410, NotFoundError), (403, AccessDeniedError),
                          (401, AccessDeniedError), (400, FetchError)):
        before = f.retries_done
        with pytest.raises(error) as e:
            f.fetch(f"{server}/status/{status}")
        assert type(e.value) is error and f.retries_done == before, status  # permanent: asked once
    with pytest.raises(TransientFetchError):
        f.fetch(f"{server}/status/502")
    assert _Handler.hits["/status/502"] >= 1 + 4


def test_a_body_over_the_cap_stops_and_leaves_nothing(tmp_path, server):
    f = _fetcher(tmp_path, max_item_bytes=1_000_000)
    with pytest.raises(FetchError, match=r"sent more than storage.max_item_bytes"):
        f.fetch(f"{server}/endless.bin")  # no length: stopped while it streams
    with pytest.raises(FetchError, match=r"is 102400 bytes, over storage.max_item_bytes"):
        _fetcher(tmp_path, max_item_bytes=50_000).fetch(f"{server}/plain.bin")  # announced: stopped at once
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]  # nothing half-written left behind


def test_a_body_cut_short_is_transient(tmp_path, server):
    f = _fetcher(tmp_path)
    with pytest.raises(TransientFetchError):
        f.fetch(f"{server}/short.bin")
    assert f.retries_done == 4 and not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


SIGNED = "X-Amz-Security-Token=SESSIONSECRET&X-Amz-Signature=SIGSECRET"


def test_a_job_over_http_urls(tmp_path, server, media_dir):
    """The manifest names media by URL; rows come out as for any tier, and a dead link is a NotFoundError row."""
    import pyarrow.parquet as pq

    from pipeline.config import build_config, validate_config
    from pipeline.distributed import DistContext
    from pipeline.runner import run_rank
    from tests.conftest import base_config, write_manifest

    _Handler.media = media_dir
    rows = [{"video_id": "clip", "video_path": f"{server}/media/motion.mp4"},
            {"video_id": "talk", "video_path": f"{server}/media/speech.wav?sig=abc"},
            {"video_id": "dead", "video_path": f"{server}/media/gone.mp4?{SIGNED}"}]
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path), str(tmp_path / "out"), str(tmp_path / "cache"))
    cfg = build_config(raw)
    validate_config(cfg)
    run_rank(cfg, DistContext())
    got = {r["video_id"]: r for r in pq.read_table(tmp_path / "out" / "parts").to_pylist()}
    assert got["clip"]["result_info"]["succeed"] and got["clip"]["probe"]["video"]["width"] == 320
    assert got["clip"]["result_info"]["storage_tier"] == "http"
    assert got["talk"]["result_info"]["succeed"] and got["talk"]["probe"]["audio"]["sample_rate"] == 16000
    assert got["dead"]["result_info"]["error_type"] == "NotFoundError"
    # a signed link's credentials stay out of the error message (the row's, failures.jsonl's): the message quoted
    # the URL whole, session token and signature included; the path column is the manifest's own, as given
    said = got["dead"]["result_info"]["error_message"]
    assert "gone.mp4?X-Amz-Security-Token=***&X-Amz-Signature=***" in said and "SECRET" not in said
    assert got["dead"]["video_path"].endswith(SIGNED)
    (failure,) = [json.loads(line) for line in open(tmp_path / "out" / "failures.jsonl")]
    assert failure["video_id"] == "dead" and "SECRET" not in failure["error_message"]


def test_silence_fails_an_attempt_but_a_long_download_does_not(tmp_path, server):
    """aiohttp's default limit of 5 minutes on a whole request failed every large file on a slow link; the limit
    is now on silence (``storage.http_read_timeout_s``)."""
    with pytest.raises(TransientFetchError):
        _fetcher(tmp_path, http_read_timeout_s=0.5, retries=0).fetch(f"{server}/pause.bin")
    got = _fetcher(tmp_path, http_read_timeout_s=10).fetch(f"{server}/pause.bin")
    assert open(got.local_path, "rb").read() == BODY
    fetcher = _fetcher(tmp_path)
    timeout = fetcher._filesystem(f"{server}/plain.bin", {})[0].client_kwargs["timeout"]
    assert timeout.total is None and timeout.sock_read == 60.0
    own = fetcher._filesystem(f"{server}/plain.bin", {"client_kwargs": {"timeout": None}})[0]
    assert own.client_kwargs["timeout"] is None  # options that set their own are left alone


def test_a_model_over_http_is_copied_once_and_again_when_it_changes(tmp_path, server, monkeypatch):
    """An http(s) model URL is a file (its listing is the response's size), copied once per node, and copied again
    when the weights served there change."""
    from pipeline.model_pool import localize_model

    served = tmp_path / "served"
    served.mkdir()
    monkeypatch.setattr(_Handler, "media", str(served))
    (served / "w.onnx").write_bytes(b"a" * 5000)
    url, cache = f"{server}/media/w.onnx", str(tmp_path / "models")
    first = localize_model(url, cache, 0, lambda: None)
    assert open(first, "rb").read() == b"a" * 5000
    assert localize_model(url, cache, 0, lambda: None) == first
    (served / "w.onnx").write_bytes(b"b" * 6000)
    second = localize_model(url, cache, 0, lambda: None)
    assert second != first and open(second, "rb").read() == b"b" * 6000
    # this server sends no ETag or Last-Modified: weights of the same size are new weights all the same
    (served / "w.onnx").write_bytes(b"c" * 6000)
    assert open(localize_model(url, cache, 0, lambda: None), "rb").read() == b"c" * 6000

    from pipeline.weights import ModelSource, weigh_models

    source = {"m": ModelSource(url)}
    _, known = weigh_models(source, {}, cache)
    (served / "w.onnx").write_bytes(b"d" * 6000)
    now, _ = weigh_models(source, known, cache)  # nothing in the listing changed: read again all the same
    assert now == {"m": "sha256:" + hashlib.sha256(b"d" * 6000).hexdigest()}


def test_a_model_that_cannot_be_read_is_a_config_error_naming_it(tmp_path, server):
    """A model whose body is cut short is a ConfigError (a MediasieveError: the job's other ranks raise it too, not
    wait in a collective for rank 0), naming the model and the cause; nothing is left in the node's model cache."""
    from pipeline.errors import ConfigError
    from pipeline.weights import ModelSource, weigh_models

    cache = tmp_path / "models"
    with pytest.raises(ConfigError, match=rf"model {server}/short.bin \(regions.model_uri\) could not be read to "
                                          r"record its weights \(\w+"):
        weigh_models({"regions.model_uri": ModelSource(f"{server}/short.bin")}, {}, str(cache))
    assert not cache.exists() or os.listdir(cache) == []  # not even the partial copy
