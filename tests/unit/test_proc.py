"""``pipeline.proc.exit_now``: the job's processes end without the interpreter's teardown, and lose nothing by it."""

import subprocess
import sys

from tests.conftest import ROOT

CHILD = """
import atexit, logging, sys
from pipeline.proc import exit_now
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
logging.getLogger("x").info("logged before the exit")
atexit.register(lambda: print("an exit handler ran"))
sys.stdout.write("written, not flushed; ")
exit_now(7)
"""


def test_exit_now_keeps_the_exit_code_runs_the_exit_handlers_and_flushes(tmp_path):
    log = tmp_path / "log.txt"
    proc = subprocess.run([sys.executable, "-c", CHILD, str(log)], capture_output=True, text=True, cwd=ROOT,
                          timeout=60)
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "written, not flushed; an exit handler ran\n"
    assert "logged before the exit" in log.read_text()
