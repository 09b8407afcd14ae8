import threading
import time

import pytest

from pipeline.errors import ConfigError, ModelTimeout, StallError
from pipeline.model_pool import ModelPool, localize_model
from pipeline.task_queue import BoundedTaskQueue


def test_queue_blocks_producers_when_full():
    q = BoundedTaskQueue(depth=3, stall_timeout_s=30)
    stop = threading.Event()
    put = []

    def producer():
        for i in range(10):
            if q.put(i, stop):
                put.append(i)

    t = threading.Thread(target=producer, daemon=True)
    t.start()
    time.sleep(0.5)
    assert len(put) == 3 and q.qsize() == 3  # bounded: the producer waits
    got = [q.get(stop, lambda: False) for _ in range(10)]
    t.join(5)
    assert got == list(range(10))
    assert q.get(stop, lambda: True) is None  # end of input


def test_queue_waits_have_limits_and_honour_stop():
    q = BoundedTaskQueue(depth=1, stall_timeout_s=0.5)
    stop = threading.Event()
    q.put("a", stop)
    with pytest.raises(StallError, match="consumers are not taking"):
        q.put("b", stop)
    q.drain()
    with pytest.raises(StallError, match="producers are running"):
        q.get(stop, lambda: False)
    stop.set()
    assert q.put("c", stop) is False and q.get(stop, lambda: False) is None


def test_a_full_queue_is_no_stall_while_the_consumers_items_are_within_their_limits():
    """A consumer on a 2-hour film is working, not hung: the put waits past ``stall_timeout_s`` up to the last
    item's deadline, then ``stall_timeout_s`` more."""
    import time

    deadline = time.monotonic() + 1.0
    q = BoundedTaskQueue(depth=1, stall_timeout_s=0.3, busy_until=lambda: deadline)
    stop = threading.Event()
    q.put("a", stop)
    start = time.monotonic()
    with pytest.raises(StallError, match=r"consumers are not taking items \(none for 0.3s past the last item's limit"):
        q.put("b", stop)
    assert time.monotonic() - start >= 1.3 - 0.05
    taken = threading.Timer(0.5, q.get, (stop, lambda: False))  # a consumer takes one: the put goes through
    taken.start()
    deadline = time.monotonic() + 1.0
    assert q.put("c", stop) is True and q.drain() == ["c"]
    taken.join()


def test_pool_instances_are_exclusive_and_timeout_fails_cleanly():
    built = []
    pool = ModelPool("cpu", instances=2, acquire_timeout_s=0.3)
    pool.add("m", lambda device: built.append(device) or object(), warmup=lambda m: None)
    pool.add("m", lambda device: 1 / 0)  # same name again keeps the first
    assert len(built) == 2
    in_use = set()
    lock = threading.Lock()
    clashes = []

    def work():
        for _ in range(20):
            with pool.acquire("m", timeout=10) as inst:
                with lock:
                    if id(inst) in in_use:
                        clashes.append(inst)
                    in_use.add(id(inst))
                time.sleep(0.001)
                with lock:
                    in_use.discard(id(inst))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clashes == []
    with pool.acquire("m"), pool.acquire("m"):
        with pytest.raises(ModelTimeout, match="no free instance"):
            with pool.acquire("m"):
                pass
    with pool.acquire("m"):  # instances were returned after the timeout
        pass


def test_a_node_copy_of_a_model_cut_short_in_a_crash_is_copied_again(s3, bucket, tmp_path, monkeypatch):
    """A node that lost power just after copying a model can come back with the copy empty or cut short (its data
    reached the disk after its rename); every run on that node then failed to load it. A copy whose sizes differ
    from the source's is copied again."""
    import os

    name, fs = bucket
    fs.pipe(f"{name}/models/w.onnx", b"w" * 5000)
    fs.pipe(f"{name}/models/dir/config.json", b"{}")
    fs.pipe(f"{name}/models/dir/model.safetensors", b"s" * 3000)
    opts = s3.options()
    path = localize_model(f"s3://{name}/models/w.onnx", str(tmp_path), 0, lambda: None, opts)
    d = localize_model(f"s3://{name}/models/dir", str(tmp_path), 0, lambda: None, opts)
    with open(path, "wb"):
        pass  # emptied
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.truncate(1000)  # cut short
    assert localize_model(f"s3://{name}/models/w.onnx", str(tmp_path), 0, lambda: None, opts) == path
    assert open(path, "rb").read() == b"w" * 5000
    assert localize_model(f"s3://{name}/models/dir", str(tmp_path), 0, lambda: None, opts) == d
    assert open(os.path.join(d, "model.safetensors"), "rb").read() == b"s" * 3000
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".part")]

    reached = []  # a rank whose listing fails still reaches the barrier, where the others wait for it
    import pipeline.model_pool as model_pool

    monkeypatch.setattr(model_pool, "source_files", lambda fs, path: (_ for _ in ()).throw(
        PermissionError("Access Denied")))
    with pytest.raises(PermissionError):
        localize_model(f"s3://{name}/models/w.onnx", str(tmp_path), 3, lambda: reached.append(1), opts)
    assert reached == [1]


def test_localize_model_from_s3_downloads_once(s3, bucket, tmp_path):
    name, fs = bucket
    fs.pipe(f"{name}/models/w.bin", b"weights")
    fs.pipe(f"{name}/models/dir/config.json", b"{}")
    fs.pipe(f"{name}/models/dir/model.safetensors", b"st")
    barriers = []
    path = localize_model(f"s3://{name}/models/w.bin", str(tmp_path), 0, lambda: barriers.append(1), s3.options())
    assert open(path, "rb").read() == b"weights" and barriers == [1]
    again = localize_model(f"s3://{name}/models/w.bin", str(tmp_path), 0, lambda: None, s3.options())
    assert again == path  # the node's copy, no second download
    fs.pipe(f"{name}/models/w.bin", b"changed")  # weights replaced at the same URL: copied again, never read stale
    new = localize_model(f"s3://{name}/models/w.bin", str(tmp_path), 0, lambda: None, s3.options())
    assert new != path and open(new, "rb").read() == b"changed"
    d = localize_model(f"s3://{name}/models/dir", str(tmp_path), 0, lambda: None, s3.options())
    assert sorted(__import__("os").listdir(d)) == ["config.json", "model.safetensors"]
    with pytest.raises(ConfigError, match="does not exist"):
        localize_model(f"s3://{name}/models/nope.bin", str(tmp_path), 0, lambda: None, s3.options())
    with pytest.raises(ConfigError, match="does not exist"):
        localize_model(str(tmp_path / "nope.pt"), str(tmp_path), 0, lambda: None)


def test_a_new_version_of_a_model_removes_the_nodes_copies_of_earlier_ones(s3, bucket, tmp_path):
    """No run loads an earlier version's copy again (each names its copy by what the source lists now): it is
    removed once the new one is made, unless it was made in the last ten minutes (another job's rank may be about
    to load it); copies of other models stay."""
    import os

    name, fs = bucket
    opts = s3.options()
    url, other = f"s3://{name}/models/w.bin", f"s3://{name}/models/other.bin"
    fs.pipe(url, b"v1")
    fs.pipe(other, b"o")
    first = localize_model(url, str(tmp_path), 0, lambda: None, opts)
    kept = localize_model(other, str(tmp_path), 0, lambda: None, opts)
    assert open(first + ".source").read() == url
    fs.pipe(url, b"v2-")
    young = localize_model(url, str(tmp_path), 0, lambda: None, opts)
    assert os.path.exists(first)  # a minute old: kept for now
    os.utime(first, (1, 1))
    os.utime(young, (1, 1))
    fs.pipe(url, b"v3--")
    now = localize_model(url, str(tmp_path), 0, lambda: None, opts)
    assert open(now, "rb").read() == b"v3--"
    assert not os.path.exists(first) and not os.path.exists(first + ".source")
    assert not os.path.exists(young)
    assert os.path.exists(kept) and open(kept, "rb").read() == b"o"
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) + s for p in (now, kept) for s in ("", ".source"))


def test_a_failed_model_copy_still_passes_every_barrier_and_is_raised_after_the_last():
    """Each remote model's copy is a collective (the node's ranks wait at a barrier for local rank 0). A rank whose
    first copy or check fails must still pass the barriers of the models after it, as the others do, or the ranks
    are left in different collectives; its error comes after the last, for every rank to share."""
    from pipeline.errors import ConfigError
    from pipeline.runner import copy_models
    from pipeline.weights import ModelSource

    class Declares:
        def __init__(self, *uris):
            self.uris = uris

        def model_sources(self):  # and weights a package ships, named by a string: nothing to copy
            return {"vad": "silero-vad==6.2.1", **{f"m{i}": ModelSource(u) for i, u in enumerate(self.uris)}}

    filters = [Declares("s3://b/yolo.pt", "s3://b/sep.onnx"), Declares("s3://b/yolo.pt"), Declares("s3://b/clf")]
    barriers: list[str] = []

    def localize(uri, options):
        barriers.append(uri)  # localize_model's barrier, reached whether its copy succeeds or not
        if uri == "s3://b/yolo.pt":
            raise ConfigError("the weights at s3://b/yolo.pt on h1 are not those rank 0 recorded")
        return f"/cache/{uri.rsplit('/', 1)[-1]}"

    copies: dict[str, str] = {}
    with pytest.raises(ConfigError, match="not those rank 0 recorded"):
        copy_models(filters, localize, copies)
    # every model once, in the order every rank takes: the one declared twice is not copied (or waited for) again
    assert barriers == ["s3://b/yolo.pt", "s3://b/sep.onnx", "s3://b/clf"]
    assert copies == {"s3://b/sep.onnx": "/cache/sep.onnx", "s3://b/clf": "/cache/clf"}


def test_a_stop_flag_s_raiser_waits_until_the_others_saw_it():
    """The takeover flag's raiser (rank 0, whose process may hold the store) waits for the other ranks to read it,
    and gives up after its limit where one never does; a rank that reads it counts once however often it looks."""
    import time

    import torch.distributed as dist

    from pipeline.distributed import StopFlag
    from tests.s3server import free_port

    port = free_port()
    server = dist.TCPStore("127.0.0.1", port, 1, is_master=True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", port, 1, is_master=False)
    raiser, other = StopFlag(server, "run/takeover", ranks=2), StopFlag(client, "run/takeover", ranks=2)
    raiser.raise_flag("taken over")
    started = time.monotonic()
    assert raiser.wait_seen(0.3) is False and time.monotonic() - started >= 0.3  # nobody read it yet
    assert other.reason() == "taken over"
    assert other.reason() == "taken over"
    assert raiser.wait_seen(5) is True
    three = StopFlag(server, "run/takeover", ranks=3)
    assert three.wait_seen(0.1) is False  # counted once: a second rank has not said it
    assert StopFlag(ranks=4).wait_seen(0.1) is True  # one process: nobody to wait for
