"""A real S3 HTTP server on loopback (moto's server mode) and a fault-injecting HTTP proxy in front of it."""

from __future__ import annotations

import http.client
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MotoS3:
    """moto's threaded server bound to 127.0.0.1 on a free port."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def options(self, endpoint: str | None = None, **config_kwargs) -> dict:
        """s3fs storage options for this server (or a proxy in front of it)."""
        opts = {
            "key": "testing-key-id",
            "secret": "testing-secret",
            "client_kwargs": {"endpoint_url": endpoint or self.endpoint, "region_name": "eu-west-1"},
        }
        if config_kwargs:
            opts["config_kwargs"] = config_kwargs
        return opts

    def stop(self) -> None:
        self.server.stop()


class FaultProxy:
    """Forwards HTTP to ``upstream_port``, answering 500 for ``fail_ratio`` of requests and stalling
    ``stall_s`` before ``stall_ratio`` of them; ``latency_s`` is added to every request. A request whose path holds
    a key of ``hang`` gets no answer until the proxy stops (a hung endpoint: the connection open, nothing sent), or,
    where the key's value is a byte count, a GET gets its headers and that many bytes of the body first. A GET whose path
    holds one of ``trickle_paths`` gets its body in 64 KiB pieces ``trickle_s`` apart (a slow but live link). A PUT
    whose path holds a key of ``hold`` is read whole, then waits until that key's event is set before it goes upstream
    (a request in flight that the client gave up on and that still lands, late).

    Faults are drawn from a seeded generator, and counted, so a test can check that they happened.
    """

    def __init__(self, upstream_port: int, fail_ratio: float = 0.0, stall_ratio: float = 0.0, stall_s: float = 0.0,
                 latency_s: float = 0.0, seed: int = 0, only_get: bool = False, hang: dict[str, int | None] | None = None,
                 trickle_paths: tuple[str, ...] = (), trickle_s: float = 0.0,
                 hold: dict[str, threading.Event] | None = None):
        self.upstream_port = upstream_port
        self.fail_ratio = fail_ratio
        self.stall_ratio = stall_ratio
        self.stall_s = stall_s
        self.latency_s = latency_s
        self.only_get = only_get
        self.hang = dict(hang or {})
        self.trickle_paths = tuple(trickle_paths)
        self.trickle_s = trickle_s
        self.hold = dict(hold or {})
        self.held: list[str] = []  # paths of the PUTs held
        self.landed_late: list[str] = []  # and of those that went upstream once released
        self.hung = 0
        self._stopped = threading.Event()
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.failed = 0
        self.stalled = 0
        self.requests = 0
        self.seen: list[tuple[str, str]] = []  # (method, path and query) of every request
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                fault = proxy._draw(self.command, self.path)
                gate = next((e for k, e in proxy.hold.items() if k in self.path), None)
                if gate is not None and self.command == "PUT":
                    with proxy.lock:
                        proxy.held.append(self.path)
                    gate.wait()
                hang_after = next((n for k, n in proxy.hang.items() if k in self.path), None)
                if fault == "hang" and hang_after is None:
                    proxy._stopped.wait()
                    return
                if fault == "hang" and self.command != "GET":
                    fault = None  # the HEAD passes; its GET hangs part way
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
                if fault == "fail":
                    payload = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
                               b"<Message>injected fault</Message></Error>")
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(payload)
                    return
                if fault == "stall":
                    time.sleep(proxy.stall_s)
                conn = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                if gate is not None and self.command == "PUT":
                    with proxy.lock:
                        proxy.landed_late.append(self.path)
                try:
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() in ("transfer-encoding", "connection", "content-length", "server", "date"):
                            continue
                        self.send_header(k, v)
                    length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                    self.send_header("Content-Length", length or str(len(data)))
                    self.end_headers()
                    if self.command == "HEAD":
                        pass
                    elif fault == "hang":
                        self.wfile.write(data[:hang_after])
                        self.wfile.flush()
                        proxy._stopped.wait()
                        self.close_connection = True  # the body cut short: the client's read fails, and ends
                        self.connection.shutdown(socket.SHUT_RDWR)
                    elif any(p in self.path for p in proxy.trickle_paths):
                        for at in range(0, len(data), 1 << 16):
                            self.wfile.write(data[at:at + (1 << 16)])
                            self.wfile.flush()
                            time.sleep(proxy.trickle_s)
                    else:
                        self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) while we stalled
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.port = free_port()
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def _draw(self, method: str, path: str = "") -> str | None:
        with self.lock:
            self.requests += 1
            self.seen.append((method, path))
            if any(h in path for h in self.hang):
                self.hung += 1
                return "hang"
            if self.only_get and method not in ("GET", "HEAD"):
                return None
            x = self.rng.random()
            if x < self.fail_ratio:
                self.failed += 1
                return "fail"
            if x < self.fail_ratio + self.stall_ratio:
                self.stalled += 1
                return "stall"
            return None

    def stop(self) -> None:
        self._stopped.set()
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    """Serve moto plus a fault proxy in this process until killed (benchmarks run it as a separate process so the
    server's CPU does not compete with the job being measured). Prints ``READY <moto port> <proxy port>``."""
    import argparse
    import sys

    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--fail-ratio", type=float, default=0.0)
    args = parser.parse_args()
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = MotoS3()
    proxy = FaultProxy(server.port, fail_ratio=args.fail_ratio, latency_s=args.latency_ms / 1000.0)
    print(f"READY {server.port} {proxy.port}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    proxy.stop()
    server.stop()


if __name__ == "__main__":
    main()
