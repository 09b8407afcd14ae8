"""One rank of the job, from a config: the function ``jobs/run.py`` calls and the unit tests call directly.

Data flow: pending items -> work units pulled from a shared counter -> producer threads fetch through the tiers
-> bounded queue -> consumer threads decode once and run the filters -> one row per item -> ResultWriter.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.compaction import compact, finish_pending, remove_duplicate_successes
from pipeline.config import InputConfig, JobConfig, job_identity, to_dict
from pipeline.crashes import InflightJournal, Rehearser, SuspectGate, collect_suspects, job_key, update_ledger
from pipeline.distributed import (
    DistContext,
    GlobalCounter,
    StopFlag,
    WorkUnitCounter,
    init_distributed,
    ranks_by_value,
    ranks_shown,
    resolve_device,
)
from pipeline.errors import (
    ConfigError,
    CrashError,
    FetchTimeout,
    ItemError,
    ItemTimeout,
    ManifestError,
    MediasieveError,
    OutputHungError,
    OutputLockedError,
    ShutdownError,
    StorageHungError,
    is_retryable,
    redact_urls,
)
from pipeline.filters import FilterContext, SetupContext, batch_stats, build_filters, frame_requests_of
from pipeline.manifest import (
    SPILL_DIR,
    Manifest,
    build_spill,
    check_input_exists,
    nodes_disagree,
    remove_spill,
    snapshot_listing,
    spill_read,
)
from pipeline.media import damage
from pipeline.media.item import MediaItem
from pipeline.metrics import MetricsLog, PrometheusExporter, RankStats
from pipeline.model_pool import ModelPool, localize_model
from pipeline.quarantine import quarantined, read_past_damaged
from pipeline.resume import (
    FAILURES,
    SUCCESS_MARKER,
    SUMMARY,
    CommittedState,
    OutputLease,
    check_or_record_config,
    failed_for_good,
    latest_failures,
    part_files,
    pending_indices,
    rank_settings,
    ranks_disagree,
    read_committed,
    read_pending,
    recorded_config,
    share_pending,
    writer_schema,
)
from pipeline.software import distinct_software, software_versions, warn_if_mixed
from pipeline.storage import SCRATCH_DIR, FetchedItem, TieredFetcher, check_protocols
from pipeline.task_queue import BoundedTaskQueue
from pipeline.video.decoders import decodes_past_deadline
from pipeline.weights import check_copy, weigh_models
from pipeline.writer import ResultWriter, bounded, case_clashes, commit_bytes, is_local_fs, result_schema

log = logging.getLogger(__name__)

TAKEOVER_POLL_S = 2.0
"""How often a rank that does not hold the lease looks at the takeover flag in torchrun's store."""


@dataclass
class RankOutcome:
    """What one rank did; ``summary`` is set on rank 0 when the run finished."""

    run_id: str
    rank: int
    stats: dict[str, Any]
    interrupted: bool
    summary: dict[str, Any] | None = None
    output_dir: str = ""


def _now(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc)


class UnitSource:
    """Thread-safe stream of pending manifest rows, pulled unit by unit from the shared counter."""

    def __init__(self, manifest: Manifest, pending: pa.Array, unit_size: int, counter: WorkUnitCounter):
        self.manifest = manifest
        self.pending = pending
        self.unit_size = unit_size
        self.counter = counter
        self._lock = threading.Lock()
        self._buffer: list[dict[str, Any]] = []
        self.units_taken = 0
        self.exhausted = False

    def next_row(self) -> dict[str, Any] | None:
        with self._lock:
            while not self._buffer:
                if self.exhausted:
                    return None
                unit = self.counter.next_unit()
                if unit is None:
                    self.exhausted = True
                    return None
                idx = self.pending.slice(unit * self.unit_size, self.unit_size)
                self._buffer = self.manifest.rows(idx)
                self._buffer.reverse()
                self.units_taken += 1
            return self._buffer.pop()


@dataclass
class _Task:
    row: dict[str, Any]
    fetched: FetchedItem
    start: float
    fetch_s: float


@dataclass
class _InFlight:
    """An item in a consumer's filters, as the watchdog sees it."""

    task: _Task
    media: MediaItem
    since: float  # time.monotonic() when its filters began
    thread: int  # the consumer's threading.get_ident()
    filter: str = ""


@dataclass
class RankWorkers:
    """Producer and consumer threads of one rank, supervised by the calling thread."""

    cfg: JobConfig
    source: UnitSource
    fetcher: TieredFetcher
    filters: list
    filter_ctx: FilterContext
    writer: ResultWriter
    stats: RankStats
    run_id: str
    rank: int
    host: str
    device: str
    pool: ModelPool
    global_done: GlobalCounter
    global_total: int
    metrics: MetricsLog | None = None
    exporter: PrometheusExporter | None = None
    journal: InflightJournal | None = None
    suspects: dict[str, int] = field(default_factory=dict)
    """Items in flight when processes of earlier runs died, with how many deaths (``pipeline.crashes``)."""
    lease: OutputLease | None = None
    """The output lease, on the rank that holds it: another run taking it over stops this one."""
    takeover: StopFlag = field(default_factory=StopFlag)
    """Raised by the lease's rank when another run took the output over; every rank polls it and stops."""
    stop: threading.Event = field(default_factory=threading.Event)
    interrupted: bool = False
    lease_lost: bool = False

    def __post_init__(self) -> None:
        rt = self.cfg.runtime
        self.queue = BoundedTaskQueue(rt.queue_depth, rt.stall_timeout_s, self._busy_until)
        self.id_col = self.cfg.input.id_column
        self.path_col = self.cfg.input.path_column
        self._fatal: list[BaseException] = []
        self.frame_requests = frame_requests_of(self.filters)
        self.backends = []
        if self.frame_requests:
            from pipeline.video.decoders import available_backends, backend_order

            nvdec = self.cfg.video.decode_device == "cuda" and self.device.startswith("cuda")
            self.backends = available_backends(backend_order(self.cfg.video.backends, nvdec))
        self._producers_left = rt.producers
        self._plock = threading.Lock()
        self._inflight: dict[int, _InFlight] = {}  # by id(task); whoever removes an entry writes its row
        self._ilock = threading.Lock()
        self._replaced = 0  # consumers started in place of stuck ones (their thread names)
        self._gate = SuspectGate()
        self._rehearsed = 0  # suspects rehearsed in the child process
        self._damage_before = damage.counts()  # this run's corrupt stretches are the counts' growth from here
        self._refused = 0  # suspects given a CrashError row
        self._rehearser = Rehearser(list(self.cfg.filters), self.cfg.video, [b.name for b in self.backends])

    # ---- rows ---------------------------------------------------------------------------------------
    def _row(self, row: dict[str, Any], start: float, fetch_s: float, fetched: FetchedItem | None,
             results: dict[str, Any], filter_s: dict[str, float], error: BaseException | None,
             media: MediaItem | None) -> dict[str, Any]:
        end = time.time()
        out = dict(row)
        for f in self.filters:
            out[f.name] = results.get(f.name)
        out["result_info"] = {
            "succeed": error is None,
            "error_type": None if error is None else type(error).__name__,
            "error_message": None if error is None else redact_urls(str(error))[:2000],
            "retryable": None if error is None else is_retryable(error),
            "start_time": _now(start),
            "end_time": _now(end),
            "cost_s": end - start,
            "fetch_s": fetch_s,
            "filter_s": filter_s,
            "storage_tier": fetched.tier if fetched else None,
            "bytes": fetched.bytes if fetched else None,
            "fetch_attempts": fetched.attempts if fetched else None,
            "decode_backend": media.decode_backend if media else None,
            "frames_decoded": media.frames_decoded if media else None,
            "video_frames_lost": media.damage.video_frames_lost if media and media.frames_decoded is not None else None,
            "audio_packets_lost": media.damage.audio_packets_lost if media else None,
            "corrupt_spans": media.damage.spans if media and (
                media.frames_decoded is not None or media.damage.audio_packets_lost is not None) else None,
            "rank": self.rank,
            "host": self.host,
            "device": self.device,
            "run_id": self.run_id,
        }
        return out

    def _emit(self, row: dict[str, Any]) -> None:
        self.writer.add(row)
        info = row["result_info"]
        self.stats.record(info["succeed"], info["error_type"], info["storage_tier"], info["bytes"],
                          damage.row_damaged(info))

    # ---- threads ------------------------------------------------------------------------------------
    def _guard(self, fn) -> None:
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - a dead worker is a system failure: stop the rank loudly
            log.exception("worker thread %s failed", threading.current_thread().name)
            self._fatal.append(e)
            self.stop.set()

    def _produce(self) -> None:
        try:
            while not self.stop.is_set():
                row = self.source.next_row()
                if row is None:
                    return
                start = time.time()
                t0 = time.perf_counter()
                try:
                    fetched = self._fetch(row[self.path_col] or "")
                except ItemError as e:
                    self._emit(self._row(row, start, time.perf_counter() - t0, None, {}, {}, e, None))
                    if isinstance(e, FetchTimeout):
                        self._check_storage_alive(e)
                    continue
                task = _Task(row, fetched, start, time.perf_counter() - t0)
                if not self.queue.put(task, self.stop):
                    fetched.release()
                    return
        finally:
            with self._plock:
                self._producers_left -= 1

    def _fetch(self, path: str) -> FetchedItem:
        storage = self.cfg.storage
        if not storage.fetch:
            return FetchedItem("", "none", 0, path, 0)
        if storage.fetch_silence_s is None:
            return self.fetcher.fetch(path, self.stop.is_set)
        return self.fetcher.fetch_watched(path, self.stop.is_set, storage.fetch_silence_s,
                                          min_bytes_per_s=storage.fetch_min_bytes_per_s)

    def _check_storage_alive(self, last: FetchTimeout) -> None:
        """Stop the rank once as many fetches in a row as there are producers (at least 2) went silent with none
        served between them: the storage is down for this node, and the rest of the share would all time out."""
        silent = self.fetcher.silent_in_a_row
        if silent < max(2, self.cfg.runtime.producers) or self.stop.is_set():
            return
        self._fatal.append(StorageHungError(
            f"{silent} fetches in a row went silent (or trickled) for storage.fetch_silence_s="
            f"{self.cfg.storage.fetch_silence_s:g}s "
            f"with none served between them ({self.fetcher.hung_fetches} still hung); the last: {last}. The storage "
            "is down for this node (a hung mount, an endpoint that does not answer): the rank stops, committed rows "
            "are kept, and a rerun tries these items again"))
        self.stop.set()

    def _producers_done(self) -> bool:
        return self._producers_left == 0

    def _consume(self) -> None:
        while True:
            task = self.queue.get(self.stop, self._producers_done)
            if task is None:
                return
            if not self._process(task):
                return  # the watchdog gave this item up and started a consumer in this thread's place

    def _process(self, task: _Task) -> bool:
        """Run the filters on one item and write its row. False where the watchdog timed the item out meanwhile:
        it wrote the row, and this thread's late result is dropped."""
        item_id = str(task.row[self.id_col])
        damage.current_item.set(item_id)  # warnings about the file name the item
        media = MediaItem(item_id, task.fetched.local_path, task.fetched.bytes,
                          self.frame_requests, self.cfg.video, self.backends, self.device)
        damage.current_damage.set(media.damage)  # its decodes' corrupt stretches, for its row
        suspect = item_id in self.suspects
        if suspect:
            try:
                refused = self._try_suspect(task, item_id)
            except ShutdownError:
                task.fetched.release()  # not written: the rerun redoes it
                return True
            if isinstance(refused, CrashError):
                self._refused += 1
            if refused is not None:
                task.fetched.release()
                self._emit(self._row(task.row, task.start, task.fetch_s, task.fetched, {}, {}, refused, media))
                return True
        if not self._gate.enter(id(task), suspect, self.stop):
            task.fetched.release()  # stopping: not written, the rerun redoes it
            return True
        if self.journal is not None:
            self.journal.start(item_id)
        flight = _InFlight(task, media, time.monotonic(), threading.get_ident())
        with self._ilock:
            self._inflight[id(task)] = flight
        results: dict[str, Any] = {}
        timings: dict[str, float] = {}
        error: BaseException | None = None
        abandoned = False
        try:
            for f in self.filters:
                if self.stop.is_set() and self.interrupted:
                    raise ShutdownError("rank is shutting down")
                if media.given_up.is_set():  # its row is written; the filters left would run for nobody
                    log.debug("item %s: given up by the watchdog; its filters from %r on are skipped", item_id, f.name)
                    break
                flight.filter = f.name
                results[f.name], timings[f.name] = f.run(media, self.filter_ctx)
        except ShutdownError:
            abandoned = True  # not written: the rerun redoes it
        except ItemError as e:
            error = e
        finally:
            task.fetched.release()
            with self._ilock:
                mine = self._inflight.pop(id(task), None) is not None
            if mine:  # else the watchdog has let the item go already
                self._leave(task, item_id)
        if mine and not abandoned:
            self._emit(self._row(task.row, task.start, task.fetch_s, task.fetched, results, timings, error, media))
        return mine

    def _leave(self, task: _Task, item_id: str) -> None:
        self._gate.leave(id(task))
        if self.journal is not None:
            self.journal.end(item_id)

    def _try_suspect(self, task: _Task, item_id: str) -> ItemError | None:
        """A suspect's verdict before it may run in this process: an error row, or None to run it (alone)."""
        crashes = self.suspects[item_id]
        limit = self.cfg.resume.max_item_crashes
        if limit is not None and crashes >= limit:
            return CrashError(f"the job's process died {crashes} times with this item in flight (a native crash, an "
                              f"abort or the OOM killer); not tried again (resume.max_item_crashes={limit}; see "
                              "_crashes.json in the output directory)")
        timeout = self.cfg.runtime.item_timeout_s or self.cfg.runtime.stall_timeout_s / 2
        self._rehearsed += 1
        try:
            seen = self._rehearser.rehearse(item_id, task.fetched.local_path, task.fetched.bytes, timeout,
                                            self.cfg.runtime.item_timeout_per_hour_s)
        except ShutdownError:
            raise
        except Exception:  # noqa: BLE001 - the safeguard must not stop the rank: the suspect still runs alone
            log.exception("item %s: its rehearsal could not run; it runs alone in this process", item_id)
            return None
        log.warning("item %s was in flight when a process died (%d time(s)); its rehearsal in a child process %s "
                    "in %.1fs", item_id, crashes, f"died of {seen.crashed}" if seen.crashed else
                    "timed out" if seen.timed_out else "finished", seen.seconds)
        if seen.crashed:
            return CrashError(f"a child process that decoded this item died of {seen.crashed} (in flight in {crashes} "
                              f"earlier death(s) of the job's process): {seen.detail}")
        if seen.timed_out:
            return ItemTimeout(f"its rehearsal in a child process ran over {seen.limit_s:g}s (in flight in {crashes} "
                               "earlier death(s) of the job's process)")
        return None

    def _item_limit(self, flight: _InFlight) -> float | None:
        """Seconds the item may spend in its filters: ``runtime.item_timeout_s``, plus ``item_timeout_per_hour_s``
        per hour of its media once probed; None: no limit."""
        rt = self.cfg.runtime
        if rt.item_timeout_s is None:
            return None
        return rt.item_timeout_s + rt.item_timeout_per_hour_s * (flight.media.duration_s or 0.0) / 3600.0

    def _busy_until(self) -> float:
        """The ``time.monotonic()`` deadline of the latest item in the consumers' hands (0: none, or no limit)."""
        with self._ilock:
            flights = list(self._inflight.values())
        deadlines = [f.since + limit for f in flights if (limit := self._item_limit(f)) is not None]
        return max(deadlines, default=0.0)

    def _time_out_stuck_items(self, consumers: list[threading.Thread]) -> None:
        """Write an ``ItemTimeout`` row for every item past its limit (``_item_limit``) and put a fresh consumer in
        place of each stuck thread (which is dropped from ``consumers``, so the rank does not wait for it)."""
        if self.cfg.runtime.item_timeout_s is None:
            return
        now = time.monotonic()
        with self._ilock:
            expired = {k: limit for k, f in self._inflight.items() if now - f.since > (limit := self._item_limit(f))}
            flights = [(self._inflight.pop(k), limit) for k, limit in expired.items()]
        rt = self.cfg.runtime
        for f, limit in flights:
            f.media.given_up.set()  # its decodes stop at their next frame, and no further filter runs on it
            per_hour, media_s = rt.item_timeout_per_hour_s, f.media.duration_s
            longer = (f" + item_timeout_per_hour_s={per_hour:g}s per hour of its {media_s:g}s of media = {limit:g}s"
                      if media_s and per_hour else "")
            error = ItemTimeout(f"filters ran over runtime.item_timeout_s={rt.item_timeout_s:g}s{longer} (in filter "
                                f"{f.filter!r}); the worker thread was abandoned")
            log.error("item %s: %s", f.task.row[self.id_col], error)
            self._leave(f.task, str(f.task.row[self.id_col]))
            self._emit(self._row(f.task.row, f.task.start, f.task.fetch_s, f.task.fetched, {}, {}, error, f.media))
            consumers[:] = [t for t in consumers if t.ident != f.thread]
            fresh = threading.Thread(target=self._guard, args=(self._consume,), daemon=True,
                                     name=f"consumer-r{self._replaced}")
            self._replaced += 1
            consumers.append(fresh)
            fresh.start()

    # ---- supervision --------------------------------------------------------------------------------
    def request_stop(self, reason: str) -> None:
        log.warning("stopping: %s; in-flight items finish, queued items are left for the rerun", reason)
        if self.journal is not None:
            self.journal.stopping()
        self.interrupted = True
        self.stop.set()

    def _snapshot(self) -> dict[str, Any]:
        snap = self.stats.snapshot()
        cache = self.fetcher.cache
        snap.update(queue_depth=self.queue.qsize(), pool_wait_s=round(self.pool.wait_seconds, 3),
                    units_taken=self.source.units_taken, rows_committed=self.writer.rows_committed,
                    fetch_retries=self.fetcher.retries_done, fetches_hung=self.fetcher.hung_fetches,
                    decodes_past_deadline=decodes_past_deadline(),
                    corrupt_media={k: n - self._damage_before[k] for k, n in damage.counts().items()},
                    tiers_skipped=self.fetcher.skipped_tiers,
                    cache_bytes=cache.bytes_used if cache else 0,
                    cache_evictions=cache.evictions if cache else 0, cache_discarded=self.fetcher.cache_discarded,
                    suspects_rehearsed=self._rehearsed,
                    suspects_refused=self._refused, batches=batch_stats(self.filters))
        return snap

    def run(self) -> None:
        """Start the threads and supervise them until the input is exhausted, a stop, or a fatal error."""
        rt = self.cfg.runtime
        producers = [threading.Thread(target=self._guard, args=(self._produce,), name=f"producer-{i}", daemon=True)
                     for i in range(rt.producers)]
        consumers = [threading.Thread(target=self._guard, args=(self._consume,), name=f"consumer-{i}", daemon=True)
                     for i in range(rt.consumers)]
        for t in producers + consumers:
            t.start()
        bar = None
        if rt.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.global_total if self.rank == 0 else None, unit="item", mininterval=2.0,
                       desc="all ranks" if self.rank == 0 else f"rank {self.rank}", position=0, leave=True)
        stop_seen_at: float | None = None
        last_flag_check = 0.0
        shown = 0
        last_progress_add = 0.0
        try:
            while any(t.is_alive() for t in consumers + producers):
                time.sleep(0.25)
                self.writer.flush_if_due()
                delta = self.stats.done - shown
                # The shared progress counter is one store round trip: every 2 s per rank, not every loop
                # (1,000 ranks at 4 Hz would be 4,000 requests/s at the store on the first node).
                if (delta or self.rank == 0) and time.monotonic() - last_progress_add >= 2.0:
                    last_progress_add = time.monotonic()
                    shown += delta
                    total = self.global_done.add(delta)
                    if bar is not None:
                        bar.update((total if self.rank == 0 else shown) - bar.n)
                snap = None
                if self.metrics is not None or self.exporter is not None:
                    snap = self._snapshot()
                    if self.metrics is not None:
                        self.metrics.maybe_write(snap)
                    if self.exporter is not None:
                        self.exporter.update(snap)
                reason = None
                if self.lease is not None and self.lease.lost is not None:  # this rank holds the lease: at once
                    rec = self.lease.lost
                    reason = (f"run {rec.get('run_id')} (host {rec.get('host')}) took over the output directory while "
                              "this run held it (its heartbeat was late: a paused or frozen process?); this run "
                              "stops, and the rows it had not committed are dropped, since that run does those items")
                    self.takeover.raise_flag(reason)
                    self._taken_over(reason)  # this rank's rows not committed go at once, before the wait below
                    # the store may go with this process (torchrun not sharing its own): stop once the others
                    # read the flag, so that none commits rows into the output the other run holds now
                    waited = 2 * TAKEOVER_POLL_S + 2
                    if not self.takeover.wait_seen(waited):
                        log.warning("not every rank saw the takeover flag within %.0fs", waited)
                    reason = None  # said
                elif time.monotonic() - last_flag_check >= TAKEOVER_POLL_S:  # the others: one store round trip
                    last_flag_check = time.monotonic()
                    reason = self.takeover.reason()
                if reason is not None:
                    self._taken_over(reason)
                if self._fatal:
                    break
                self._time_out_stuck_items(consumers)
                if self.stop.is_set():
                    stop_seen_at = stop_seen_at or time.monotonic()
                    if time.monotonic() - stop_seen_at > rt.shutdown_grace_s:
                        log.warning("shutdown grace of %.0fs over; abandoning items still in filters", rt.shutdown_grace_s)
                        break
                elif time.monotonic() - max(self.stats.last_progress, self._busy_until()) > rt.stall_timeout_s:
                    from pipeline.errors import StallError  # (items within their limits are working: a long film)

                    self._fatal.append(StallError(f"no item finished in {rt.stall_timeout_s:.0f}s; threads alive: "
                                                  f"{[t.name for t in producers + consumers if t.is_alive()]}"))
                    break
        finally:
            self.stop.set()
            self._rehearser.close()
            for t in producers + consumers:
                t.join(timeout=1.0)
            for task in self.queue.drain():
                task.fetched.release()
            if bar is not None:
                bar.close()
        if not self.lease_lost:
            # Stopped between two looks at the flag: torchrun ends the other ranks with SIGTERM once the rank that
            # raised it has exited, and the rows finished since must not be committed (the writer closes after this).
            try:
                reason = self.takeover.reason()
            except Exception as e:  # noqa: BLE001 - the store went with torchrun: nothing more to learn from it
                log.warning("cannot read the takeover flag before the last commit: %s: %s", type(e).__name__, e)
                reason = None
            if reason is not None:
                self._taken_over(reason)
        if self.metrics is not None:
            self.metrics.maybe_write(self._snapshot(), force=True)
        if self._fatal:
            raise self._fatal[0]

    def _taken_over(self, reason: str) -> None:
        """Another run took the output over: drop what is not committed, now and from now on, and stop with it."""
        self.lease_lost = True
        self.writer.discard()  # at once: consumers still finishing items must not commit them
        self._fatal.append(OutputLockedError(reason))


T = TypeVar("T")


def _main_decides(ctx: DistContext, decide: Callable[[], T]) -> T:
    """Rank 0 runs ``decide``; every rank returns its value, or raises the error it raised (a MediasieveError of
    the same type and message), so that no rank is left waiting in a collective for one that stopped."""
    verdict: tuple[T | None, str | None, str | None] = (None, None, None)
    if ctx.is_main:
        try:
            verdict = (decide(), None, None)
        except MediasieveError as e:
            ctx.broadcast((None, type(e).__name__, str(e)))
            raise
    value, err_type, err_msg = ctx.broadcast(verdict)
    if err_type is not None:
        _raise_shared(err_type, err_msg)
    return value


def _on_every_rank(ctx: DistContext, what: str, step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; where it fails on any, every rank raises that failure, typed and naming the ranks
    and hosts where it happened. Without this, a check that fails on one node (a manifest or a tier its image cannot
    reach) stopped that rank alone, and every other rank, rank 0's log included, stopped in its next collective with
    "Connection closed by peer" and exit code 1, the cause only in the failed node's log."""
    value: T | None = None
    error: Exception | None = None
    try:
        value = step()
    except Exception as e:  # noqa: BLE001 - shared below, then raised
        error = e
    failure = None if error is None else _shared_failure(error, what)
    if ctx.world_size == 1:
        if error is not None:
            raise error
        return value
    failed = [(rank, host, said) for rank, host, said in ctx.gather((ctx.rank, ctx.host, failure)) if said is not None]
    if not failed:
        return value
    kind, message = failed[0][2]
    alike = [(rank, host) for rank, host, said in failed if said == failed[0][2]]
    hosts = sorted({host for _rank, host in alike})
    where = (f"rank{'s' if len(alike) > 1 else ''} {ranks_shown([r for r, _h in alike])} on {', '.join(hosts[:4])}"
             f"{' ...' if len(hosts) > 4 else ''}")
    otherwise = len(failed) - len(alike)
    _raise_shared(kind, f"{message} (on {where}{f'; {otherwise} other rank(s) failed otherwise' if otherwise else ''})",
                  error)


def copy_models(filters: list, localize: Callable[[str, dict | None], str], copies: dict[str, str]) -> None:
    """Every model the filters declare (``model_sources``), made local to the node with ``localize`` (a remote one
    copied by local rank 0 while the node's other ranks wait at a barrier) and checked, into ``copies`` (URI -> local
    path), in the same order on every rank. A failure is raised after the last model, so that a rank whose copy or
    check failed still passes every barrier the others pass (a collective left half-entered hangs or garbles the
    next one)."""
    error: Exception | None = None
    seen: set[str] = set()
    for f in filters:
        for source in f.model_sources().values():
            if isinstance(source, str) or source.uri in seen:  # a string: weights a package ships
                continue
            seen.add(source.uri)
            try:
                copies[source.uri] = localize(source.uri, source.storage_options)
            except Exception as e:  # noqa: BLE001 - raised after the last model's barrier
                error = error or e
    if error is not None:
        raise error


def _shared_failure(e: Exception, what: str) -> tuple[str, str]:
    """A rank's error as the (type, message) that every rank raises: a MediasieveError as it is, any other error as
    a MediasieveError saying ``what`` failed."""
    if isinstance(e, MediasieveError):
        return type(e).__name__, str(e)
    return "MediasieveError", f"{what}: {type(e).__name__}: {e}"


def _raise_shared(err_type: str, err_msg: str, cause: BaseException | None = None) -> None:
    """Raise another rank's error here: the MediasieveError of the same type and message (``cause``: this rank's
    own error, where it had one)."""
    from pipeline import errors

    raise getattr(errors, err_type, MediasieveError)(err_msg) from cause


def _node_manifest(ctx: DistContext, source: InputConfig, spill_dir: str, run_id: str) -> Manifest:
    """Each node's local rank 0 streams the manifest into the node's spill; every rank of the node attaches to it,
    its ids memory-mapped (one copy per node, not one per rank, and one read of the manifest per node). A failure
    on any rank, in either step, stops every rank with its error instead of leaving them in a collective, and so do
    nodes that read different rows (``nodes_disagree``)."""

    def stop_on_failure(reports: list[tuple[str, str] | None], mine: BaseException | None) -> None:
        if mine is not None:
            raise mine
        failed = next((r for r in reports if r is not None), None)
        if failed is not None:
            _raise_shared(*failed)

    built: str | None = None
    read: dict | None = None
    error: Exception | None = None
    if ctx.local_rank == 0:
        try:
            built = build_spill(source, spill_dir, f"{run_id}-n{ctx.node_rank:05d}")
            read = spill_read(built)
        except Exception as e:  # noqa: BLE001 - shared below, then raised
            error = e
    reports = ctx.gather((ctx.host, ctx.node_rank, ctx.local_rank, built,
                          None if error is None else _shared_failure(error, "cannot build the manifest spill"), read))
    try:
        stop_on_failure([r[4] for r in reports], error)
        # every node read the manifest itself: the positions that rank 0 shares mean the same items on each only
        # where they read the same rows (every rank decides this from the same reports: no further collective)
        differ = nodes_disagree({r[1]: (r[0], r[5]) for r in reports if r[2] == 0 and r[5] is not None})
        if differ:
            raise ManifestError(differ)
    except BaseException:
        if built is not None:
            remove_spill(built)
        raise
    path = next((r[3] for r in reports if r[:3] == (ctx.host, ctx.node_rank, 0)), None)
    manifest: Manifest | None = None
    try:
        if path is None:
            raise MediasieveError(f"no rank with local rank 0 on node {ctx.node_rank} ({ctx.host}) built the "
                                  "manifest spill")
        manifest = Manifest(path, owner=ctx.local_rank == 0)
    except MediasieveError as e:
        error = e
    except Exception as e:  # noqa: BLE001 - shared below, then raised
        error = MediasieveError(f"cannot open the manifest spill {path} (storage.cache_dir must be one directory "
                                f"for the ranks of a node): {type(e).__name__}: {e}")
        error.__cause__ = e
    reports = ctx.gather(None if error is None else (type(error).__name__, str(error)))
    try:
        stop_on_failure(reports, error)
    except BaseException:
        if manifest is not None:
            manifest.close()
        elif ctx.local_rank == 0 and built is not None:
            remove_spill(built)
        raise
    return manifest


def _new_run_id() -> str:
    return f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"


def model_cache_dir(cfg: JobConfig) -> str:
    """The node's directory of model copies (``model_pool.model_cache_dir``, else ``<storage.cache_dir>/models``)."""
    return cfg.model_pool.model_cache_dir or os.path.join(cfg.storage.cache_dir, "models")


def weighed_identity(cfg: JobConfig, recorded: dict | None, model_cache: str) -> tuple[dict, dict]:
    """The job's identity with its models' digests (``pipeline.weights``), and the fingerprints to record: on rank 0
    before any work, and in ``jobs/preflight.py``. A first run reads every model whole (a remote one as the node's
    copy in ``model_cache``), outside any time limit of the output's.

    Args:
        recorded: the output's ``_config.json`` (its fingerprints spare the reads of unchanged models), or None.
    """
    sources = {f"{f.name}.{key}": source for f in build_filters(cfg.filters)
               for key, source in f.model_sources().items()}
    models, weights = weigh_models(sources, (recorded or {}).get("models") or {}, model_cache)
    return job_identity(cfg) | ({"models": models} if models else {}), weights


def _prepare_output(cfg: JobConfig, run_id: str, software: list[dict[str, str]]) -> tuple[OutputLease, dict]:
    """Rank 0: take the output lease and check/record the resolved config (and the ranks' distinct ``software``);
    returns the lease and the models' fingerprints (``pipeline.weights``), which every rank checks its copy against."""
    lease = OutputLease(cfg.output.dir, cfg.output.storage_options, run_id, cfg.output.lease_timeout_s,
                        io_timeout_s=cfg.output.commit_timeout_s)
    lease.acquire()

    def prepare() -> dict | None:
        fs, root = fsspec.core.url_to_fs(cfg.output.dir, **cfg.output.storage_options)
        marker = f"{root.rstrip('/')}/{SUCCESS_MARKER}"
        if fs.exists(marker):  # this run is not complete until it says so itself
            fs.rm_file(marker)
        finish_pending(fs, root.rstrip("/"))  # a compaction killed part-way: before any rank reads the parts
        return recorded_config(cfg.output.dir, cfg.output.storage_options)

    try:
        what = f"preparing the output directory {cfg.output.dir}"
        recorded = bounded(prepare, cfg.output.commit_timeout_s, what)
        identity, weights = weighed_identity(cfg, recorded, model_cache_dir(cfg))
        bounded(lambda: check_or_record_config(cfg.output.dir, cfg.output.storage_options, to_dict(cfg), identity,
                                               cfg.resume.allow_config_change, weights, run_id, software,
                                               on_software_change=cfg.resume.on_software_change),
                cfg.output.commit_timeout_s, what)
    except BaseException:
        lease.release()
        raise
    return lease, weights


def _use_returning_arrow_pool() -> None:
    """Arrow's default mimalloc pool keeps freed pages, so a rank's RSS grows with the largest table it ever
    read (the manifest, the committed ids). jemalloc with prompt decay hands them back. An explicit
    ``ARROW_DEFAULT_MEMORY_POOL`` in the environment wins."""
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
        pa.jemalloc_set_decay_ms(0)
    except NotImplementedError:  # a pyarrow build without jemalloc
        pa.set_memory_pool(pa.system_memory_pool())


def run_job(cfg: JobConfig, install_signal_handlers: bool = False) -> RankOutcome:
    """Run this process's rank of the job described by ``cfg`` (world size from torchrun's environment).

    Args:
        cfg: a validated config.
        install_signal_handlers: turn SIGTERM/SIGINT into a clean stop (only from the main thread).

    Returns:
        The rank's outcome; rank 0's carries the run summary.
    """
    _use_returning_arrow_pool()
    device = resolve_device(cfg.runtime.device, int(os.environ.get("LOCAL_RANK", 0)))
    ctx = init_distributed(device, cfg.runtime.dist_timeout_s)
    try:
        return run_rank(cfg, ctx, device, install_signal_handlers)
    finally:
        ctx.close()


def run_rank(cfg: JobConfig, ctx: DistContext, device: str = "cpu", install_signal_handlers: bool = False) -> RankOutcome:
    """Run one rank from a config and a distribution context (world size 1 in unit tests)."""
    if cfg.runtime.torch_threads:
        import torch

        torch.set_num_threads(cfg.runtime.torch_threads)

    def reach() -> TieredFetcher:
        check_input_exists(cfg.input)
        # checks the tiers; local rank 0 tends what earlier runs left in the node cache (an entry or a partial
        # download unused for twice the stall timeout is abandoned: no live rank holds an item that long)
        return TieredFetcher(cfg.storage, cache_share=1.0 / max(1, ctx.local_world_size),
                             tend_cache=ctx.local_rank == 0, orphan_age_s=2 * cfg.runtime.stall_timeout_s)

    fetcher = _on_every_rank(ctx, "cannot reach the manifest or the storage tiers", reach)

    software = distinct_software(ctx.gather(software_versions()))  # a node on another image: said before any work
    # a node launched with other overrides or another copy of the config: every rank stops alike, before any work
    differ = ranks_disagree(ctx.gather(rank_settings(job_identity(cfg), cfg.output.dir, cfg.input.portable_types)))
    if differ:
        raise ConfigError(differ)

    # Rank 0 takes the lease; every rank learns the run id or the reason to stop.
    leases: list[OutputLease] = []

    def take_lease() -> tuple[str, dict]:
        warn_if_mixed(software, cfg.runtime.mixed_software == "fail")
        run_id = _new_run_id()
        lease, weights = _prepare_output(cfg, run_id, [s["versions"] for s in software])
        leases.append(lease)
        return run_id, weights

    run_id, weights = _main_decides(ctx, take_lease)
    lease = leases[0] if leases else None

    try:
        return _run_started(cfg, ctx, device, run_id, fetcher, install_signal_handlers, lease, weights)
    finally:
        if lease is not None:
            lease.release()


def _run_started(cfg: JobConfig, ctx: DistContext, device: str, run_id: str, fetcher: TieredFetcher,
                 install_signal_handlers: bool, lease: OutputLease | None = None,
                 weights: dict | None = None) -> RankOutcome:
    started = time.time()
    source = cfg.input
    if source.listing_glob:  # listed once, by rank 0, for every rank
        source = _main_decides(ctx, lambda: snapshot_listing(cfg.input, cfg.output.dir, cfg.output.storage_options,
                                                             run_id))
    manifest = _node_manifest(ctx, source, os.path.join(cfg.storage.cache_dir, SPILL_DIR), run_id)
    try:
        check_protocols(manifest.protocols)
        return _run_with_manifest(cfg, ctx, device, run_id, fetcher, install_signal_handlers, manifest, started,
                                  lease, weights)
    finally:
        manifest.close()


def _run_with_manifest(cfg: JobConfig, ctx: DistContext, device: str, run_id: str, fetcher: TieredFetcher,
                       install_signal_handlers: bool, manifest: Manifest, started: float,
                       lease: OutputLease | None = None, weights: dict | None = None) -> RankOutcome:
    out = cfg.output
    mine: dict[str, pa.Array] = {}

    def resume_set() -> tuple[str | None, str | None, int]:
        """Rank 0 reads the committed parts once for every rank and shares the positions to process."""
        try:
            fs, root = fsspec.core.url_to_fs(out.dir, **out.storage_options)

            def read(files: list[str]) -> tuple[CommittedState, pa.Array | None]:
                state = read_committed(out.dir, out.storage_options, cfg.input.id_column, files)
                retryable = cfg.resume.retry_failed == "retryable"
                return state, failed_for_good(fs, files, state, cfg.input.id_column) if retryable else None

            # a damaged part (a node that lost power after its commit) is moved aside and its items redone
            (state, for_good), _, _ = read_past_damaged(fs, root, part_files(fs, root), read, run_id)
            if for_good is not None:
                log.info("%d of the %d items with only failure rows failed for good (their latest failure is not "
                         "retryable) and are not retried (resume.retry_failed=retryable)", len(for_good),
                         len(state.failed_only))
            if state.duplicate_successes:
                log.warning("the output holds %d second success row(s) of items (a part that landed after its run "
                            "gave it up as hung?): this run removes them at its end, before its completion marker, "
                            "keeping the latest", state.duplicate_successes)
            mine["pending"] = pending_indices(manifest.ids, state, cfg.resume.retry_failed, manifest.keep, for_good)
            url = share_pending(out.dir, out.storage_options, run_id, mine["pending"]) if ctx.world_size > 1 else None
            return url, state.newest_part, len(state.succeeded)
        except MediasieveError:
            raise
        except Exception as e:  # noqa: BLE001 - typed, so that every rank stops with it instead of waiting
            raise MediasieveError(f"cannot read the committed output in {out.dir}: {type(e).__name__}: {e}") from e

    shared, newest_part, n_succeeded = _main_decides(ctx, resume_set)
    pending = mine["pending"] if "pending" in mine else read_pending(shared, out.storage_options)
    n_units = math.ceil(len(pending) / cfg.runtime.unit_size)
    log.info("run %s: %d items in manifest, %d committed successes, %d to process in %d units", run_id,
             len(manifest), n_succeeded, len(pending), n_units)

    filters = build_filters(cfg.filters)
    wanted = result_schema(manifest.schema, [(f.name, f.arrow_type()) for f in filters])
    clashes = case_clashes(wanted) if ctx.rank == 0 else []
    if clashes:
        log.warning("the rows hold column names that differ only in case (%s): Spark refuses such a table unless "
                    "spark.sql.caseSensitive=true (pyarrow, DuckDB and Polars read it); rename one in the manifest "
                    "or the filters", "; ".join(clashes))
    # Rank 0 reads the committed parts' schema once, and every rank writes in the schema it decides on.
    schema = _main_decides(ctx, lambda: writer_schema(cfg.output.dir, cfg.output.storage_options, newest_part,
                                                      wanted, cfg.resume.on_schema_change))
    pool = ModelPool(device, cfg.model_pool.instances, cfg.model_pool.acquire_timeout_s, cfg.runtime.empty_cache_every)
    recorded: dict[str, list[dict]] = {}
    for fp in (weights or {}).values():
        recorded.setdefault(fp["uri"], []).append(fp)

    copies: dict[str, str] = {}

    def localize(uri: str, options: dict | None = None) -> str:
        if uri in copies:
            return copies[uri]
        local = localize_model(uri, model_cache_dir(cfg), ctx.local_rank, ctx.barrier, options)
        if uri in recorded:  # another node's weights at the same path, or weights replaced as the run started
            check_copy(local, recorded[uri], ctx.host)
        return local

    # A node's copies first (their barriers are collectives), then the loads (none): a failure in either, on any
    # rank, stops every rank with its error, where before the others stopped in their next collective with gloo's
    # "Connection closed by peer", the cause only in the failed node's log.
    _on_every_rank(ctx, "copying the models to the node", lambda: copy_models(filters, localize, copies))
    setup = SetupContext(device, pool, localize, cfg.runtime.strict_gpu, cfg.storage.cache_dir)
    _on_every_rank(ctx, "loading the filters' models", lambda: [f.setup(setup) for f in filters])
    writer = ResultWriter(cfg.output.dir, cfg.output.storage_options, schema, run_id, ctx.rank,
                          cfg.output.rows_per_file, cfg.output.flush_interval_s, cfg.output.compression,
                          commit_timeout_s=cfg.output.commit_timeout_s)

    # No rank writes a part before every rank has read the committed state: they all agree on `pending`.
    counts = ctx.gather(len(pending))
    if len(set(counts)) != 1:
        raise MediasieveError(f"ranks disagree on the pending item count {counts}: was the output changed mid-start?")

    suspects, journal = _crash_ledger(cfg, ctx, run_id)
    out_fs, out_root = fsspec.core.url_to_fs(cfg.output.dir, **cfg.output.storage_options)
    local_out = is_local_fs(out_fs)
    log_dir = os.path.join(out_root, "_logs") if local_out else os.path.join(cfg.storage.cache_dir, "_logs", run_id)
    metrics = MetricsLog(os.path.join(log_dir, f"metrics-{run_id}-r{ctx.rank:05d}.jsonl"), ctx.rank,
                         cfg.runtime.metrics_interval_s)
    exporter = None
    if cfg.runtime.prometheus_port is not None:
        exporter = PrometheusExporter(cfg.runtime.prometheus_port + ctx.local_rank, ctx.rank)

    workers = RankWorkers(
        cfg=cfg,
        source=UnitSource(manifest, pending, cfg.runtime.unit_size,
                          WorkUnitCounter(n_units, ctx.store, f"mediasieve/{run_id}/units")),
        fetcher=fetcher, filters=filters, filter_ctx=FilterContext(device, pool, ctx.rank), writer=writer,
        stats=RankStats(), run_id=run_id, rank=ctx.rank, host=ctx.host, device=device, pool=pool,
        global_done=GlobalCounter(ctx.store, f"mediasieve/{run_id}/done"), global_total=len(pending),
        metrics=metrics, exporter=exporter, journal=journal, suspects=suspects, lease=lease,
        takeover=StopFlag(ctx.store, f"mediasieve/{run_id}/takeover", ctx.world_size),
    )
    ctx.barrier()

    previous: dict[int, Any] = {}
    if install_signal_handlers:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, lambda s, _f: workers.request_stop(f"signal {signal.Signals(s).name}"))
    try:
        workers.run()
    finally:
        if journal is not None:
            journal.close()  # whatever stopped the run, this process did not die: nothing in flight is a suspect
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            writer.close()  # committed before any completion marker; also on a stop, so finished rows are kept
        finally:
            metrics.close()
            if exporter is not None:
                exporter.close()
            if not local_out:
                try:
                    bounded(lambda: out_fs.put(metrics.path, f"{out_root.rstrip('/')}/_logs/"
                                               f"{os.path.basename(metrics.path)}"),
                            cfg.output.commit_timeout_s, "the upload of the metrics log")
                except OutputHungError as e:  # the error that stops the rank, if any, is the writer's
                    log.error("%s; the metrics log stays at %s", e, metrics.path)

    snap = workers._snapshot()
    if workers.interrupted:
        # No collective after a stop: other ranks may be gone already (torchrun tears the group down).
        return RankOutcome(run_id, ctx.rank, snap, True, output_dir=cfg.output.dir)
    models = {k: v for f in filters for k, v in f.runtimes().items()}
    everyone = ctx.gather({"rank": ctx.rank, "host": ctx.host, "device": device, "interrupted": workers.interrupted,
                           "models": models, "software": software_versions(), **snap})
    outcome = RankOutcome(run_id, ctx.rank, snap, workers.interrupted, output_dir=cfg.output.dir)
    if ctx.is_main and not any(r["interrupted"] for r in everyone):
        abandoned = threading.Event()  # given up as hung: the summary and the marker must not land late
        outcome.summary = bounded(
            lambda: write_summary(cfg, run_id, manifest, len(pending), everyone, started, abandoned),
            cfg.output.finish_timeout_s, "finishing the output (the summary's reads, duplicate removal, compaction, "
            "the summary and the marker)", abandoned, "output.finish_timeout_s")
    ctx.barrier()
    return outcome


def _crash_ledger(cfg: JobConfig, ctx: DistContext, run_id: str) -> tuple[dict[str, int], InflightJournal | None]:
    """Local rank 0 of each node reads what dead processes of this job left in flight there, rank 0 adds it to the
    output's crash ledger, every rank gets the ledger, and this process opens its own journal (``pipeline.crashes``).
    """
    if cfg.resume.max_item_crashes is None:
        return {}, None
    key = job_key(cfg.output.dir)
    found, read = collect_suspects(cfg.storage.cache_dir, key, ctx.host) if ctx.local_rank == 0 else ({}, [])
    reports = ctx.gather(found)
    ledger = _main_decides(ctx, lambda: update_ledger(cfg.output.dir, cfg.output.storage_options, reports, run_id))
    for path in read:  # the ledger holds what they said
        try:
            os.remove(path)
        except FileNotFoundError:
            pass
    return ledger, InflightJournal(cfg.storage.cache_dir, key, ctx.host)


def _models_summary(ranks: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per filter: each distinct runtime (execution provider, io_binding, fallback reason) and the ranks on it."""
    per_model: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for r in ranks:
        for name, rt in r.get("models", {}).items():
            per_model.setdefault(name, []).append((r["rank"], rt))
    return {name: [{**rt, "ranks": on} for rt, on in ranks_by_value(pairs)] for name, pairs in per_model.items()}


def write_summary(cfg: JobConfig, run_id: str, manifest: Manifest, pending: int, ranks: list[dict[str, Any]],
                  started: float, abandoned: threading.Event) -> dict[str, Any]:
    """Rank 0, after every rank committed: failure log, run summary, then the completion marker (last). Nothing is
    written once ``abandoned`` is set (the caller gave the whole of it up as hung)."""
    out = cfg.output
    id_col, path_col = cfg.input.id_column, cfg.input.path_column
    fs, root = fsspec.core.url_to_fs(out.dir, **out.storage_options)
    root = root.rstrip("/")
    scratch = os.path.join(cfg.storage.cache_dir, SCRATCH_DIR)  # local staging of merged and rewritten parts
    if out.compact_mb:
        report = compact(out.dir, out.storage_options, int(out.compact_mb * (1 << 20)), scratch_dir=scratch,
                         compression=out.compression)
        log.info("compacted %d part files into %d (%d part files now)", report.merged, report.written,
                 report.files_after)
    files = part_files(fs, root)
    # Vectorised and column-lean: a million-row output must not become a million Python objects on rank 0.
    by_type: dict[str, int] = {}
    lines = []
    n_succeeded = n_failed = n_with_row = 0
    duplicates_removed = 0
    if files:
        state = read_committed(out.dir, out.storage_options, id_col, files)  # distinct ids: succeeded, failed only
        if state.duplicate_successes:  # one success row per item before the marker says the output is complete
            duplicates_removed = remove_duplicate_successes(out.dir, out.storage_options, id_col, files,
                                                            scratch_dir=scratch, compression=out.compression,
                                                            by=run_id)
            log.warning("removed %d second success row(s) of items, keeping the latest", duplicates_removed)
            fs.invalidate_cache()
            files = part_files(fs, root)
            state = read_committed(out.dir, out.storage_options, id_col, files)
        kept = manifest.kept_ids()  # distinct ids
        n_succeeded = pc.sum(pc.is_in(kept, value_set=state.succeeded)).as_py() or 0
        n_with_row = n_succeeded + (pc.sum(pc.is_in(kept, value_set=state.failed_only)).as_py() or 0)
        latest = latest_failures(fs, files, state, kept, id_col, path_col)
        n_failed = len(latest)
        for rec in latest.values():
            by_type[rec["error_type"]] = by_type.get(rec["error_type"], 0) + 1
            lines.append(json.dumps({id_col: rec["id"], path_col: rec["path"], "error_type": rec["error_type"],
                                     "error_message": rec["error_message"], "run_id": rec["run_id"],
                                     "time": rec["end_time"].isoformat() if rec["end_time"] else None}))
    wall = time.time() - started
    done = sum(r["done"] for r in ranks)
    this_by_type: dict[str, int] = {}
    tiers: dict[str, int] = {}
    for r in ranks:
        for k, v in r["failures_by_type"].items():
            this_by_type[k] = this_by_type.get(k, 0) + v
        for k, v in r["tier_hits"].items():
            tiers[k] = tiers.get(k, 0) + v
    summary = {
        "run_id": run_id,
        "finished_at": _now(time.time()).isoformat(),
        "output_dir": out.dir,
        "world_size": len(ranks),
        "manifest_items": len(manifest),
        "this_run": {
            "items": done,
            "skipped_already_done": len(manifest) - pending,
            "retry_failed": cfg.resume.retry_failed,
            "succeeded": sum(r["succeeded"] for r in ranks),
            "failed": sum(r["failed"] for r in ranks),
            "failures_by_type": this_by_type,
            "tier_hits": tiers,
            "bytes_fetched": sum(r["bytes_fetched"] for r in ranks),
            "corrupt_media": {k: sum(r["corrupt_media"][k] for r in ranks) for k in ranks[0]["corrupt_media"]},
            "damaged_items": sum(r["damaged_items"] for r in ranks),
            "wall_s": round(wall, 3),
            "items_per_s": round(done / wall, 3) if wall > 0 else None,
        },
        "total": {
            "succeeded": n_succeeded,
            "failed": n_failed,
            "failures_by_type": by_type,
            "without_row": len(manifest) - n_with_row,
            "duplicate_success_rows_removed": duplicates_removed,
            "parts_quarantined": len(quarantined(fs, root)),  # damaged parts moved aside, by this run or earlier
        },
        "models": _models_summary(ranks),
        "software": distinct_software([r["software"] for r in ranks]),
        "per_rank": [{k: r[k] for k in ("rank", "host", "device", "done", "succeeded", "failed", "items_per_s",
                                        "units_taken", "peak_rss_mb")} for r in ranks],
    }
    tmp = f"{root}/_tmp"
    # every rank took its share to the end, so every item has a row: where one has none, the ranks did not process
    # what rank 0 decided (a fault this version checks at the start), and the marker would call the output complete
    missing = summary["total"]["without_row"]
    summary["complete"] = missing == 0
    if missing:
        log.error("%d item(s) of the manifest have no row although every rank finished its share: no completion "
                  "marker; rerun the same command to process them (jobs/status.py counts them)", missing)
    writes = [(FAILURES, ("\n".join(lines) + ("\n" if lines else "")).encode()),
              (SUMMARY, json.dumps(summary, indent=2).encode())]
    if not missing:
        writes.append((SUCCESS_MARKER, json.dumps({"run_id": run_id}).encode()))  # the marker last

    def commit() -> None:  # the reads above take as long as the output is large; these writes are small
        for name, data in writes:
            if abandoned.is_set():
                return  # given up as hung: no marker may land late
            commit_bytes(fs, f"{root}/{name}", data, tmp, lambda: not abandoned.is_set())

    bounded(commit, out.commit_timeout_s, "writing the summary and the completion marker", abandoned)
    return summary
