import os
import posixpath
import random
import threading

import pytest
from hypothesis import given, strategies as st

from pipeline.config import StorageConfig, TierConfig
from pipeline.errors import BadInputError, NotFoundError, TransientFetchError, is_retryable
from pipeline.storage import NodeCache, TieredFetcher, backoff_delays, classify_fs_error, safe_relative


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
