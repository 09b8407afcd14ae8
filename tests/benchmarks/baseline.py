"""A benchmark side by side with a git revision: a worktree of the revision, and each side measured in its own
process (``--code TREE ... --json FILE``), so that the two never share an import."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@contextlib.contextmanager
def worktree(rev: str) -> Iterator[str]:
    """A detached git worktree of ``rev`` for the ``with`` block, removed after it."""
    tree = tempfile.mkdtemp(prefix="bench-baseline-")
    subprocess.run(["git", "-C", ROOT, "worktree", "add", "--detach", tree, rev], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield tree
    finally:
        subprocess.run(["git", "-C", ROOT, "worktree", "remove", "--force", tree], check=False)


def run_side(script: str, code: str, args: list[str], quiet: bool = False) -> dict:
    """``script --code CODE ARGS --json FILE`` in a fresh process (the script measures with ``code`` first on its
    import path and writes its result to FILE); that result. ``quiet``: its stderr is dropped."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, os.path.abspath(script), "--code", code, *args, "--json", out.name],
                       check=True, stderr=subprocess.DEVNULL if quiet else None)
        with open(out.name) as f:
            return json.load(f)


def classifier_sides(doc: str, seconds: float, size: str, flags: dict[str, str] | None = None) -> argparse.Namespace:
    """The arguments of a benchmark of clip classifiers on a generated clip, side by side with a revision:
    ``--seconds`` and ``--size`` of the clip, the models' ``--frames`` and ``--image-size``, ``--baseline``, the
    benchmark's own ``flags`` (name: help); and, hidden, one side's (``--code``, ``--clip``, ``--models``,
    ``--json``: what ``run_side`` passes)."""
    parser = argparse.ArgumentParser(description=doc)
    for flag, text in (flags or {}).items():
        parser.add_argument(flag, action="store_true", help=text)
    parser.add_argument("--seconds", type=float, default=seconds)
    parser.add_argument("--size", default=size)
    parser.add_argument("--frames", type=int, default=16, help="the models' frames per window")
    parser.add_argument("--image-size", type=int, default=224, help="the models' input size")
    parser.add_argument("--baseline", required=True, help="a git revision to compare with (run from a worktree)")
    for hidden in ("--code", "--clip", "--models", "--json"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    return parser.parse_args()


def one_side(args: argparse.Namespace, measure) -> bool:
    """Where ``args`` are one side's (``run_side``): ``measure(code, clip, models)`` written to its JSON file, and
    True; else False."""
    if not args.json:
        return False
    with open(args.json, "w") as f:
        json.dump(measure(args.code, args.clip, json.loads(args.models)), f)
    return True


def classifier_runs(script: str, args: argparse.Namespace, clip: str, names: list[str]) -> tuple[dict, dict]:
    """``script``'s two sides on ``clip`` with a random narrow backbone per classifier of ``names`` (the args'
    ``--frames`` and ``--image-size``, seeds in order, made beside the clip): this checkout's and ``--baseline``'s
    (a worktree), each in a process of its own."""
    from tests.video.tiny_models import tiny_videomae

    d = os.path.dirname(clip)
    models = {name: tiny_videomae(os.path.join(d, name), num_frames=args.frames, image_size=args.image_size, seed=i)
              for i, name in enumerate(names)}
    side_args = ["--clip", clip, "--models", json.dumps(models), "--baseline", args.baseline]
    now = run_side(script, ROOT, side_args, quiet=True)
    with worktree(args.baseline) as tree:
        return now, run_side(script, tree, side_args, quiet=True)
