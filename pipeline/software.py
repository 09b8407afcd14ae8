"""The software a rank runs, where it changes what a row says: the packages that decode, resample and infer, and the
FFmpeg libraries under PyAV. A cluster whose nodes run different images mixes their rows silently; a job that is
upgraded between runs makes the rows of its runs differently. Both are recorded, and the first is said at the start.
"""

from __future__ import annotations

import functools
import importlib.metadata
import logging
import os
import platform
from typing import Any

from pipeline.distributed import ranks_by_value, ranks_shown

log = logging.getLogger(__name__)

PACKAGES = ("mediasieve", "torch", "torchvision", "numpy", "av", "torchcodec", "decord", "pillow", "silero-vad",
            "onnxruntime-gpu", "onnx", "transformers", "ultralytics", "pyarrow")
"""The distributions whose versions are recorded (absent ones are left out)."""


@functools.cache
def software_versions() -> dict[str, str]:
    """This process's versions of ``PACKAGES``, Python, CUDA as torch was built for it, and FFmpeg's libavcodec,
    libavformat and libswresample as PyAV loaded them (``av.library_versions``). Read once per process: do not
    change the returned mapping."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    commit = checkout_commit(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if commit:
        out["mediasieve_commit"] = commit
    try:
        import torch

        out["cuda"] = str(torch.version.cuda)
    except ImportError:
        pass
    try:
        import av

        for lib in ("libavcodec", "libavformat", "libswresample"):
            if lib in av.library_versions:
                out[lib] = ".".join(str(v) for v in av.library_versions[lib])
    except ImportError:
        pass
    return out


def checkout_commit(root: str) -> str | None:
    """The commit checked out at ``root`` where the code runs from a git checkout (an editable install's version
    says 0.1.0 whatever the commit), read from ``.git`` without running git; None elsewhere."""
    git = os.path.join(root, ".git")
    try:
        if os.path.isfile(git):  # a worktree or submodule: "gitdir: <path>"
            with open(git) as f:
                git = os.path.join(root, f.read().split(":", 1)[1].strip())
        with open(os.path.join(git, "HEAD")) as f:
            head = f.read().strip()
        if not head.startswith("ref: "):
            return head  # detached
        ref = head[5:]
        for base in (git, _common_dir(git)):
            path = os.path.join(base, ref)
            if os.path.isfile(path):
                with open(path) as f:
                    return f.read().strip()
            packed = os.path.join(base, "packed-refs")
            if os.path.isfile(packed):
                with open(packed) as f:
                    for line in f:
                        if line.rstrip().endswith(" " + ref):
                            return line.split()[0]
    except (OSError, IndexError):
        pass
    return None


def _common_dir(git: str) -> str:
    """A worktree's shared git directory, where its branches are."""
    try:
        with open(os.path.join(git, "commondir")) as f:
            return os.path.normpath(os.path.join(git, f.read().strip()))
    except OSError:
        return git


def distinct_software(per_rank: list[dict[str, str]]) -> list[dict[str, Any]]:
    """The distinct version sets among the ranks' (in rank order), each with the ranks that run it."""
    return [{"versions": versions, "ranks": ranks} for versions, ranks in ranks_by_value(enumerate(per_rank))]


def differences(sets: list[dict[str, Any]]) -> dict[str, dict[str, list[int]]]:
    """Per package whose version differs between the ranks: each version and the ranks on it."""
    names = sorted({k for s in sets for k in s["versions"]})
    out: dict[str, dict[str, list[int]]] = {}
    for name in names:
        by_version: dict[str, list[int]] = {}
        for s in sets:
            by_version.setdefault(s["versions"].get(name, "absent"), []).extend(s["ranks"])
        if len(by_version) > 1:
            out[name] = {v: sorted(r) for v, r in by_version.items()}
    return out


def changes_between(before: list[dict[str, str]], now: list[dict[str, str]]) -> dict[str, tuple[str, str]]:
    """Per package whose versions differ between two runs' distinct version sets (``software_history`` entries):
    its versions then and now, each a comma-joined list where the ranks of a run differed ("absent": not installed)."""
    out = {}
    for name in sorted({k for s in before + now for k in s}):
        then = ", ".join(sorted({s.get(name, "absent") for s in before}))
        current = ", ".join(sorted({s.get(name, "absent") for s in now}))
        if then != current:
            out[name] = (then, current)
    return out


def said(changes: dict[str, tuple[str, str]]) -> str:
    """``changes_between``'s result in a line: ``torch 2.14.1 -> 2.15.0; libavcodec 61.19.100 -> 62.3.100``."""
    return "; ".join(f"{name} {then} -> {now}" for name, (then, now) in changes.items())


def warn_if_mixed(sets: list[dict[str, Any]], fail: bool = False) -> None:
    """Log, on rank 0, that the ranks do not all run the same software, and what differs.

    Raises:
        ConfigError: they differ and ``fail`` (``runtime.mixed_software: fail``).
    """
    diff = differences(sets)
    if diff:
        by_rank = "; ".join(f"{name} " + ", ".join(f"{v} on ranks {ranks_shown(r)}" for v, r in by.items())
                            for name, by in diff.items())
        if fail:
            from pipeline.errors import ConfigError

            raise ConfigError(f"the ranks do not run the same software ({by_rank}), and runtime.mixed_software is "
                              "fail: give every node the same image")
        log.warning("the ranks do not run the same software (%s): their rows may differ for the same input; "
                    "summary.json's software lists each set (runtime.mixed_software=fail stops instead)", by_rank)

