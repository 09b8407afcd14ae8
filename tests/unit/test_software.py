"""What the ranks run: their distinct version sets and what differs between them."""

import importlib.metadata
import logging

import pytest

from pipeline.errors import ConfigError
from pipeline.software import (
    changes_between,
    differences,
    distinct_software,
    said,
    software_versions,
    warn_if_mixed,
)


def test_this_process_reports_its_packages_and_ffmpeg():
    import av

    v = software_versions()
    assert v["mediasieve"] == importlib.metadata.version("mediasieve")
    assert v["torch"] == importlib.metadata.version("torch") and v["av"] == av.__version__
    assert v["libavcodec"] == ".".join(map(str, av.library_versions["libavcodec"]))


def test_distinct_sets_name_their_ranks_and_what_differs(caplog):
    a = {"torch": "2.14.1", "libavcodec": "61.19.100", "av": "18.1.0"}
    b = {**a, "libavcodec": "60.31.102"}
    c = {k: v for k, v in a.items() if k != "av"}
    sets = distinct_software([a, b, a, c])
    assert [s["ranks"] for s in sets] == [[0, 2], [1], [3]]
    assert differences(sets) == {"av": {"18.1.0": [0, 1, 2], "absent": [3]},
                                 "libavcodec": {"61.19.100": [0, 2, 3], "60.31.102": [1]}}
    with caplog.at_level(logging.WARNING, logger="pipeline.software"):
        warn_if_mixed(sets)
    assert ("av 18.1.0 on ranks 0,1,2, absent on ranks 3; libavcodec 61.19.100 on ranks 0,2,3, 60.31.102 on ranks 1"
            in caplog.text)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.software"):
        warn_if_mixed(distinct_software([a, a]), fail=True)  # the same software: nothing to say, nothing to stop
    assert caplog.text == ""
    with pytest.raises(ConfigError, match=r"\(av 18.1.0 on ranks 0,1,2, absent on ranks 3; .*runtime.mixed_software is "
                                          "fail: give every node the same image"):
        warn_if_mixed(sets, fail=True)


def test_the_commit_of_a_checkout_is_read_as_git_says_it(tmp_path):
    import subprocess

    from pipeline.software import checkout_commit

    def git(*args, cwd=tmp_path / "repo"):
        return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=cwd, check=True,
                              capture_output=True, text=True).stdout.strip()

    (tmp_path / "repo").mkdir()
    git("init", "-q", "-b", "main")
    assert checkout_commit(str(tmp_path / "repo")) is None  # no commit yet
    git("commit", "-q", "--allow-empty", "-m", "one")
    first = git("rev-parse", "HEAD")
    assert checkout_commit(str(tmp_path / "repo")) == first  # a loose ref
    git("pack-refs", "--all")
    assert checkout_commit(str(tmp_path / "repo")) == first  # a packed one
    git("commit", "-q", "--allow-empty", "-m", "two")
    git("worktree", "add", "-q", "--detach", str(tmp_path / "wt"), first)
    assert checkout_commit(str(tmp_path / "wt")) == first  # a worktree, detached
    git("checkout", "-q", "-b", "side", cwd=tmp_path / "wt")
    assert checkout_commit(str(tmp_path / "wt")) == first  # a worktree's branch, in the shared directory
    assert checkout_commit(str(tmp_path / "repo")) == git("rev-parse", "HEAD") != first
    assert checkout_commit(str(tmp_path)) is None


def test_a_change_between_two_runs_names_each_package_then_and_now():
    a = {"torch": "2.14.1", "av": "18.1.0", "libavcodec": "61.19.100"}
    assert changes_between([a], [dict(a)]) == {}
    upgraded = {**a, "torch": "2.15.0", "libavcodec": "62.3.100"}
    assert said(changes_between([a], [upgraded])) == "libavcodec 61.19.100 -> 62.3.100; torch 2.14.1 -> 2.15.0"
    # a run whose ranks differed, then one image; a package gone
    assert changes_between([a, {**a, "av": "17.0.0"}], [a]) == {"av": ("17.0.0, 18.1.0", "18.1.0")}
    assert changes_between([a], [{k: v for k, v in a.items() if k != "av"}]) == {"av": ("18.1.0", "absent")}
