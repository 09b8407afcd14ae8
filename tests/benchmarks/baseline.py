"""A benchmark side by side with a git revision: a worktree of the revision, and each side measured in its own
process (``--code TREE ... --json FILE``), so that the two never share an import."""

from __future__ import annotations

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
