#!/usr/bin/env python
"""The mediasieve job: ``torchrun --nproc_per_node=N jobs/run.py --config configs/X.yaml [key.sub=value ...]``.

Plain ``python jobs/run.py ...`` is the same job with one process. Exit codes: 0 done, 2 bad config or input,
3 output directory in use, 143 stopped by a signal (rerun to resume), 1 any other failure. torchrun itself ends
with 1 whatever its workers' codes: where ``MEDIASIEVE_EXIT_CODE_FILE`` is set, each node's local rank 0 writes its
code there, for a launcher to end with (``launch/k8s/indexed-job.yaml``: a config error fails the Job at once).
"""

from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.config import job_arguments, load_config  # noqa: E402
from pipeline.errors import ConfigError, ManifestError, MediasieveError, OutputLockedError  # noqa: E402
from pipeline.metrics import setup_logging  # noqa: E402

log = logging.getLogger("mediasieve")


def format_summary(summary: dict) -> str:
    """A short human-readable account of the run summary."""
    run, total = summary["this_run"], summary["total"]
    skipped = "already done" if run.get("retry_failed", True) is True else \
        "skipped (already done, or failed and not retried)"
    lines = [
        f"mediasieve run {summary['run_id']} on {summary['world_size']} rank(s)",
        f"  this run : {run['items']} items ({run['succeeded']} ok, {run['failed']} failed) in {run['wall_s']:.1f}s"
        f" = {run['items_per_s'] or 0:.2f} items/s; {run['skipped_already_done']} {skipped}",
        f"  tiers    : {json.dumps(run['tier_hits'])}",
        f"  overall  : {summary['manifest_items']} items, {total['succeeded']} succeeded, {total['failed']} failed"
        f" {json.dumps(total['failures_by_type'])}",
        f"  output   : {summary['output_dir']} (summary.json, failures.jsonl, parts/)",
    ]
    damaged = run.get("corrupt_media") or {}
    if any(damaged.values()) or run.get("damaged_items"):
        lines.insert(3, f"  damaged  : {run.get('damaged_items', 0)} item(s) succeeded with damage (corrupt stretches "
                        "or cut short: their rows' result_info.corrupt_spans); "
                        f"{damaged.get('video_frames_lost', 0)} video frames held and "
                        f"{damaged.get('audio_packets_lost', 0)} audio packets silenced in corrupt stretches decoded "
                        "past (the warnings in the log name the items)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = job_arguments(__doc__)
    parser.add_argument("--strict-gpu", action="store_true",
                        help="any fallback from a requested GPU provider, or a CUDA failure, is fatal")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    setup_logging(rank, args.log_level)
    try:
        cfg = load_config(args.config, args.overrides + (["runtime.strict_gpu=true"] if args.strict_gpu else []))
    except ConfigError as e:
        log.error("config error: %s", e)
        return 2

    from pipeline.runner import run_job  # torch is imported only after the config is known to be good

    try:
        outcome = run_job(cfg, install_signal_handlers=True)
    except (ConfigError, ManifestError) as e:
        log.error("%s: %s", type(e).__name__, e)
        return 2
    except OutputLockedError as e:
        log.error("%s", e)
        return 3
    except MediasieveError as e:  # a system failure (stall, GPU failure in strict mode): loud, committed rows kept
        log.exception("%s: %s; committed rows are kept, rerun to resume", type(e).__name__, e)
        return 1
    if outcome.interrupted:
        log.warning("stopped before the end; committed rows are kept: rerun the same command to resume")
        return 143
    if outcome.summary is not None:
        print(format_summary(outcome.summary), flush=True)
    return 0


def say_exit_code(code: int | None) -> None:
    """Write ``code`` to ``MEDIASIEVE_EXIT_CODE_FILE`` on a node's local rank 0 (None: remove what an earlier
    attempt of torchrun's left there); nothing where the variable is not set."""
    path = os.environ.get("MEDIASIEVE_EXIT_CODE_FILE")
    if not path or int(os.environ.get("LOCAL_RANK", 0)) != 0:
        return
    try:
        if code is None:
            if os.path.exists(path):
                os.remove(path)
            return
        with open(f"{path}.tmp", "w") as f:
            f.write(f"{code}\n")
        os.replace(f"{path}.tmp", path)
    except OSError as e:  # the launcher then ends with torchrun's own code
        log.warning("cannot write the exit code to %s: %s", path, e)


if __name__ == "__main__":
    from pipeline.proc import exit_now

    say_exit_code(None)
    code = main()
    say_exit_code(code)
    exit_now(code)  # without the 0.5-0.7 s teardown of torch's libraries
