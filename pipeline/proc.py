"""Whether a process named in a file (a lease, a journal, a manifest spill) is still the one that wrote it."""

from __future__ import annotations

import os


def start_ticks(pid: int) -> int:
    """When process ``pid`` started, in clock ticks since boot (Linux; 0 where unknown).

    With the pid it names one process, where a pid alone may be reused: at once, in a restarted container's fresh
    pid namespace, where the dead process's pid often goes to a live process of the new container.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        return int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22, counted after the command name
    except (OSError, ValueError, IndexError):
        return 0


def boot_time() -> float | None:
    """When this machine's kernel booted (``/proc/stat``'s ``btime``, Unix time; a container shares its host's
    kernel, and so its page cache), or None where unknown."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def is_alive(pid: int, ticks: int = 0) -> bool:
    """Whether ``pid`` runs on this host and, where ``ticks`` is known, is the process that started then."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except (OverflowError, ValueError):
        return False
    return ticks == 0 or start_ticks(pid) in (0, ticks)


def process_tag(pid: int | None = None) -> str:
    """``<pid>-<start ticks>`` of this process (or ``pid``), for file names; ``parse_process_tag`` reads it back."""
    pid = os.getpid() if pid is None else pid
    return f"{pid}-{start_ticks(pid)}"


def parse_process_tag(text: str) -> tuple[int, int]:
    """``(pid, ticks)`` from ``process_tag``'s text, or from a bare pid (ticks 0); raises ValueError otherwise."""
    pid, _, ticks = text.partition("-")
    return int(pid), int(ticks or 0)


def exit_now(code: int) -> None:
    """End this process with ``code`` once its exit handlers have run, skipping the interpreter's teardown.

    The teardown frees every module and runs the native libraries' destructors: 0.5-0.7 s per process once torch
    is loaded (measured here; 0.05 s without it), a cost on every rank of every start and restart that does
    nothing for us. The ``atexit`` handlers (``logging.shutdown``, fsspec's and pyarrow's own, multiprocessing's
    join of its children) still run, and the standard streams are flushed; what the job writes is closed before
    its ``main`` returns, and every thread it starts is a daemon, which the teardown would not wait for either.
    """
    import atexit
    import sys

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):
            pass  # closed, or gone (a reader that went away)
    os._exit(code)
