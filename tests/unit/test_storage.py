import os
import posixpath
import random
import threading
import time

import pytest
from hypothesis import given, strategies as st

from pipeline.config import StorageConfig, TierConfig
from pipeline.errors import BadInputError, NotFoundError, TransientFetchError, is_retryable
from pipeline.storage import FetchProgress, NodeCache, TieredFetcher, backoff_delays, classify_fs_error, safe_relative


@given(st.lists(st.sampled_from(["..", ".", "a", "b", "", "c.mp4", "/"]), min_size=1, max_size=8))
def test_safe_relative_never_leaves_root(parts):
    # Oracle: joining the accepted path to a root and normalising stays under that root.
    path = "/".join(parts)
    try:
        rel = safe_relative(path)
    except BadInputError:
        return
    joined = posixpath.normpath(posixpath.join("/root/tier", rel))
    assert joined == "/root/tier" or joined.startswith("/root/tier/")


@pytest.mark.parametrize("bad", ["", "../x", "a/../../x", "..", ".", "a\x00b"])
def test_escaping_paths_are_bad_input(bad):
    with pytest.raises(BadInputError):
        safe_relative(bad)


def test_backoff_is_bounded_exponential_with_jitter():
    delays = backoff_delays(6, 0.5, 4.0, random.Random(1))
    ceilings = [0.5, 1, 2, 4, 4, 4]
    assert all(0 <= d <= c for d, c in zip(delays, ceilings))
    assert len(set(delays)) == len(delays)


def test_error_classification():
    assert classify_fs_error(FileNotFoundError("x")) is NotFoundError
    assert classify_fs_error(PermissionError("x")).__name__ == "AccessDeniedError"
    assert classify_fs_error(TimeoutError("read timed out")) is TransientFetchError
    assert classify_fs_error(OSError("503 SlowDown")) is TransientFetchError
    assert classify_fs_error(TypeError("bad kwarg")).__name__ == "FetchError"
    assert is_retryable(TransientFetchError("x")) and not is_retryable(NotFoundError("x"))


def test_cache_names_are_hashes_not_ids():
    name = NodeCache.name_for("s3://b/../../etc/passwd.mp4")
    assert "/" not in name and ".." not in name and name.endswith(".mp4")
    assert NodeCache.name_for("s3://b/x.mp4;rm -rf") .count(".") == 0


def test_cache_evicts_oldest_but_never_a_pinned_entry(tmp_path):
    cache = NodeCache(str(tmp_path / "cache"), max_bytes=250)
    paths = []
    for i in range(3):
        tmp = cache.tmp_path(f"u{i}")
        with open(tmp, "wb") as f:
            f.write(b"x" * 100)
        paths.append(cache.commit(f"u{i}", tmp, 100))
        if i == 0:
            continue  # u0 stays pinned (in use)
        cache.release(f"u{i}")
    # adding u2 needed room: u1 (oldest unpinned) went, u0 (pinned) stayed
    assert os.path.exists(paths[0]) and not os.path.exists(paths[1]) and os.path.exists(paths[2])
    assert cache.evictions == 1
    assert cache.lookup("u1") is None
    cache.release("u0")
    tmp = cache.tmp_path("u3")
    with open(tmp, "wb") as f:
        f.write(b"x" * 100)
    cache.commit("u3", tmp, 100)
    assert not os.path.exists(paths[0])  # released now, so evictable
    assert cache.bytes_used <= 250


def _local_fetcher(tmp_path, tiers, **kw):
    cfg = StorageConfig(cache_dir=str(tmp_path / "cache"), tiers=tuple(tiers), backoff_base_s=0.01, **kw)
    return TieredFetcher(cfg)


def test_tiers_in_order_and_cache_hit_on_second_pass(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (b / "only_b.bin").write_bytes(b"B" * 10)
    (a / "both.bin").write_bytes(b"A" * 5)
    (b / "both.bin").write_bytes(b"B" * 7)
    f = _local_fetcher(tmp_path, [TierConfig("fast", str(a)), TierConfig("slow", str(b))])
    item = f.fetch("only_b.bin")
    assert item.tier == "slow" and item.bytes == 10
    item.release()
    item = f.fetch("both.bin")
    assert item.tier == "fast" and open(item.local_path, "rb").read() == b"A" * 5
    item.release()
    again = f.fetch("only_b.bin")
    assert again.tier == "cache" and open(again.local_path, "rb").read() == b"B" * 10
    with pytest.raises(NotFoundError):
        f.fetch("nowhere.bin")
    with pytest.raises(BadInputError):
        f.fetch("../a/both.bin")
    assert not any(p.name.endswith(".part") for p in (tmp_path / "cache" / ".tmp").iterdir())


def test_transient_errors_are_retried_then_typed(tmp_path):
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x.bin").write_bytes(b"x")
    f = _local_fetcher(tmp_path, [TierConfig("t", str(tmp_path / "t"))], retries=3)
    calls = {"n": 0}
    real = f._fetch_once

    def flaky(*args):
        calls["n"] += 1
        if calls["n"] < 3:
            raise TimeoutError("read timed out")
        return real(*args)

    f._fetch_once = flaky
    item = f.fetch("x.bin")
    assert item.attempts == 3 and f.retries_done == 2
    f2 = _local_fetcher(tmp_path / "other", [TierConfig("t", str(tmp_path / "t"))], retries=2)
    f2._fetch_once = lambda *a: (_ for _ in ()).throw(ConnectionResetError("reset"))
    with pytest.raises(TransientFetchError):
        f2.fetch("x.bin")
    assert f2.retries_done == 2


def test_not_found_is_not_retried(tmp_path):
    (tmp_path / "t").mkdir()
    f = _local_fetcher(tmp_path, [TierConfig("t", str(tmp_path / "t"))], retries=5)
    with pytest.raises(NotFoundError):
        f.fetch("missing.bin")
    assert f.retries_done == 0


def test_concurrent_fetches_of_one_file_stay_whole(tmp_path):
    (tmp_path / "t").mkdir()
    data = os.urandom(1 << 20)
    (tmp_path / "t" / "big.bin").write_bytes(data)
    f = _local_fetcher(tmp_path, [TierConfig("t", str(tmp_path / "t"))])
    results = []

    def go():
        item = f.fetch("big.bin")
        results.append(open(item.local_path, "rb").read() == data)
        item.release()

    threads = [threading.Thread(target=go) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 6


# ---- what earlier runs leave in the node cache --------------------------------------------------------------------
def _put(cache: NodeCache, uri: str, size: int) -> str:
    tmp = cache.tmp_path(uri)
    with open(tmp, "wb") as f:
        f.write(b"x" * size)
    path = cache.commit(uri, tmp, size)
    cache.release(uri)
    return path


def _on_disk(root) -> int:
    return sum(e.stat().st_size for e in os.scandir(root) if e.is_file())


def test_restarts_keep_the_cache_within_its_limit(tmp_path):
    # Each run is a new process: before, it knew nothing of the files the last run left, so every restart added
    # up to the whole limit again (measured 200, 400, 600, 800 bytes on disk over four runs at a limit of 250).
    root = str(tmp_path / "cache")
    for run in range(4):
        cache = NodeCache(root, max_bytes=250, tend=True, orphan_age_s=0)
        _put(cache, f"run{run}-a", 100)
        _put(cache, f"run{run}-b", 100)
        assert _on_disk(root) <= 250 and cache.bytes_used <= 250
    # the newest run's entries are the ones kept; the oldest went first
    assert cache.lookup("run3-b") is not None and cache.lookup("run0-a") is None


def test_a_process_that_does_not_tend_leaves_leftovers_alone(tmp_path):
    root = str(tmp_path / "cache")
    first = _put(NodeCache(root, max_bytes=1000), "old", 100)
    cache = NodeCache(root, max_bytes=100, tend=False, orphan_age_s=0)  # another local rank
    _put(cache, "new", 100)
    assert os.path.exists(first) and cache.bytes_used == 100


def test_young_leftovers_count_but_stay_until_they_age(tmp_path):
    # A leftover used within orphan_age_s may belong to a live job sharing the directory: counted, not removed.
    root = str(tmp_path / "cache")
    now = [1_000_000.0]
    old = _put(NodeCache(root, max_bytes=10_000), "old", 100)
    young = _put(NodeCache(root, max_bytes=10_000), "young", 100)
    os.utime(old, (now[0] - 500, now[0] - 500))
    os.utime(young, (now[0] - 10, now[0] - 10))
    cache = NodeCache(root, max_bytes=150, tend=True, orphan_age_s=100, clock=lambda: now[0])
    assert not os.path.exists(old) and os.path.exists(young)  # evicted at adoption, down towards the budget
    assert cache.bytes_used == 100  # the young one is counted
    now[0] += 200  # it has aged past orphan_age_s unused
    _put(cache, "mine", 100)
    assert not os.path.exists(young) and cache.bytes_used == 100


def test_a_leftover_another_process_looks_up_is_left_to_it(tmp_path):
    root = str(tmp_path / "cache")
    path = _put(NodeCache(root, max_bytes=10_000), "shared", 100)
    os.utime(path, (1.0, 1.0))  # long unused
    tender = NodeCache(root, max_bytes=10_000, tend=True, orphan_age_s=100)
    assert tender.bytes_used == 100
    other = NodeCache(root, max_bytes=10_000)  # another rank of the node takes it for an item (and touches it)
    assert other.lookup("shared") is not None
    tender.max_bytes = 0
    tender.make_room()
    assert os.path.exists(path)  # the item in use by the other rank keeps its file
    assert tender.bytes_used == 0  # and it is counted by the rank that uses it, not twice


def test_a_leftover_this_process_looks_up_becomes_its_own(tmp_path):
    root = str(tmp_path / "cache")
    path = _put(NodeCache(root, max_bytes=10_000), "mine", 100)
    os.utime(path, (1.0, 1.0))
    cache = NodeCache(root, max_bytes=10_000, tend=True, orphan_age_s=100)
    assert cache.lookup("mine") == (path, 100)
    assert cache.make_room() == 0 and os.path.exists(path)  # pinned while in use
    cache.release("mine")
    assert cache.make_room() == 100 and not os.path.exists(path)


def test_stale_partial_downloads_are_swept_at_start_and_while_running(tmp_path):
    root = str(tmp_path / "cache")
    now = [1_000_000.0]
    first = NodeCache(root, max_bytes=10_000)
    stale, live = first.tmp_path("killed"), first.tmp_path("downloading")
    for p in (stale, live):
        open(p, "wb").write(b"x" * 10)
    os.utime(stale, (now[0] - 1000, now[0] - 1000))
    os.utime(live, (now[0] - 5, now[0] - 5))
    cache = NodeCache(root, max_bytes=10_000, tend=True, orphan_age_s=100, clock=lambda: now[0])
    assert not os.path.exists(stale) and os.path.exists(live) and cache.parts_removed == 1
    now[0] += 200  # the live one went silent (its process was killed after the start)
    _put(cache, "next", 10)  # a commit sweeps again once orphan_age_s / 2 has passed
    assert not os.path.exists(live) and cache.parts_removed == 2
    assert NodeCache(root, max_bytes=10_000, tend=False).parts_removed == 0  # only the tending process sweeps


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT"])
def test_a_full_disk_or_quota_makes_room_once_then_stops_the_rank(tmp_path, monkeypatch, code):
    # The same paths as tests/integration/test_full_disks.py (a real full tmpfs), for machines that cannot mount
    # one: the download raises the kernel's error after writing part of the file, as a full disk does.
    import errno

    from fsspec.implementations.local import LocalFileSystem

    from pipeline.errors import CacheFullError

    (tmp_path / "t").mkdir()
    for i in range(3):
        (tmp_path / "t" / f"f{i}.bin").write_bytes(b"x" * 100)
    f = _local_fetcher(tmp_path, [TierConfig("t", str(tmp_path / "t"))])
    f.fetch("f0.bin").release()
    real = LocalFileSystem.get_file
    fails = {"n": 1}

    def full_disk(self, rpath, lpath, **kw):
        if fails["n"] > 0:
            fails["n"] -= 1
            open(lpath, "wb").write(b"x" * 10)
            raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)), lpath)
        return real(self, rpath, lpath, **kw)

    monkeypatch.setattr(LocalFileSystem, "get_file", full_disk)
    item = f.fetch("f1.bin")  # f0 is evicted to make room, and the fetch goes on
    assert item.tier == "t" and f.cache.evictions == 1 and f.cache.lookup("f0.bin") is None
    fails["n"] = 2  # nothing left that may go (f1 is in use): the second failure is the node's, not the item's
    with pytest.raises(CacheFullError, match="is full"):
        f.fetch("f2.bin")
    assert not any(p.name.endswith(".part") for p in (tmp_path / "cache" / ".tmp").iterdir())


def test_an_abandoned_fetch_that_returns_late_is_released_and_counted(tmp_path):
    """``fetch_watched`` gives a silent fetch up (``FetchTimeout``); when its thread returns after all, what it fetched
    is unpinned, so the cache can evict it. A served fetch ends a run of silent ones; a cache hit does not."""
    from pipeline.errors import FetchTimeout

    (tmp_path / "t").mkdir()
    for name in ("slow.bin", "ok.bin"):
        (tmp_path / "t" / name).write_bytes(b"x" * 100)
    f = _local_fetcher(tmp_path, [TierConfig("t", str(tmp_path / "t"))])
    real, gate = f._fetch_once, threading.Event()

    def held(tier, url, options, attempt, progress):  # a read that blocks (a hung mount) until the gate opens
        if url.endswith("slow.bin"):
            gate.wait(30)
        return real(tier, url, options, attempt, progress)

    f._fetch_once = held
    with pytest.raises(FetchTimeout, match=r"t: .*slow\.bin: no byte and no new attempt .*before any byte") as e:
        f.fetch_watched("slow.bin", lambda: False, silence_s=0.5, poll_s=0.05)
    assert is_retryable(e.value)
    assert f.silent_in_a_row == 1 and f.hung_fetches == 1
    gate.set()  # the hung read returns: the late fetch lands in the cache and is released at once
    for _ in range(100):
        if f.hung_fetches == 0:
            break
        threading.Event().wait(0.05)
    assert f.hung_fetches == 0
    hit = f.fetch_watched("slow.bin", lambda: False, silence_s=2.0)
    assert hit.tier == "cache"  # the late fetch landed in the cache
    assert f.silent_in_a_row == 1  # a cache hit says nothing of the storage
    hit.release()
    assert f.cache.make_room() == 100  # and nothing pins it: the late fetch's own pin was dropped
    assert f.fetch_watched("ok.bin", lambda: False, silence_s=2.0).tier == "t"
    assert f.silent_in_a_row == 0


def test_a_silent_tier_is_skipped_then_tried_again_twice_as_late(tmp_path):
    """A tier that goes silent while a later one remains: the item comes from the later tier, the next items skip
    the silent tier at once, it is tried again when its skip ends (still silent: skipped twice as long), and once it
    serves a fetch it is no longer skipped."""
    for tier in ("a", "b"):
        (tmp_path / tier).mkdir()
        for name in ("x", "y", "z", "w"):
            (tmp_path / tier / f"{name}.bin").write_bytes(b"x" * 10)
    f = _local_fetcher(tmp_path, [TierConfig("a", str(tmp_path / "a")), TierConfig("b", str(tmp_path / "b"))],
                       hung_tier_skip_s=1.5)
    real, gate, asked = f._fetch_once, threading.Event(), []

    def hung_a(tier, url, options, attempt, progress):  # tier a's reads block (a hung mount) until the gate opens
        asked.append(tier)
        if tier == "a":
            gate.wait(30)
        return real(tier, url, options, attempt, progress)

    f._fetch_once = hung_a

    def watched(name):
        item = f.fetch_watched(f"{name}.bin", lambda: False, silence_s=1.0, poll_s=0.02)
        item.release()
        return item

    assert watched("x").tier == "b" and asked == ["a", "b"]
    assert list(f.skipped_tiers) == ["a"] and f.silent_in_a_row == 0  # the item was served: not a silent fetch
    assert watched("y").tier == "b" and asked[2:] == ["b"]  # a is not asked while skipped
    threading.Event().wait(1.55)
    assert f.skipped_tiers == {}
    assert watched("z").tier == "b" and asked[3:] == ["a", "b"]  # tried again, still silent
    assert f.skipped_tiers["a"] > 2.0  # skipped twice as long (3 s) this time
    assert f.hung_fetches == 2
    gate.set()
    threading.Event().wait(3.05)
    assert watched("w").tier == "a" and f.skipped_tiers == {}
    assert f.hung_fetches == 0  # the two stuck threads returned, and their late items were released:
    assert f.cache.make_room() == 60  # a's x, z, w and b's x, y, z, none pinned


def test_fetch_progress_gives_up_on_silence_and_on_a_trickle_once_its_window_is_full(tmp_path):
    """``stalled`` at chosen times over a real partial download: silence, a rate below the minimum over a full window,
    a new attempt's fresh window, and no rate without a file to measure."""
    tmp = tmp_path / "item.part"
    p = FetchProgress()
    p.attempt("s3", "s3://b/x.mp4")
    t0 = time.monotonic()
    assert p.stalled(t0, 5.0, 100.0) is None  # no partial file yet: nothing to measure a rate on
    p.tmp = str(tmp)
    for second in range(5):  # 10 bytes a second: never silent, far below 100 B/s
        tmp.write_bytes(b"x" * 10 * (second + 1))
        assert p.stalled(t0 + second, 5.0, 100.0) is None  # the window is not full yet
    tmp.write_bytes(b"x" * 60)
    why = p.stalled(t0 + 5, 5.0, 100.0)
    assert why == "50 bytes in the last 5s (10 B/s, below storage.fetch_min_bytes_per_s=100)"
    assert p.stalled(t0 + 5, 5.0, 5.0) is None  # above a lower minimum
    assert p.stalled(t0 + 5, 5.0, 0.0) is None  # 0: silence only

    p.attempt("s3", "s3://b/x.mp4")  # a retry: its own window, and a fresh silence mark
    p.tmp = str(tmp)
    t1 = time.monotonic()
    for second in range(7):  # 1000 bytes a second: fine
        tmp.write_bytes(b"x" * 1000 * (second + 1))
        assert p.stalled(t1 + second, 5.0, 100.0) is None
    assert p.stalled(t1 + 12.5, 5.0, 100.0) == "no byte and no new attempt for 6.5s"  # the file stopped growing


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_cache_copy_that_lost_bytes_in_a_crash_is_fetched_again(tmp_path, where, s3, bucket, monkeypatch):
    """A node that lost power or panicked comes back with the last entries it wrote empty or cut short (their data
    had not reached the disk). Such a copy, written before the machine booted (or empty), is checked against its
    source's size once: a short one is fetched again, a whole one is used and no longer checked."""
    from pipeline.proc import boot_time

    booted = boot_time()
    assert booted is not None  # Linux: /proc/stat says when the kernel booted
    data = {f"f{i}.bin": bytes([i]) * 1000 for i in range(4)}
    if where == "s3":
        name, fs = bucket
        for key, body in data.items():
            fs.pipe_file(f"{name}/t/{key}", body)
        tier = TierConfig("t", f"s3://{name}/t", storage_options=s3.options())
    else:
        (tmp_path / "t").mkdir()
        for key, body in data.items():
            (tmp_path / "t" / key).write_bytes(body)
        tier = TierConfig("t", str(tmp_path / "t"))
    f = _local_fetcher(tmp_path, [tier])
    copies = {}
    for key in data:
        item = f.fetch(key)
        copies[key] = item.local_path
        item.release()

    def crashed(key, body):  # what the crash left: these bytes, written before the boot
        with open(copies[key], "wb") as out:
            out.write(body)
        os.utime(copies[key], (booted - 60, booted - 60))

    crashed("f0.bin", b"")  # empty
    crashed("f1.bin", data["f1.bin"][:300])  # cut short
    crashed("f2.bin", data["f2.bin"])  # whole
    with open(copies["f3.bin"], "wb") as out:  # written since the boot and short: not a crash's (not checked)
        out.write(data["f3.bin"][:10])

    again = _local_fetcher(tmp_path, [tier])  # the next run on the rebooted node
    got = {}
    for key in data:
        item = again.fetch(key)
        got[key] = (item.tier, open(item.local_path, "rb").read())
        item.release()
    assert got["f0.bin"] == ("t", data["f0.bin"]) and got["f1.bin"] == ("t", data["f1.bin"])
    assert got["f2.bin"] == ("cache", data["f2.bin"]) and got["f3.bin"] == ("cache", data["f3.bin"][:10])
    assert again.cache_discarded == 2
    assert not any(again.cache.suspect(key) for key in data)  # refetched or touched by their use: checked once

    crashed("f2.bin", data["f2.bin"][:5])  # a source that cannot answer the check: its copy is used as before

    class Unanswered:
        def info(self, path):
            raise OSError("Connection refused")

    unanswered = _local_fetcher(tmp_path, [tier])
    monkeypatch.setattr(unanswered, "_filesystem", lambda url, options: (Unanswered(), url))
    item = unanswered.fetch("f2.bin")
    assert item.tier == "cache" and unanswered.cache_discarded == 0
    item.release()
