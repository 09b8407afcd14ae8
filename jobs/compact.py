#!/usr/bin/env python
"""Merge a job's small part files into large ones: ``python jobs/compact.py --config configs/X.yaml [key=value ...]``.

It first removes second success rows of an item (a part that landed after its run gave it up as hung, while a rerun
redid its items), keeping the latest. Run it between runs, or after the last: it takes the output lease, so it refuses
while a run is live (exit code 3) and a run refuses while it compacts. A compaction killed part-way is finished
(forward or back) by the next compaction or the next run; no row is lost either way. Exit codes: 0 done, 2 bad config or
no output there, 3 output in use, 1 other.
"""

from __future__ import annotations

import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import job_arguments, load_config  # noqa: E402
from pipeline.errors import ConfigError, OutputLockedError  # noqa: E402
from pipeline.metrics import setup_logging  # noqa: E402

log = logging.getLogger("mediasieve")


def main(argv: list[str] | None = None) -> int:
    parser = job_arguments(__doc__)
    parser.add_argument("--target-mb", type=float, default=512.0,
                        help="about how large a merged part becomes; parts of half this or more are left alone")
    parser.add_argument("--row-group-rows", type=int, default=65536, help="rows per Parquet row group")
    parser.add_argument("--dry-run", action="store_true", help="print what would be merged, write nothing")
    args = parser.parse_args(argv)
    setup_logging(0, args.log_level)
    try:
        cfg = load_config(args.config, args.overrides, work=False)
        if args.target_mb <= 0 or args.row_group_rows < 1:
            raise ConfigError("--target-mb and --row-group-rows must be positive")
    except ConfigError as e:
        log.error("config error: %s", e)
        return 2

    from pipeline.compaction import compact
    from pipeline.resume import command_lease
    from pipeline.storage import SCRATCH_DIR

    out = cfg.output
    try:
        lease = command_lease(out, "compact")
    except ConfigError as e:
        log.error("%s: nothing to compact", e)
        return 2
    except OutputLockedError as e:
        log.error("%s", e)
        return 3
    try:
        scratch = os.path.join(cfg.storage.cache_dir, SCRATCH_DIR)
        report = compact(out.dir, out.storage_options, int(args.target_mb * (1 << 20)), args.row_group_rows, scratch,
                         args.dry_run, out.compression, cfg.input.id_column)
    except Exception as e:  # noqa: BLE001 - loud; nothing is lost (see pipeline.compaction)
        log.exception("compaction failed: %s: %s; every row is still in the output", type(e).__name__, e)
        return 1
    finally:
        lease.release()
    verb = "would merge" if args.dry_run else "merged"
    if report.duplicates_removed:
        print(f"{out.dir}: {'found' if args.dry_run else 'removed'} {report.duplicates_removed} second success row(s) "
              "of items (one success row per item is kept: the latest)", flush=True)
    print(f"{out.dir}: {verb} {report.merged} parts into {report.written} "
          f"({report.files_before} part files before, {report.files_after} after"
          + (f", {report.rows} rows, {report.bytes_written / 1e6:.1f} MB written" if not args.dry_run else "")
          + (f"; finished {report.pending_finished} interrupted compaction(s) first" if report.pending_finished else "")
          + ")", flush=True)
    if report.quarantined:
        print(f"{out.dir}: {'found' if args.dry_run else 'moved'} {report.quarantined} damaged part file(s) (cut "
              f"short, garbled, or failing their page checksums){'' if args.dry_run else ' to _quarantine/parts/'}: the next run redoes the items "
              "whose rows they held", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
