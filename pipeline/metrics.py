"""Per-rank counters, the JSON-lines metrics log, optional Prometheus endpoint, and the logging format."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import Counter
from typing import Any

from pipeline.errors import redact_urls


class RankLogFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


_SECRET_ENV = ("SECRET", "TOKEN", "PASSWORD", "ACCESS_KEY", "KEY_ID", "CREDENTIAL")


class RedactSecrets(logging.Filter):
    """Replaces the values of credential-like environment variables, and the credentials of URLs (a signed URL's
    signature and token, ``errors.redact_urls``), in every record with ``***``."""

    def __init__(self) -> None:
        super().__init__()
        self.values = sorted({v for k, v in os.environ.items()
                              if any(w in k.upper() for w in _SECRET_ENV) and len(v) >= 8}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = redact_urls(msg)
        for v in self.values:
            if v in clean:
                clean = clean.replace(v, "***")
        if record.exc_info and not record.exc_text:  # a traceback's messages quote URLs too
            record.exc_text = redact_urls(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact_urls(record.exc_text)
        if clean != msg:
            record.msg, record.args = clean, None
        return True


def setup_logging(rank: int, level: int | str = logging.INFO) -> None:
    """Log through ``logging`` with the rank in every line, credentials scrubbed (``level``: a number or a name such
    as ``"debug"``; an unknown name means INFO)."""
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    root = logging.getLogger()
    handler = logging.StreamHandler()
    handler.addFilter(RankLogFilter(rank))
    handler.addFilter(RedactSecrets())
    # The HTTP stacks' debug logs print request headers (signed credentials): never below WARNING here.
    for name in ("botocore", "aiobotocore", "s3fs", "urllib3", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(asctime)s [rank %(rank)s] %(levelname)s %(name)s: %(message)s"))
    root.handlers[:] = [handler]
    root.setLevel(level)


class RankStats:
    """Thread-safe counters of one rank's run."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started = time.time()
        self.done = 0
        self.succeeded = 0
        self.failures: Counter[str] = Counter()
        self.tiers: Counter[str] = Counter()
        self.bytes_fetched = 0
        self.damaged = 0  # items that succeeded with damage (``result_info.corrupt_spans`` and the counts)
        self.last_progress = time.monotonic()

    def record(self, ok: bool, error_type: str | None, tier: str | None, nbytes: int | None,
               damaged: bool = False) -> None:
        with self._lock:
            self.done += 1
            if ok:
                self.succeeded += 1
                self.damaged += damaged
            else:
                self.failures[error_type or "Unknown"] += 1
            if tier:
                self.tiers[tier] += 1
            if nbytes and tier and tier != "cache":
                self.bytes_fetched += nbytes
            self.last_progress = time.monotonic()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            elapsed = max(1e-9, time.time() - self.started)
            import resource

            return {
                "rss_mb": rss_mb(),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "done": self.done,
                "succeeded": self.succeeded,
                "damaged_items": self.damaged,
                "failed": sum(self.failures.values()),
                "failures_by_type": dict(self.failures),
                "tier_hits": dict(self.tiers),
                "bytes_fetched": self.bytes_fetched,
                "elapsed_s": round(elapsed, 3),
                "items_per_s": round(self.done / elapsed, 3),
            }


def rss_mb() -> float | None:
    """This process's resident memory now, in MB (Linux; None elsewhere): with ``done`` beside it in the metrics, a
    week's growth per item shows, where the peak only says the worst moment."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)
    except (OSError, ValueError, IndexError):
        return None


class MetricsLog:
    """Appends one JSON line per interval to a local per-rank file."""

    def __init__(self, path: str, rank: int, interval_s: float):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.rank = rank
        self.interval_s = interval_s
        self._last = 0.0
        self._f = open(path, "a", buffering=1)

    def maybe_write(self, fields: dict[str, Any], force: bool = False) -> None:
        now = time.time()
        if force or now - self._last >= self.interval_s:
            self._last = now
            self._f.write(json.dumps({"time": round(now, 3), "rank": self.rank, **fields}) + "\n")

    def close(self) -> None:
        self._f.close()


class PrometheusExporter:
    """Serves the rank's counters on ``port`` (prometheus_client), refreshed from snapshots."""

    def __init__(self, port: int, rank: int):
        from prometheus_client import CollectorRegistry, Gauge, start_http_server

        self.registry = CollectorRegistry()
        labels = ["rank"]
        self.rank = str(rank)
        self.items = Gauge("mediasieve_items_processed", "Items finished", labels, registry=self.registry)
        self.failed = Gauge("mediasieve_items_failed", "Items failed by error type", labels + ["error_type"],
                            registry=self.registry)
        self.queue = Gauge("mediasieve_queue_depth", "Items waiting in the task queue", labels, registry=self.registry)
        self.tiers = Gauge("mediasieve_tier_hits", "Items served per storage tier", labels + ["tier"],
                           registry=self.registry)
        self.pool_wait = Gauge("mediasieve_model_pool_wait_seconds", "Total model-pool wait", labels,
                               registry=self.registry)
        self.bytes = Gauge("mediasieve_bytes_fetched", "Bytes fetched from tiers", labels, registry=self.registry)
        self.cache = Gauge("mediasieve_cache_bytes", "Bytes this rank holds in the node cache", labels,
                           registry=self.registry)
        self.suspects = Gauge("mediasieve_crash_suspects", "Items in flight in an earlier death: rehearsed, refused",
                              labels + ["outcome"], registry=self.registry)
        self.batch_limit = Gauge("mediasieve_batch_limit", "Rows per model batch now (below the configured batch size "
                                 "after running out of memory)", labels + ["model"], registry=self.registry)
        self.oom_splits = Gauge("mediasieve_oom_splits", "Model batches split after running out of memory",
                                labels + ["model"], registry=self.registry)
        self.fetches_hung = Gauge("mediasieve_fetches_hung", "Fetches given up as silent whose threads are still stuck",
                                  labels, registry=self.registry)
        self.decodes_stuck = Gauge("mediasieve_decodes_past_deadline", "Decodes given up at video.decode_timeout_s "
                                   "whose threads are still in a native call", labels, registry=self.registry)
        self.corrupt = Gauge("mediasieve_corrupt_media", "Video frames and audio packets lost in corrupt stretches "
                             "decoded past (held frames, silence)", labels + ["kind"], registry=self.registry)
        self.damaged = Gauge("mediasieve_items_damaged", "Items that succeeded with damage (corrupt stretches or cut "
                             "short: result_info.corrupt_spans)", labels, registry=self.registry)
        self.tier_skipped = Gauge("mediasieve_tier_skipped", "1 while a storage tier is skipped (a fetch from it "
                                  "went silent)", labels + ["tier"], registry=self.registry)
        self.rss = Gauge("mediasieve_resident_bytes", "The rank's resident memory now (with items_processed: its growth "
                         "per item)", labels, registry=self.registry)
        self.cache_discarded = Gauge("mediasieve_cache_discarded", "Node-cache copies that lost bytes in a crash, "
                                     "fetched again", labels, registry=self.registry)
        self._tiers_seen_skipped: set[str] = set()
        self.server, self.thread = start_http_server(port, registry=self.registry)

    def update(self, snap: dict[str, Any]) -> None:
        self.items.labels(self.rank).set(snap["done"])
        for k, v in snap["failures_by_type"].items():
            self.failed.labels(self.rank, k).set(v)
        for k, v in snap["tier_hits"].items():
            self.tiers.labels(self.rank, k).set(v)
        self.queue.labels(self.rank).set(snap.get("queue_depth", 0))
        self.pool_wait.labels(self.rank).set(snap.get("pool_wait_s", 0.0))
        self.bytes.labels(self.rank).set(snap["bytes_fetched"])
        self.cache.labels(self.rank).set(snap.get("cache_bytes", 0))
        self.suspects.labels(self.rank, "rehearsed").set(snap.get("suspects_rehearsed", 0))
        self.suspects.labels(self.rank, "refused").set(snap.get("suspects_refused", 0))
        for model, b in snap.get("batches", {}).items():
            self.batch_limit.labels(self.rank, model).set(b["batch_limit"])
            self.oom_splits.labels(self.rank, model).set(b["oom_splits"])
        self.fetches_hung.labels(self.rank).set(snap.get("fetches_hung", 0))
        self.decodes_stuck.labels(self.rank).set(snap.get("decodes_past_deadline", 0))
        for kind, n in snap.get("corrupt_media", {}).items():
            self.corrupt.labels(self.rank, kind).set(n)
        self.damaged.labels(self.rank).set(snap.get("damaged_items", 0))
        if snap.get("rss_mb") is not None:
            self.rss.labels(self.rank).set(snap["rss_mb"] * 1e6)
        self.cache_discarded.labels(self.rank).set(snap.get("cache_discarded", 0))
        skipped = set(snap.get("tiers_skipped", ()))
        self._tiers_seen_skipped |= skipped
        for tier in self._tiers_seen_skipped:
            self.tier_skipped.labels(self.rank, tier).set(1 if tier in skipped else 0)

    def close(self) -> None:
        self.server.shutdown()
