#!/usr/bin/env python
"""Where a job stands: ``python jobs/status.py --config configs/X.yaml [key=value ...] [--json]``.

Reads the output, the manifest, the lease and the crash ledger, and writes nothing: safe while a run is live.
Prints whether a run is live (host, pid, heartbeat), the items succeeded, failed by type and without a row, what
the next run would process, the part files and the crash ledger. Exit codes: 0, 2 bad config or manifest, 1 other.
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
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    args = parser.parse_args(argv)
    setup_logging(0, args.log_level)
    from pipeline.status import format_status, job_status

    try:
        status = job_status(load_config(args.config, args.overrides, work=False))
    except (ConfigError, ManifestError) as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    except Exception as e:  # noqa: BLE001 - a status that cannot be read says why
        log.exception("cannot read the job's status: %s: %s", type(e).__name__, e)
        return 1
    print(json.dumps(status, indent=2) if args.json else format_status(status), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
