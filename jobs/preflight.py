#!/usr/bin/env python
"""Rehearse a job before submitting it: ``python jobs/preflight.py --config configs/X.yaml [key=value ...]
[--items 16] [--world-size 64] [--json]``, with the job's own config and overrides, on a machine like the job's
(a login node with the job's image, or one GPU of the cluster).

Checks the output (writable; no live run; resumed, new, or refused as a different job, models' digests included),
then runs the real job in one process on ``--items`` random rows of the manifest into a scratch directory: the
tiers fetch, the models load, the filters run. Prints what failed and why, the seconds per item, and the hours the
whole manifest would take at that pace on ``--world-size`` ranks. Writes nothing to the output but a probe file,
removed at once. Exit codes: 0 ready, 1 a problem (named), 2 bad config or manifest.
"""

from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import job_arguments, load_config  # noqa: E402
from pipeline.errors import ConfigError, ManifestError  # noqa: E402
from pipeline.metrics import setup_logging  # noqa: E402

log = logging.getLogger("mediasieve")


def main(argv: list[str] | None = None) -> int:
    parser = job_arguments(__doc__, log_level="WARNING")
    parser.add_argument("--items", type=int, default=16, help="manifest rows to run (default 16)")
    parser.add_argument("--world-size", type=int, default=1, help="the ranks the job will run on, for the estimate")
    parser.add_argument("--seed", type=int, default=0, help="the sample's random seed")
    parser.add_argument("--scratch", default=None, help="where the sample's media, models and rows go (default: a "
                        "temporary directory, removed after; the sample's media can be large)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    setup_logging(0, args.log_level)
    if args.items < 1 or args.world_size < 1:
        log.error("--items and --world-size must be at least 1")
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        from pipeline.preflight import format_preflight, preflight

        report = preflight(cfg, args.items, args.world_size, args.seed, args.scratch)
    except (ConfigError, ManifestError) as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    print(json.dumps(report, indent=2, default=str) if args.json else format_preflight(report), flush=True)
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    from pipeline.proc import exit_now

    exit_now(main())
