"""Items that kill their process: a segfault or an abort in a native decoder, the OOM killer.

Such an item gets no row, so every rerun (and every elastic restart) takes it again and dies again, and one
poison file among millions stops a week-long job. Three parts keep that to one crash:

- **A journal of items in flight.** Each process appends a line when an item enters its filters and another when
  it leaves them, to a node-local file (``<storage.cache_dir>/_inflight/``), with no fsync: a process that dies
  leaves its lines in the kernel's page cache. A clean exit removes the file; only a hard death leaves one.
- **A ledger in the output directory** (``_crashes.json``): at the start of a run, local rank 0 of each node reads
  the journals that dead processes of this job left on that node, and rank 0 adds one crash to every item that
  was in flight in each. Every rank gets the ledger.
- **Suspects are tried apart.** An item in the ledger is first rehearsed in a child process: the probe, the
  decode of every frame the filters asked for, the audio decode, and the weight-free filters (each filter's
  ``rehearse``). A child killed by a signal gives the item a ``CrashError`` row, and the job goes on. An item that
  passes runs in the job process alone (no other item in the filters), so a second crash names it and nobody
  else. An item with ``resume.max_item_crashes`` crashes is not tried again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import fsspec

from pipeline.errors import MediasieveError, ShutdownError
from pipeline.proc import is_alive, parse_process_tag, process_tag

log = logging.getLogger(__name__)

JOURNAL_DIR = "_inflight"
LEDGER = "_crashes.json"
CRASH_SIGNALS = frozenset(int(s) for s in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGABRT,
                                           signal.SIGSYS, signal.SIGTRAP, signal.SIGKILL))
"""Deaths that a process brings on itself (SIGKILL: the OOM killer); a stop from outside is SIGTERM or SIGINT."""


def job_key(output_dir: str) -> str:
    """A short name for the job (its output directory) in node-local file names."""
    return hashlib.sha256(output_dir.rstrip("/").encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _host_part(host: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in host)[:64]


class InflightJournal:
    """This process's record of the items in its filters.

    Args:
        cache_dir: the node-local cache directory.
        key: ``job_key`` of the output directory.
        host: this host's name.
    """

    def __init__(self, cache_dir: str, key: str, host: str):
        folder = os.path.join(cache_dir, JOURNAL_DIR)
        os.makedirs(folder, exist_ok=True)
        self.path = os.path.join(folder, f"{key}__{_host_part(host)}__{process_tag()}.log")
        self._lock = threading.RLock()  # re-entrant: the SIGTERM handler writes from the main thread, which may hold it
        self._file = open(self.path, "a", encoding="utf-8")

    def _write(self, mark: str, item_id: str) -> None:
        with self._lock:
            if self._file.closed:
                return
            self._file.write(json.dumps([mark, item_id]) + "\n")
            self._file.flush()  # into the kernel: it outlives this process (not the node, which is fine)

    def start(self, item_id: str) -> None:
        """The item enters the filters."""
        self._write("+", item_id)

    def end(self, item_id: str) -> None:
        """The item left the filters (done, failed, or abandoned by the watchdog)."""
        self._write("-", item_id)

    def stopping(self) -> None:
        """The process was told to stop (SIGTERM, SIGINT): a death from here on is the stop's escalation (Slurm's
        and torchrun's SIGKILL after their grace), not something an item did."""
        self._write("!", "")

    def close(self) -> None:
        """A clean exit: nothing of this process is a suspect, so the journal goes."""
        with self._lock:
            self._file.close()
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass


def collect_suspects(cache_dir: str, key: str, host: str) -> tuple[dict[str, int], list[str]]:
    """Read the journals that dead processes of this job left on this host.

    Args:
        cache_dir: the node-local cache directory.
        key: ``job_key`` of the output directory.
        host: this host's name.

    Returns:
        ``({item id: number of journals it was left in flight in}, [journal paths read])``; remove the paths once
        the ledger holds what they said.
    """
    folder = os.path.join(cache_dir, JOURNAL_DIR)
    prefix = f"{key}__{_host_part(host)}__"
    try:
        names = sorted(n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".log"))
    except FileNotFoundError:
        return {}, []
    suspects: dict[str, int] = {}
    read: list[str] = []
    for name in names:
        try:
            pid, ticks = parse_process_tag(name[len(prefix):-4])
        except ValueError:
            continue
        if is_alive(pid, ticks):
            continue
        path = os.path.join(folder, name)
        balance: dict[str, int] = {}
        try:
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    try:
                        mark, item_id = json.loads(line)
                    except (ValueError, TypeError):
                        continue  # the line the death cut short
                    if mark == "!":
                        balance = {}  # told to stop: what it had in flight then is not suspect
                        break
                    balance[item_id] = balance.get(item_id, 0) + (1 if mark == "+" else -1)
        except OSError as e:
            log.warning("cannot read the in-flight journal %s: %s", path, e)
            continue
        for item_id, n in balance.items():
            if n > 0:
                suspects[item_id] = suspects.get(item_id, 0) + 1
        read.append(path)
    return suspects, read


def read_ledger(out_dir: str, storage_options: dict) -> dict[str, Any]:
    """The output directory's crash ledger (empty where there is none)."""
    fs, root = fsspec.core.url_to_fs(out_dir, **storage_options)
    path = f"{root.rstrip('/')}/{LEDGER}"
    try:
        ledger = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return {"items": {}}
    except ValueError as e:
        raise MediasieveError(f"the crash ledger {path} is not JSON ({e}): fix or delete it") from e
    if not isinstance(ledger, dict) or not isinstance(ledger.get("items", {}), dict):
        raise MediasieveError(f"the crash ledger {path} is not a mapping with 'items': fix or delete it")
    return ledger


def update_ledger(out_dir: str, storage_options: dict, reports: list[dict[str, int]], run_id: str) -> dict[str, int]:
    """Rank 0: add the crashes the nodes found to the ledger, commit it, and return ``{item id: crashes}``.

    Raises:
        MediasieveError: the ledger cannot be read or written (every rank then stops with the same error).
    """
    try:
        return _update_ledger(out_dir, storage_options, reports, run_id)
    except MediasieveError:
        raise
    except Exception as e:  # noqa: BLE001 - typed, so that every rank stops with it
        raise MediasieveError(f"cannot update the crash ledger in {out_dir}: {type(e).__name__}: {e}") from e


def _update_ledger(out_dir: str, storage_options: dict, reports: list[dict[str, int]], run_id: str) -> dict[str, int]:
    from pipeline.writer import commit_bytes

    ledger = read_ledger(out_dir, storage_options)
    items = ledger.setdefault("items", {})
    found = 0
    for report in reports:
        for item_id, n in report.items():
            entry = items.setdefault(item_id, {"crashes": 0, "found_by_runs": []})
            entry["crashes"] += n
            entry["found_by_runs"] = (entry.get("found_by_runs", []) + [run_id])[-8:]  # the runs after the deaths
            found += n
    if found:
        fs, root = fsspec.core.url_to_fs(out_dir, **storage_options)
        root = root.rstrip("/")
        commit_bytes(fs, f"{root}/{LEDGER}", json.dumps(ledger, indent=1).encode(), f"{root}/_tmp")
        named = sorted({repr(i) for r in reports for i in r})
        log.warning("%d item(s) were in flight when a process of an earlier run died; they are rehearsed apart "
                    "this run: %s", len(named), ", ".join(named[:10]))
    return {str(item_id): int(e.get("crashes", 0)) for item_id, e in items.items()
            if isinstance(e, dict) and int(e.get("crashes", 0)) > 0}


class SuspectGate:
    """Suspects run alone: an ordinary item shares the gate with others, a suspect holds it by itself (and
    ordinary items wait while one waits, so it is not starved). Holders are keyed, and leaving is idempotent, so
    the watchdog can release an abandoned item's hold for it."""

    def __init__(self):
        self._cond = threading.Condition()
        self._shared: set[int] = set()
        self._alone: int | None = None
        self._waiting_alone = 0

    def enter(self, key: int, alone: bool, stop: threading.Event) -> bool:
        """Wait for the gate; False when ``stop`` was set meanwhile."""
        with self._cond:
            if alone:
                self._waiting_alone += 1
                try:
                    while self._alone is not None or self._shared:
                        if stop.is_set():
                            return False
                        self._cond.wait(0.2)
                    self._alone = key
                finally:
                    self._waiting_alone -= 1
                    self._cond.notify_all()
            else:
                while self._alone is not None or self._waiting_alone:
                    if stop.is_set():
                        return False
                    self._cond.wait(0.2)
                self._shared.add(key)
            return True

    def leave(self, key: int) -> None:
        with self._cond:
            if self._alone == key:
                self._alone = None
            self._shared.discard(key)
            self._cond.notify_all()


@dataclass(frozen=True)
class Rehearsal:
    """What a suspect's rehearsal in a child process showed."""

    crashed: str | None = None
    """How the child died (``SIGSEGV``, ``SIGABRT``, ``SIGKILL`` for the OOM killer), or None."""
    timed_out: bool = False
    seconds: float = 0.0
    detail: str = ""
    """The child's last words (stderr tail)."""
    limit_s: float = 0.0
    """How long the child was given (the timeout, plus the allowance for the media's probed duration)."""


class Rehearser:
    """Rehearses suspects in a child process of this job process, one after another.

    The child starts on the first suspect (a run without suspects never starts one), builds the filters once and
    serves every later suspect; after a death or a timeout the next suspect gets a fresh child. A fresh interpreter
    per suspect cost 2.2-2.6 s, nearly all of it importing torch and the FFmpeg bindings.

    Args:
        specs: the job's filter specs (``FilterSpec``); each filter's ``rehearse`` runs, without setup.
        video_cfg: the video section of the config.
        backends: decoder backend names, in the order the job uses.
    """

    def __init__(self, specs: list, video_cfg: Any, backends: list[str]):
        self._setup = pickle.dumps((list(specs), video_cfg, list(backends)))
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._err = None
        self._closed = False
        self.started = 0

    def rehearse(self, item_id: str, path: str, size: int, timeout_s: float,
                 per_hour_s: float = 0.0) -> Rehearsal:
        """Run the native part of an item's work in the child and report whether the child died.

        Args:
            item_id: the manifest id.
            path: the fetched local file.
            size: its size in bytes.
            timeout_s: the child is killed after this long on this item...
            per_hour_s: ...plus this per hour of its media, which the child probes first and reports
                (``runtime.item_timeout_per_hour_s``: a film rehearsed is not timed out at a clip's limit).
        """
        with self._lock:
            if self._closed:
                raise ShutdownError("the rank is shutting down")
            start = time.monotonic()
            proc = self._child()
            mark = self._err.tell()
            limit, answer = timeout_s, None
            try:
                _send(proc.stdin, pickle.dumps((item_id, path, size)))
                probed = _receive(proc.stdout, timeout_s)  # the media's duration (None: not probed)
                if probed is not None:
                    limit += per_hour_s * (pickle.loads(probed) or 0.0) / 3600.0
                    answer = _receive(proc.stdout, max(0.0, start + limit - time.monotonic()))
            except OSError:  # a broken pipe, or no answer within the limit (TimeoutError)
                answer = None
            seconds = time.monotonic() - start
            if answer is not None:
                return Rehearsal(seconds=seconds, detail=answer.decode("utf-8", "replace")[-600:], limit_s=limit)
            timed_out = proc.poll() is None and seconds >= limit
            if timed_out:
                proc.kill()
            code = proc.wait()
            self._proc = None
            if self._closed:
                raise ShutdownError("the rank is shutting down; the rehearsal was cut off")
            detail = self._last_words(mark)
            if timed_out:
                return Rehearsal(timed_out=True, seconds=seconds, detail=detail, limit_s=limit)
            if -code in CRASH_SIGNALS:
                return Rehearsal(crashed=signal.Signals(-code).name, seconds=seconds, detail=detail)
            # another end (SIGTERM sent to the whole process group, a child that could not start) says nothing
            # about the item: the rehearsal is inconclusive, and the item runs in the job process, alone
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            log.warning("the rehearsal child ended with %s, which is not a crash; %s", how, detail[-300:])
            return Rehearsal(seconds=seconds, detail=f"inconclusive: the rehearsal child ended with {how}")

    def close(self) -> None:
        """Kill the child, without waiting for a rehearsal in progress (which then raises ``ShutdownError``)."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()

    def _child(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._err is None:
            import tempfile

            self._err = tempfile.TemporaryFile()  # the children's stderr (a crash's last words); gone on exit
        # the child imports this very package, also where it runs from a checkout that is not installed
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
        self._proc = subprocess.Popen([sys.executable, "-m", "pipeline.crashes"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._err, env=env)
        self.started += 1
        try:
            _send(self._proc.stdin, self._setup)
        except OSError:
            pass  # it ended already: the request that follows finds it gone, and says how it ended
        return self._proc

    def _last_words(self, mark: int) -> str:
        self._err.seek(mark)
        text = self._err.read()
        self._err.seek(0, os.SEEK_END)
        return _tail(text)


def rehearse(item_id: str, path: str, size: int, specs: list, video_cfg: Any, backends: list[str],
             timeout_s: float, per_hour_s: float = 0.0) -> Rehearsal:
    """One rehearsal in a child of its own (see ``Rehearser``)."""
    rehearser = Rehearser(specs, video_cfg, backends)
    try:
        return rehearser.rehearse(item_id, path, size, timeout_s, per_hour_s)
    finally:
        rehearser.close()


def _send(stream, payload: bytes) -> None:
    stream.write(len(payload).to_bytes(8, "little") + payload)
    stream.flush()


def _receive(stream, timeout_s: float | None) -> bytes | None:
    """One message, or None at end of stream; raises ``TimeoutError`` (an OSError) after ``timeout_s``."""
    import select

    def exactly(n: int) -> bytes | None:
        out = b""
        while len(out) < n:
            if timeout_s is not None and not select.select([stream], [], [], timeout_s)[0]:
                raise TimeoutError("no answer")
            chunk = os.read(stream.fileno(), n - len(out))
            if not chunk:
                return None
            out += chunk
        return out

    head = exactly(8)
    if head is None:
        return None
    return exactly(int.from_bytes(head, "little"))


def _tail(err: bytes | None) -> str:
    """The child's last words: from faulthandler's report where it crashed, the fatal error and the crashing
    thread's Python stack, innermost call first (``crashes.py:321 in _serve``); else the end of stderr."""
    text = (err or b"").decode("utf-8", "replace").strip()
    start = text.find("Fatal Python error")
    if start < 0:
        return text[-600:]
    report = text[start:].split("\nExtension modules:", 1)[0]
    fatal = report.splitlines()[0].strip()
    current = report.find("Current thread")
    stack = report[current:].split("\n\n", 1)[0].splitlines()[1:] if current >= 0 else []
    calls = []
    for line in stack:
        m = re.match(r'\s*File "(.*)", line (\d+) in (.*)', line)
        if m:
            calls.append(f"{os.path.basename(m.group(1))}:{m.group(2)} in {m.group(3)}")
    return (fatal + ("; at " + " < ".join(calls) if calls else ""))[:600]


def _serve(stdin, stdout) -> int:
    """The rehearsal child: builds the filters once, then runs every filter's ``rehearse`` on each item it is sent
    and answers with the item errors it saw (the job process types and reports those itself)."""
    import faulthandler

    faulthandler.enable()  # a crash prints the Python stack to stderr, which the parent keeps for the row
    os.dup2(2, 1)  # whatever a library prints goes to stderr; the answers keep the original stdout to themselves
    sys.stdout = sys.stderr
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # a scheduler's stop reaches the whole process group; the child ends when its parent closes the pipe (or
        # kills it), so that a stop of the job is never mistaken for the item's crash
        signal.signal(stop, signal.SIG_IGN)
    setup = _receive(stdin, None)
    if setup is None:
        return 0
    specs, video_cfg, backend_names = pickle.loads(setup)
    from pipeline.filters import build_filters, frame_requests_of
    from pipeline.filters.base import FilterContext
    from pipeline.media.item import MediaItem
    from pipeline.video.decoders import available_backends

    filters = build_filters(tuple(specs))
    requests = frame_requests_of(filters)
    backends = available_backends(tuple(backend_names)) if requests else []
    ctx = FilterContext("cpu", None)
    while True:
        message = _receive(stdin, None)
        if message is None:
            return 0
        item_id, path, size = pickle.loads(message)
        media = MediaItem(item_id, path, size, requests, video_cfg, backends, "cpu")
        try:  # the duration first: a film's rehearsal gets more time (``Rehearser.rehearse``)
            duration = media.info.duration_s
        except Exception:  # noqa: BLE001 - a file that does not probe: its filters report the error below
            duration = None
        _send(stdout, pickle.dumps(duration))
        errors = []
        for f in filters:
            try:
                f.rehearse(media, ctx)
            except Exception as e:  # noqa: BLE001 - an item error is not a crash: the job process reports it
                errors.append(f"{f.name}: {type(e).__name__}: {e}")
        _send(stdout, "\n".join(errors).encode("utf-8", "replace"))


if __name__ == "__main__":
    sys.exit(_serve(sys.stdin.buffer, os.fdopen(os.dup(1), "wb")))
