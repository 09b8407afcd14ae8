import json
import os

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.errors import ConfigError, ManifestError
from pipeline.manifest import check_input_exists, open_manifest

def read_manifest(cfg: InputConfig, spill_dir: str = "/tmp/mediasieve-test-spill") -> pa.Table:
    m = open_manifest(cfg, spill_dir)
    try:
        return m.to_table()
    finally:
        m.close()


ROWS = [{"video_id": "a", "video_path": "x/a.mp4", "lang": "en"},
        {"video_id": "b", "video_path": "x/b.mp4", "lang": "de"}]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl", "csv"])
def test_formats_pass_columns_through(tmp_path, fmt):
    path = tmp_path / f"m.{fmt}"
    table = pa.Table.from_pylist(ROWS)
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    else:
        pacsv.write_csv(table, path)
    out = read_manifest(InputConfig(manifest=str(path)))
    assert out.to_pylist() == ROWS


def test_numeric_looking_ids_stay_strings(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("clip,file\n007,a.mp4\n8,b.mp4\n")
    out = read_manifest(InputConfig(manifest=str(path), id_column="clip", path_column="file"))
    assert out["clip"].to_pylist() == ["007", "8"]


def test_duplicates_error_names_them_or_drop(tmp_path):
    path = tmp_path / "m.jsonl"
    rows = ROWS + [{"video_id": "a", "video_path": "other.mp4", "lang": "fr"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError, match="duplicate id.*'a'"):
        read_manifest(InputConfig(manifest=str(path)))
    out = read_manifest(InputConfig(manifest=str(path), on_duplicate_ids="drop"))
    assert out["video_path"].to_pylist() == ["x/a.mp4", "x/b.mp4"]


def test_missing_column_and_missing_file(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"id": "a", "video_path": "p"}\n')
    with pytest.raises(ManifestError, match="no column 'video_id'"):
        read_manifest(InputConfig(manifest=str(path)))
    with pytest.raises(ConfigError, match="does not exist"):
        check_input_exists(InputConfig(manifest=str(tmp_path / "nope.parquet")))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(ManifestError, match="cannot read manifest"):
        read_manifest(InputConfig(manifest=str(tmp_path / "bad.parquet")))


def test_listing_mode_over_s3(bucket):
    name, fs = bucket
    for key in ("v/a.mp4", "v/sub/b.mp4", "v/c.txt"):
        fs.pipe(f"{name}/{key}", b"x")
    from tests.conftest import MotoS3  # noqa: F401 - the fixture's server is running

    opts = fs.storage_options
    out = read_manifest(InputConfig(listing_glob=f"s3://{name}/v/**/*.mp4", storage_options=opts))
    assert out["video_id"].to_pylist() == ["a.mp4", "sub/b.mp4"]
    assert out["video_path"].to_pylist() == [f"s3://{name}/v/a.mp4", f"s3://{name}/v/sub/b.mp4"]


def test_bad_glob_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="listing_glob"):
        read_manifest(InputConfig(listing_glob=str(tmp_path) + "/a**b"))


@pytest.fixture
def small_batches(monkeypatch):
    """Batches, duplicate-check slices and spill row groups of a few rows, so every boundary is crossed."""
    import pipeline.manifest as mf

    monkeypatch.setattr(mf, "BATCH_ROWS", 7)
    monkeypatch.setattr(mf, "SPILL_GROUP_ROWS", 5)


def test_rows_per_unit_come_back_from_the_spill_across_row_groups(tmp_path, small_batches):
    n = 103
    table = pa.table({"video_id": [f"v{i:04d}" for i in range(n)], "video_path": [f"p/{i}.mp4" for i in range(n)],
                      "score": list(range(n))})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=11)
    m = open_manifest(InputConfig(manifest=str(tmp_path / "m.parquet")), str(tmp_path / "spill"), "t")
    try:
        assert m._file.metadata.num_row_groups > 10 and len(m) == n and m.keep is None
        assert m.ids.to_pylist() == table["video_id"].to_pylist()
        for positions in ([0, 1, 2], [4, 5, 6, 7], [9, 31, 32, 77, 102], list(range(40, 60))):
            assert m.rows(pa.array(positions)) == table.take(positions).to_pylist()
        with pytest.raises(ValueError, match="ascending"):
            m.rows([5, 3])
        spill = m.spill_path
        assert spill.startswith(str(tmp_path / "spill"))
    finally:
        m.close()
    assert not (tmp_path / "spill").joinpath(spill).exists()


def test_duplicates_across_batches_are_found_and_the_first_kept(tmp_path, small_batches):
    ids = [f"v{i}" for i in range(40)] + ["v3", "v39", "v3", "v17"]  # repeats far from their firsts
    rows = [{"video_id": v, "video_path": f"p{k}"} for k, v in enumerate(ids)]
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ManifestError, match=r"3 duplicate id\(s\): 'v17', 'v3', 'v39'"):
        read_manifest(InputConfig(manifest=str(path)), str(tmp_path / "s"))
    assert list((tmp_path / "s").iterdir()) == []  # the refused manifest left no spill
    out = read_manifest(InputConfig(manifest=str(path), on_duplicate_ids="drop", limit=38), str(tmp_path / "s"))
    assert out["video_path"].to_pylist() == [f"p{k}" for k in range(38)]
    # one id repeated across a slice boundary of the sorted ids is still one repeated id
    import pipeline.manifest as mf

    later, names, n_repeated = mf._duplicates(pa.chunked_array([pa.array(["a"] * 9 + ["b", "c", "b"])]))
    assert later.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 11] and names == ["a", "b"] and n_repeated == 2
    m = open_manifest(InputConfig(manifest=str(path), on_duplicate_ids="drop"), str(tmp_path / "s"))
    try:
        assert len(m) == 40 and m.kept_ids().to_pylist() == [f"v{i}" for i in range(40)]
    finally:
        m.close()


def test_null_id_names_its_row_and_a_changed_schema_is_refused(tmp_path, small_batches):
    rows = [{"video_id": f"v{i}", "video_path": "p"} for i in range(20)]
    rows[12]["video_id"] = None
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=4)
    with pytest.raises(ManifestError, match="1 row.*null video_id.*row 12"):
        read_manifest(InputConfig(manifest=str(path)), str(tmp_path / "s"))
    # a CSV (over one 1 MB read block) whose type inference from the first block does not hold later on
    csv = tmp_path / "m.csv"
    csv.write_text("video_id,video_path,n\n" + "".join(f"v{i},p,{i}\n" for i in range(150_000)) + "vx,p,nan-ish\n")
    with pytest.raises(ManifestError, match="cannot read manifest.*nan-ish"):
        read_manifest(InputConfig(manifest=str(csv)), str(tmp_path / "s"))
    assert list((tmp_path / "s").iterdir()) == []


def test_spills_of_dead_processes_are_removed(tmp_path):
    import socket
    import subprocess
    import sys

    spill = tmp_path / "s"
    spill.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    stale = spill / f"old__{host}__{int(dead.stdout)}.parquet"
    live = spill / f"other__{host}__{os.getppid()}.parquet"
    foreign = spill / f"other__not-{host}__1.parquet"
    from pipeline.proc import process_tag

    named_live = spill / f"mine__{host}__{process_tag()}.parquet"
    ppid, ticks = process_tag(os.getppid()).split("-")
    reused = spill / f"gone__{host}__{ppid}-{int(ticks) + 1}.parquet"  # a live pid, not the process that wrote it
    for p in (stale, live, foreign, named_live, reused):
        p.write_bytes(b"x")
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    read_manifest(InputConfig(manifest=str(path)), str(spill))
    assert not stale.exists() and live.exists() and foreign.exists()
    assert named_live.exists() and not reused.exists()


def test_empty_manifest_keeps_its_columns(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("video_id,video_path\n")
    out = read_manifest(InputConfig(manifest=str(path)), str(tmp_path / "s"))
    assert out.num_rows == 0 and out.column_names == ["video_id", "video_path"]


def test_unwritable_spill_is_a_clear_error_and_a_full_disk_leaves_nothing(tmp_path, monkeypatch):
    from pipeline.errors import MediasieveError

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="spill directory.*writable node-local"):
        read_manifest(InputConfig(manifest=str(path)), str(tmp_path / "afile" / "spill"))

    import pyarrow.parquet as pq_mod

    real = pq_mod.ParquetWriter.write_batch

    def full(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq_mod.ParquetWriter, "write_batch", full)
    with pytest.raises(MediasieveError, match="manifest spill.*No space left"):
        read_manifest(InputConfig(manifest=str(path)), str(tmp_path / "s"))
    assert list((tmp_path / "s").iterdir()) == []
    monkeypatch.setattr(pq_mod.ParquetWriter, "write_batch", real)


def test_the_url_schemes_of_the_paths_are_collected_and_checked(tmp_path):
    from pipeline.storage import check_protocols

    rows = [{"video_id": str(i), "video_path": p} for i, p in enumerate(
        ["s3://b/a.mp4", "GS://b/c.mp4", "/abs/d.mp4", "rel/e.mp4", "https://h/f.mp4?sig=a://b", "odd:name.mp4"])]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    m = open_manifest(InputConfig(manifest=str(tmp_path / "m.parquet")), str(tmp_path / "spill"))
    m.close()
    assert m.protocols == {"s3", "gs", "https"}
    check_protocols({"s3", "https", "file", "nosuch"})  # installed, or unknown to fsspec: the items will say
    with pytest.raises(ConfigError, match="gs:// paths.*gcsfs"):  # gcsfs is not a dependency
        check_protocols(m.protocols)


def test_the_ranks_of_a_node_share_one_spill_with_the_ids_memory_mapped(tmp_path):
    """The builder's spill is attached by the node's other ranks: the same ids, mask, schema and rows; the ids are
    not copied into memory; only the owner removes the files, and a rank still attached reads on after that."""
    from pipeline.manifest import Manifest, build_spill, ids_path

    n = 200_000
    ids = [f"clip-{i:09d}-{'x' * 40}" for i in range(n)] + ["clip-000000003-" + "x" * 40]  # one repeat, dropped
    paths = [f"s3://b/{i}.mp4" for i in range(n + 1)]
    pq.write_table(pa.table({"video_id": ids, "video_path": paths}), tmp_path / "m.parquet")
    spill = build_spill(InputConfig(manifest=str(tmp_path / "m.parquet"), on_duplicate_ids="drop"),
                        str(tmp_path / "s"), "run-n00000")
    assert os.path.exists(ids_path(spill)) and ids_path(spill).endswith(".arrow")
    before = pa.total_allocated_bytes()
    owner, other = Manifest(spill, owner=True), Manifest(spill, owner=False)
    try:
        allocated = pa.total_allocated_bytes() - before
        # the ids (11 MB of strings) point into the mapping: what was allocated is the two keep bitmaps (n/8 each)
        assert allocated <= 2 * (n // 8 + 64), allocated
        assert len(other) == len(owner) == n and other.keep.to_pylist() == owner.keep.to_pylist()
        assert not other.keep[n].as_py() and other.ids[n].as_py() == ids[n]
        assert other.protocols == owner.protocols == {"s3"} and other.schema == owner.schema
        assert other.rows([5, n - 1]) == [{"video_id": ids[5], "video_path": paths[5]},
                                          {"video_id": ids[n - 1], "video_path": paths[n - 1]}]
        other_ids = other.ids
        owner.close()
        assert not os.path.exists(spill) and not os.path.exists(ids_path(spill))
        assert other.rows([7]) == [{"video_id": ids[7], "video_path": paths[7]}]  # open handles outlive the removal
        assert other_ids[n - 2].as_py() == ids[n - 2]
    finally:
        other.close()
        owner.close()


def test_an_ids_file_that_cannot_be_written_leaves_no_spill(tmp_path, monkeypatch):
    import pipeline.manifest as mf
    from pipeline.errors import MediasieveError

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mf, "_write_ids", full)
    with pytest.raises(MediasieveError, match=r"manifest spill .*-ids__.*\.arrow: .*No space left"):
        mf.build_spill(InputConfig(manifest=str(path)), str(tmp_path / "s"), "t")
    assert list((tmp_path / "s").iterdir()) == []


def test_an_ids_file_of_a_dead_process_is_removed_too(tmp_path):
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    spill = tmp_path / "s"
    spill.mkdir()
    stale = spill / f"old__{socket.gethostname()}__{int(dead.stdout)}.parquet"
    from pipeline.manifest import ids_path

    for p in (stale, ids_path(str(stale))):
        open(p, "wb").close()
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    read_manifest(InputConfig(manifest=str(path)), str(spill))
    assert list(spill.iterdir()) == []


class _Peers:
    """A rank of a two-rank node whose peer's side of each all-gather is given by the test (rank = local rank)."""

    def __new__(cls, local_rank, rounds):
        from pipeline.distributed import DistContext

        class Ctx(DistContext):
            def gather(self, obj):
                peer = rounds.pop(0)
                return [obj, peer] if self.local_rank == 0 else [peer, obj]

        return Ctx(rank=local_rank, world_size=2, local_rank=local_rank, local_world_size=2, host="node-a")


def test_a_node_manifest_failure_on_any_rank_stops_every_rank(tmp_path):
    from pipeline.errors import MediasieveError
    from pipeline.manifest import build_spill, ids_path
    from pipeline.runner import _node_manifest

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = InputConfig(manifest=str(path))
    spills = tmp_path / "s"

    # local rank 1 cannot open what rank 0 built (a storage.cache_dir that is not one directory per node)
    rounds = [("node-a", 0, 0, str(spills / "r-n00000__node-a__1-1.parquet"), None), None]
    with pytest.raises(MediasieveError, match="cannot open the manifest spill .*storage.cache_dir must be one"):
        _node_manifest(_Peers(1, rounds), cfg, str(spills), "r")

    # local rank 0 built and attached, its peer could not attach: rank 0 stops with the peer's error, spill removed
    rounds = [("node-a", 0, 1, None, None), ("MediasieveError", "cannot open the manifest spill X")]
    with pytest.raises(MediasieveError, match="cannot open the manifest spill X"):
        _node_manifest(_Peers(0, rounds), cfg, str(spills), "r")
    assert list(spills.iterdir()) == []

    # rank 0 could not read the manifest: rank 1 stops with the same error type, without opening anything
    rounds = [("node-a", 0, 0, None, ("ManifestError", "manifest has 1 row(s) with a null video_id"))]
    with pytest.raises(ManifestError, match="null video_id"):
        _node_manifest(_Peers(1, rounds), cfg, str(spills), "r")

    # and the good case: rank 1 attaches to rank 0's spill and does not own it
    built = build_spill(cfg, str(spills), "r-n00000")
    m = _node_manifest(_Peers(1, [("node-a", 0, 0, built, None), None]), cfg, str(spills), "r")
    assert not m.owner and m.ids.to_pylist() == ["a", "b"]
    m.close()
    assert os.path.exists(built) and os.path.exists(ids_path(built))
