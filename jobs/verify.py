#!/usr/bin/env python
"""Check that a job's output holds what was written: ``python jobs/verify.py --config configs/X.yaml [key=value ...]``.

Reads every part file whole, each page against the checksum it was written with, and names every part that is
damaged: cut short, garbled, or holding a page whose bytes changed after the commit (a flipped bit reads as another
value in DuckDB, Polars and Spark, none of which checks). Run it before handing a table over. It writes nothing and
is safe while a run is live; ``--quarantine`` also moves the damaged parts to ``_quarantine/parts/`` (taking the
output lease, like compaction), so that the next run redoes their items. Exit codes: 0 every part whole; 4 damaged
parts found (moved with ``--quarantine``: rerun the job to redo their items); 1 parts the store would not give, or
another error; 2 bad config or no output there; 3 output in use (``--quarantine``).
"""

from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import job_arguments, load_config  # noqa: E402
from pipeline.errors import ConfigError, OutputLockedError  # noqa: E402
from pipeline.metrics import setup_logging  # noqa: E402

log = logging.getLogger("mediasieve")

DAMAGED = 4


def main(argv: list[str] | None = None) -> int:
    parser = job_arguments(__doc__, log_level="WARNING")
    parser.add_argument("--quarantine", action="store_true",
                        help="move damaged parts to _quarantine/parts/ (takes the output lease)")
    parser.add_argument("--threads", type=int, default=4, help="parts read at once (each held whole in memory)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    setup_logging(0, args.log_level)
    try:
        cfg = load_config(args.config, args.overrides, work=False)
        if args.threads < 1:
            raise ConfigError("--threads must be at least 1")
    except ConfigError as e:
        log.error("config error: %s", e)
        return 2

    from pipeline.quarantine import quarantine, quarantined, verify_parts
    from pipeline.resume import command_lease, existing_output, part_files

    out = cfg.output
    try:
        fs, root = existing_output(out)
        lease = command_lease(out, "verify") if args.quarantine else None
    except ConfigError as e:
        log.error("%s: nothing to verify", e)
        return 2
    except OutputLockedError as e:
        log.error("%s", e)
        return 3
    try:
        files = sorted(part_files(fs, root))
        report = verify_parts(fs, files, args.threads)
        if report.damaged and lease is not None:
            quarantine(fs, root, report.damaged, lease.run_id)
        earlier = len(quarantined(fs, root)) - (len(report.damaged) if lease is not None else 0)
    except Exception as e:  # noqa: BLE001 - loud; nothing was changed but the moves it logged
        log.exception("verification failed: %s: %s", type(e).__name__, e)
        return 1
    finally:
        if lease is not None:
            lease.release()
    moved = lease is not None
    if args.json:
        print(json.dumps({"output_dir": out.dir, "parts": report.parts, "rows": report.rows, "bytes": report.bytes,
                          "seconds": round(report.seconds, 3), "damaged": {p.rsplit("/", 1)[-1]: why for p, why in
                                                                          report.damaged.items()},
                          "damaged_rows": report.damaged_rows, "moved": moved and bool(report.damaged),
                          "unchecked": len(report.unchecked), "unread": report.unread, "gone": report.gone,
                          "quarantined_earlier": earlier}, indent=2), flush=True)
    else:
        pace = report.bytes / 1e6 / report.seconds if report.seconds > 0 else 0.0
        print(f"{out.dir}: read {report.parts} part files whole ({report.rows + report.damaged_rows} rows, "
              f"{report.bytes / 1e6:.1f} MB, {report.seconds:.1f} s, {pace:.0f} MB/s)", flush=True)
        for path, why in sorted(report.damaged.items()):
            print(f"  DAMAGED {path.rsplit('/', 1)[-1]}: {why}", flush=True)
        if report.damaged:
            print(f"{out.dir}: {len(report.damaged)} damaged part file(s), {report.damaged_rows} rows; "
                  + ("moved to _quarantine/parts/: rerun the job to redo their items" if moved else
                     "python jobs/verify.py --quarantine (or jobs/compact.py, for those it merges) moves them, and the "
                     "next run redoes their items"), flush=True)
        elif report.parts:
            print(f"{out.dir}: every part reads whole" + ("" if report.unchecked else
                                                           ", every page matching its checksum"), flush=True)
        if report.unchecked:
            print(f"{out.dir}: {len(report.unchecked)} part file(s) carry no page checksums (written by an earlier "
                  "version): they parse, but their values could not be checked", flush=True)
        for path, why in sorted(report.unread.items()):
            print(f"  UNREAD {path.rsplit('/', 1)[-1]}: {why} (the store's error: run it again)", flush=True)
        if report.gone:
            print(f"{out.dir}: {report.gone} part file(s) listed were gone when read (compacted or moved meanwhile)",
                  flush=True)
        if earlier:
            print(f"{out.dir}: {earlier} damaged part file(s) moved to _quarantine/parts/ earlier", flush=True)
    if report.damaged:
        return DAMAGED
    return 1 if report.unread else 0


if __name__ == "__main__":
    sys.exit(main())
