"""Part files that are no longer whole Parquet: found where a read of the output fails, moved out of ``parts/``.

Every part is committed whole (a renamed temporary file, one PUT), but what happens to it after is outside the job:
a node that loses power after a rename whose data its filesystem had not yet written leaves a part of zero bytes
or cut short (ext4 and XFS write a new file's data late; Lustre and NFS clients cache it), a disk or a copy can
damage pages, and a user can drop a stray file in. One such part stopped every later run before any work
("cannot read the committed output ... rerun to resume", which failed again each time), and ``jobs/status.py``,
compaction and every reader with it.

A part is judged damaged only by reading it whole into memory and parsing every row group there, each page checked
against its checksum (``part_format``), which no network fault can make fail; a part that reads is never moved. The
run (under its lease) and compaction move a damaged part to ``<output>/_quarantine/parts/`` with a note of why, so
that its items, whose rows are no longer readable, are redone and readers see whole parts again; nothing is deleted.
``jobs/status.py`` only names them.

A run and compaction find what their reads reach: the resume scan reads two columns, so damage in the others (a
flipped bit in a page of scores) is found only by a read of every column. ``verify_parts`` (``jobs/verify.py``) is
that read: every part whole, every page against its checksum.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

import pyarrow as pa

from pipeline import part_format
from pipeline.writer import commit_bytes, is_local_fs

log = logging.getLogger(__name__)

QUARANTINE_DIR = "_quarantine/parts"
READ_ERRORS = (pa.ArrowException, OSError, ValueError)
"""What a read of Parquet raises on a damaged file: ``ArrowInvalid`` (a ``ValueError``) where the footer is gone
(zero bytes, cut short), ``OSError`` where a page or the footer's Thrift does not parse; also what a network fault
raises, which ``part_fault`` tells apart."""
SWEEP_THREADS = 4
"""Parts checked at once where a failed read named none: each holds one part's bytes (up to a compacted part's
512 MB) while it parses."""

T = TypeVar("T")


@dataclass
class PartCheck:
    """What reading one part whole found (``check_part``)."""

    path: str
    bytes: int
    rows: int
    """Rows in its footer (0 where the footer does not parse)."""
    checksums: bool
    """Its pages carry checksums (``part_format``), so every value read was verified; False for parts of earlier
    versions, whose values no reader can check."""
    fault: str | None
    """Why it is damaged; None where it reads whole."""


def check_part(fs, path: str) -> PartCheck:
    """Read the part at ``path`` whole into memory and parse every row group there, each page verified against its
    checksum where it has one, so the verdict is the file's, not the network's. A page that fails its checksum is
    read again first: bytes garbled on the way (a link without TLS, a bad NIC) come right the second time, a damaged
    file does not.

    Raises:
        OSError: the bytes could not be read (a fault of the store, or the part is gone: no verdict).
    """
    checked = _parse_whole(path, fs.cat_file(path))
    if checked.fault is not None and part_format.CHECKSUM_ERROR in checked.fault:
        checked = _parse_whole(path, fs.cat_file(path))
    return checked


def _parse_whole(path: str, data: bytes) -> PartCheck:
    rows, checksums = 0, False
    try:
        parquet = part_format.open_file(pa.BufferReader(data))
        rows, checksums = parquet.metadata.num_rows, part_format.has_checksums(parquet.metadata)
        for group in range(parquet.num_row_groups):
            parquet.read_row_group(group, use_threads=False)  # no Arrow task left running after an error
    except READ_ERRORS as e:
        said = f"{type(e).__name__}: {str(e).strip()}"
        if part_format.CHECKSUM_ERROR in said:
            said = f"a page's bytes do not match its checksum, so its values are not those written ({said})"
        return PartCheck(path, len(data), rows, checksums, said)
    return PartCheck(path, len(data), rows, checksums, None)


def part_fault(fs, path: str) -> str | None:
    """Why the part at ``path`` is not whole Parquet, or None where it reads (``check_part``).

    Raises:
        OSError: the bytes could not be read (a fault of the store: no verdict).
    """
    return check_part(fs, path).fault


def fault_or_none(fs, path: str) -> str | None:
    """``part_fault``, None where the store could not give the bytes (no verdict: the part is left where it is)."""
    try:
        return part_fault(fs, path)
    except (OSError, ValueError) as e:  # read again at the next attempt; not moved on a fault of the store
        log.warning("cannot read %s to check it: %s: %s", path, type(e).__name__, e)
        return None


def damaged_parts(fs, files: list[str], error: BaseException, sweep: bool) -> dict[str, str]:
    """The parts among ``files`` that ``error`` (raised by a read of them) came from and that are damaged, with why.

    Arrow names the file it could not open (no footer, zero bytes); those are checked alone. An error in a page
    names none: with ``sweep`` every part is then checked (reading the whole output once), else none is.
    """
    message = str(error)
    named = [f for f in files if f in message]
    candidates = named or (files if sweep else [])
    if not candidates:
        return {}
    if not named:
        log.warning("a read of the output failed twice with the same error, which names no part (%s): checking "
                    "its %d part files one by one", message.strip().splitlines()[0][:200], len(files))
    with ThreadPoolExecutor(max_workers=min(SWEEP_THREADS, len(candidates)), thread_name_prefix="check") as pool:
        faults = list(pool.map(lambda p: fault_or_none(fs, p), candidates))
    return {path: why for path, why in zip(candidates, faults) if why is not None}


def quarantine(fs, root: str, faults: dict[str, str], by: str | None) -> None:
    """Move each damaged part (``{path: why}``) to ``<root>/_quarantine/parts/`` with ``<name>.json`` saying why,
    when and by whom (``by``: a run id, or "compaction"). Nothing is deleted: a part already there under that name
    is kept beside it. With ``by`` None (a reader that holds no lease: ``jobs/status.py``, a dry run) each is only
    named in the log."""
    if by is None:
        for path, why in faults.items():
            log.error("the part file %s is damaged (%s); the next run or jobs/compact.py moves it to %s, and the next "
                      "run redoes its items", path, why, QUARANTINE_DIR)
        return
    folder = f"{root.rstrip('/')}/{QUARANTINE_DIR}"
    if is_local_fs(fs):
        fs.makedirs(folder, exist_ok=True)
    for path, why in faults.items():
        name = path.rsplit("/", 1)[-1]
        note = {"part": name, "why": why, "by": by, "host": socket.gethostname(),
                "at": dt.datetime.now(dt.timezone.utc).isoformat()}
        target = f"{folder}/{name}"
        if fs.exists(target):
            target = f"{folder}/{name}.{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S%f}"
        commit_bytes(fs, f"{target}.json", json.dumps(note, indent=1).encode(), f"{root.rstrip('/')}/_tmp")
        fs.mv(path, target)
        log.error("the part file %s is damaged (%s): moved to %s; the items whose rows it held are redone", path,
                  why, target)


def quarantined(fs, root: str) -> list[str]:
    """The parts moved to the quarantine so far."""
    try:
        return sorted(p for p in fs.find(f"{root.rstrip('/')}/{QUARANTINE_DIR}") if not p.endswith(".json"))
    except FileNotFoundError:
        return []


def read_past_damaged(fs, root: str, files: list[str], read: Callable[[list[str]], T], by: str | None
                      ) -> tuple[T, list[str], dict[str, str]]:
    """``read(files)``, leaving out the damaged parts a failure of it comes from.

    Where ``read`` fails on parts that ``damaged_parts`` finds damaged, they are moved to the quarantine (``by``
    names who moved them) or, with ``by`` None (a reader that holds no lease: ``jobs/status.py``), only left out,
    and ``read`` runs again over the rest. An error that no damaged part explains is retried once (a fault of the
    store rarely repeats itself, a damaged page always does); where it comes back the same and names no part, every
    part is then checked one by one.

    Returns:
        ``(read's result, the files it read, {damaged part: why})``.

    Raises:
        Whatever ``read`` raised where no damaged part explains it.
    """
    found: dict[str, str] = {}
    last, fruitless = None, 0
    while True:
        try:
            return read(files), files, found
        except READ_ERRORS as e:
            again = last is not None and str(e) == last
            bad = damaged_parts(fs, files, e, sweep=again)
            if not bad:
                fruitless += 1
                if again or fruitless > 2:
                    raise
                last = str(e)
                continue
            last, fruitless = None, 0
            quarantine(fs, root, bad, by)
            found.update(bad)
            files = [f for f in files if f not in bad]


@dataclass
class VerifyReport:
    """What ``verify_parts`` found."""

    parts: int = 0
    rows: int = 0
    bytes: int = 0
    seconds: float = 0.0
    unchecked: list[str] = field(default_factory=list)
    """Parts that read whole but carry no page checksums (written by an earlier version): their values are
    unverified."""
    damaged: dict[str, str] = field(default_factory=dict)
    """Part -> why it is damaged."""
    damaged_rows: int = 0
    """Rows the damaged parts' footers count, where their footers read: the rows the next run redoes."""
    unread: dict[str, str] = field(default_factory=dict)
    """Part -> the store's error: no verdict on it."""
    gone: int = 0
    """Parts listed that were gone when read (compacted or moved meanwhile)."""


def verify_parts(fs, files: list[str], threads: int = SWEEP_THREADS) -> VerifyReport:
    """Read every part in ``files`` whole, each page against its checksum (``check_part``), ``threads`` at a time
    (each holds one part's bytes and one row group's rows). Moves nothing.

    Args:
        fs: the output's filesystem.
        files: the part files.
        threads: parts read at once.
    """
    report = VerifyReport()
    started = time.monotonic()

    def check(path: str) -> PartCheck | BaseException:
        try:
            return check_part(fs, path)
        except (OSError, ValueError) as e:  # the store's fault, or gone: no verdict
            return e

    with ThreadPoolExecutor(max_workers=max(1, min(threads, len(files) or 1)), thread_name_prefix="verify") as pool:
        for path, done in zip(files, pool.map(check, files)):
            if isinstance(done, FileNotFoundError):
                report.gone += 1
                continue
            if isinstance(done, BaseException):
                report.unread[path] = f"{type(done).__name__}: {done}"
                continue
            report.parts += 1
            report.bytes += done.bytes
            if done.fault is not None:
                report.damaged[path] = done.fault
                report.damaged_rows += done.rows
            else:
                report.rows += done.rows
                if not done.checksums:
                    report.unchecked.append(path)
    report.seconds = time.monotonic() - started
    return report
