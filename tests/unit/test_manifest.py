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


@pytest.mark.parametrize("pattern", ["v/**/*.mp4", "v/*.mp4", "v/*/*.mp4", "v/su?/*", "v/[ab].*", "v*/*.mp4",
                                     "v/**", "v/sub/**/*.mp4", "nothing/*.mp4"])
def test_an_s3_listing_is_read_page_by_page_and_matches_fsspecs_glob(bucket, monkeypatch, pattern):
    """Oracle: fsspec's own glob (which holds every object's info, and keeps it in its directory cache)."""
    import s3fs

    import pipeline.manifest as mf

    name, fs = bucket
    for key in ("v/a.mp4", "v/b.MP4", "v/sub/c.mp4", "v/sub/deep/d.mp4", "v/sub/e.txt", "v/x y/\u00fc.mp4", "v/dir/",
                "v/sua/f.mp4", "w/z.mp4", "v2/q.mp4", "v/sub/deep/more/g.mp4"):
        fs.pipe(f"{name}/{key}", b"" if key.endswith("/") else b"x")
    monkeypatch.setattr(mf, "LIST_PAGE", 2)  # every page boundary crossed
    ours = s3fs.S3FileSystem(**fs.storage_options, skip_instance_cache=True)
    monkeypatch.setattr("fsspec.core.url_to_fs", lambda url, **kw: (ours, ours._strip_protocol(url)))
    listed = read_manifest(InputConfig(listing_glob=f"s3://{name}/{pattern}"))
    oracle = s3fs.S3FileSystem(**fs.storage_options, skip_instance_cache=True)
    # a zero-byte key ending in "/" (the "folder" a console makes) is no item, though s3fs's glob lists it as a file
    expected = sorted(p for p, i in oracle.glob(f"{name}/{pattern}", detail=True).items()
                      if i["type"] != "directory" and not p.endswith("/"))
    assert listed["video_path"].to_pylist() == [f"s3://{p}" for p in expected]
    base = f"{name}/{pattern[: pattern.rfind('/', 0, min(pattern.index(c) for c in '*?[' if c in pattern)) + 1]}"
    assert listed["video_id"].to_pylist() == [p[len(base):] for p in expected]
    assert not ours.dircache  # nothing kept for the life of the process


def test_bad_glob_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="listing_glob"):
        read_manifest(InputConfig(listing_glob=str(tmp_path) + "/a**b"))
    with pytest.raises(ConfigError, match="names its bucket without wildcards"):  # before any request
        read_manifest(InputConfig(listing_glob="s3://media-*/v/*.mp4", storage_options={"anon": True}))


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
    with pytest.raises(ManifestError, match="m.parquet has a null video_id at its row 12"):
        read_manifest(InputConfig(manifest=str(path)), str(tmp_path / "s"))
    assert list((tmp_path / "s").iterdir()) == []
    # a CSV whose types change after the first block is read whole now: test_csv_and_jsonl_whose_types_change_...


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
    from pipeline.manifest import build_spill, ids_path, spill_read
    from pipeline.runner import _node_manifest

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = InputConfig(manifest=str(path))
    spills = tmp_path / "s"

    # local rank 1 cannot open what rank 0 built (a storage.cache_dir that is not one directory per node)
    rounds = [("node-a", 0, 0, str(spills / "r-n00000__node-a__1-1.parquet"), None, None), None]
    with pytest.raises(MediasieveError, match="cannot open the manifest spill .*storage.cache_dir must be one"):
        _node_manifest(_Peers(1, rounds), cfg, str(spills), "r")

    # local rank 0 built and attached, its peer could not attach: rank 0 stops with the peer's error, spill removed
    rounds = [("node-a", 0, 1, None, None, None), ("MediasieveError", "cannot open the manifest spill X")]
    with pytest.raises(MediasieveError, match="cannot open the manifest spill X"):
        _node_manifest(_Peers(0, rounds), cfg, str(spills), "r")
    assert list(spills.iterdir()) == []

    # rank 0 could not read the manifest: rank 1 stops with the same error type, without opening anything
    rounds = [("node-a", 0, 0, None, ("ManifestError", "manifest has a null video_id at its row 1"), None)]
    with pytest.raises(ManifestError, match="null video_id"):
        _node_manifest(_Peers(1, rounds), cfg, str(spills), "r")

    # and the good case: rank 1 attaches to rank 0's spill and does not own it
    built = build_spill(cfg, str(spills), "r-n00000")
    m = _node_manifest(_Peers(1, [("node-a", 0, 0, built, None, spill_read(built)), None]), cfg, str(spills), "r")
    assert not m.owner and m.ids.to_pylist() == ["a", "b"]
    m.close()
    assert os.path.exists(built) and os.path.exists(ids_path(built))


# --- manifests of many files: a directory (a dataset Spark, DuckDB or pyarrow wrote) or a glob ---


def test_a_partitioned_dataset_directory_reads_as_one_manifest(tmp_path):
    import pyarrow.dataset as ds

    rows = [{"video_id": f"v{i:02d}", "video_path": f"p/{i}.mp4", "score": float(i),
             "lang": ["en", "de", None][i % 3]} for i in range(30)]
    root = tmp_path / "m"
    # Hive layout as Spark's partitionBy writes it: lang=en/..., null as __HIVE_DEFAULT_PARTITION__, the
    # partition column left out of the files
    ds.write_dataset(pa.Table.from_pylist(rows), root, format="parquet", max_rows_per_file=4, max_rows_per_group=4,
                     partitioning=ds.partitioning(pa.schema([("lang", pa.string())]), flavor="hive"),
                     basename_template="part-{i}.parquet")
    assert sorted(p.name for p in root.iterdir()) == ["lang=__HIVE_DEFAULT_PARTITION__", "lang=de", "lang=en"]
    # what a Spark or Hadoop writer leaves beside the data: none of it is rows
    (root / "_SUCCESS").write_text("")
    (root / "lang=en" / ".part-00000.parquet.crc").write_bytes(b"crc")
    (root / "_temporary" / "0").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows[:2]), root / "_temporary" / "0" / "part-x.parquet")  # a dead task's

    out = read_manifest(InputConfig(manifest=str(root)), str(tmp_path / "s"))
    assert out.column_names == ["video_id", "video_path", "score", "lang"]
    got = sorted(out.to_pylist(), key=lambda r: r["video_id"])
    assert got == rows  # every row once, each with its directory's value, the null partition null
    # files are read in path order, so that every node reads the rows in one order
    langs = out["lang"].to_pylist()
    assert langs == sorted(langs, key=lambda v: {None: 0, "de": 1, "en": 2}[v])
    # a trailing slash and a glob name the same files
    again = read_manifest(InputConfig(manifest=str(root) + "/"), str(tmp_path / "s"))
    assert again.equals(out)
    globbed = read_manifest(InputConfig(manifest=str(root) + "/lang=en/*.parquet"), str(tmp_path / "s"))
    assert set(globbed["video_id"].to_pylist()) == {r["video_id"] for r in rows if r["lang"] == "en"}


def test_compressed_jsonl_and_csv_files_over_s3_by_a_glob(bucket):
    import gzip
    import io

    name, fs = bucket
    part0 = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    fs.pipe(f"{name}/m/part-0.jsonl.gz", gzip.compress(part0))
    buf = io.BytesIO()
    pacsv.write_csv(pa.Table.from_pylist([{"video_id": "c", "video_path": "x/c.mp4", "lang": "fr"}]), buf)
    fs.pipe(f"{name}/m/part-1.csv.gz", gzip.compress(buf.getvalue()))
    fs.pipe(f"{name}/m/_SUCCESS", b"")
    fs.pipe(f"{name}/other/part-9.jsonl", part0)  # outside the glob
    cfg = InputConfig(manifest=f"s3://{name}/m/part-*", storage_options=fs.storage_options)
    check_input_exists(cfg)
    out = read_manifest(cfg)
    assert out.to_pylist() == ROWS + [{"video_id": "c", "video_path": "x/c.mp4", "lang": "fr"}]
    d = {"video_id": "d", "video_path": "x/d.mp4", "lang": "it"}
    fs.pipe(f"{name}/m/more/part-2.jsonl.gz", gzip.compress((json.dumps(d) + "\n").encode()))  # a subdirectory
    whole_dir = read_manifest(InputConfig(manifest=f"s3://{name}/m", storage_options=fs.storage_options))
    assert whole_dir.to_pylist() == [d] + out.to_pylist()  # path order: m/more/ before m/part-
    import fsspec

    used = fsspec.core.url_to_fs(f"s3://{name}/m", **fs.storage_options)[0]  # the instance the reads used
    assert not [k for k in used.dircache if k.startswith(f"{name}/m")]  # its listing was not kept, subdirectories too


def test_files_of_one_dataset_that_differ_in_columns(tmp_path, caplog):
    root = tmp_path / "m"
    root.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), root / "a.parquet")
    # written before the lang column was added: its rows get a null lang, with a warning naming the file
    pq.write_table(pa.table({"video_id": ["c"], "video_path": ["x/c.mp4"]}), root / "b.parquet")
    with caplog.at_level("WARNING", logger="pipeline.manifest"):
        out = read_manifest(InputConfig(manifest=str(root)), str(tmp_path / "s"))
    assert out["lang"].to_pylist() == ["en", "de", None]
    assert "b.parquet has no column(s) ['lang']" in caplog.text

    # a column the first file lacks (a dataset whose later files gained one): added, null in the earlier rows
    pq.write_table(pa.table({"video_id": ["d"], "video_path": ["x/d.mp4"], "lang": ["it"], "extra": [1]}),
                   root / "c.parquet")
    caplog.clear()
    with caplog.at_level("WARNING", logger="pipeline.manifest"):
        out = read_manifest(InputConfig(manifest=str(root)), str(tmp_path / "s"))
    assert out["extra"].to_pylist() == [None, None, None, 1] and out["lang"].to_pylist() == ["en", "de", None, "it"]
    assert "c.parquet has column(s) extra (int64) that the files before it do not hold" in caplog.text
    # a column whose values do not cast to the first's type: refused, naming both files; no spill left
    pq.write_table(pa.table({"video_id": ["d"], "video_path": ["x/d.mp4"], "lang": [[1, 2]]}), root / "c.parquet")
    with pytest.raises(ManifestError, match=r"c\.parquet: column 'lang' is list<.*does not cast"):
        read_manifest(InputConfig(manifest=str(root)), str(tmp_path / "s"))
    assert list((tmp_path / "s").iterdir()) == []


def test_a_dataset_whose_files_hold_a_column_in_narrower_types_is_read_in_the_widest(tmp_path):
    """pandas or pyarrow writing a manifest a chunk at a time types each file by its own values: a column all None in
    the first chunk is null-typed there, an integer column int32 in one file and int64 (or double) in the next.
    Read as the first file's types, the later values did not cast and the job stopped."""
    root = tmp_path / "m"
    root.mkdir()
    pq.write_table(pa.table({"video_id": ["a"], "video_path": ["a.mp4"], "note": pa.array([None], pa.null()),
                             "n": pa.array([1], pa.int32()), "meta": [{"k": 1}]}), root / "part-0.parquet")
    pq.write_table(pa.table({"video_id": ["b"], "video_path": ["b.mp4"], "note": ["late"],
                             "n": pa.array([2**40], pa.int64()), "meta": [{"k": 2, "src": "x"}]}), root / "part-1.parquet")
    pq.write_table(pa.table({"video_id": ["c"], "video_path": ["c.mp4"], "note": ["z"], "n": [2.5],
                             "meta": [None]}), root / "part-2.parquet")
    out = read_manifest(InputConfig(manifest=str(root)), str(tmp_path / "s"))
    assert [str(t) for t in out.schema.types][2:] == ["string", "double", "struct<k: int64, src: string>"]
    assert out.to_pylist() == [
        {"video_id": "a", "video_path": "a.mp4", "note": None, "n": 1.0, "meta": {"k": 1, "src": None}},
        {"video_id": "b", "video_path": "b.mp4", "note": "late", "n": float(2**40), "meta": {"k": 2, "src": "x"}},
        {"video_id": "c", "video_path": "c.mp4", "note": "z", "n": 2.5, "meta": None}]


def test_directories_and_globs_that_hold_no_manifest_are_refused_before_any_work(tmp_path, monkeypatch):
    def refused(path, match):
        with pytest.raises(ConfigError, match=match):
            check_input_exists(InputConfig(manifest=str(path)))

    empty = tmp_path / "empty"
    empty.mkdir()
    refused(empty, "holds no data files")
    (empty / "_SUCCESS").write_text("")
    refused(empty, r"holds no data files \(1 hidden")
    refused(tmp_path / "nothing-*.parquet", "holds no data files")
    literal = tmp_path / "m[1].parquet"  # a file whose name holds glob characters is that file
    pq.write_table(pa.Table.from_pylist(ROWS), literal)
    assert read_manifest(InputConfig(manifest=str(literal)), str(tmp_path / "s")).to_pylist() == ROWS

    other = tmp_path / "other"
    other.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), other / "part-0.parquet")
    (other / "README.txt").write_text("made by hand")
    refused(other, r"cannot tell the format of .*README\.txt")  # not skipped: it might hold rows
    os.remove(other / "README.txt")

    delta = tmp_path / "delta"
    (delta / "_delta_log").mkdir(parents=True)
    (delta / "_delta_log" / "00000000000000000000.json").write_text("{}")
    pq.write_table(pa.Table.from_pylist(ROWS), delta / "part-0.parquet")
    refused(delta, "Delta Lake table")
    iceberg = tmp_path / "iceberg"
    (iceberg / "metadata").mkdir(parents=True)
    (iceberg / "data").mkdir()
    (iceberg / "metadata" / "v1.metadata.json").write_text("{}")
    pq.write_table(pa.Table.from_pylist(ROWS), iceberg / "data" / "part-0.parquet")
    refused(iceberg, "Apache Iceberg table")

    mixed = tmp_path / "mixed"
    for sub in ("lang=en", "year=2024"):
        (mixed / sub).mkdir(parents=True)
        pq.write_table(pa.Table.from_pylist(ROWS), mixed / sub / "part-0.parquet")
    refused(mixed, r"partitioned by \['year'\].* by \['lang'\]")

    (other / "part-1.jsonl.zst").write_bytes(b"(\xb5/\xfd")
    monkeypatch.setattr("fsspec.available_compressions", lambda: [None, "gzip"])
    refused(other, "compressed with zstd.*pip install zstandard")


def test_a_file_cut_short_or_gone_while_read_is_a_manifest_error(tmp_path, monkeypatch):
    import gzip

    import pipeline.manifest as mf

    root = tmp_path / "m"
    root.mkdir()
    whole = gzip.compress("".join(json.dumps(r) + "\n" for r in ROWS * 50).encode())
    (root / "part-0.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ManifestError, match="cannot read manifest .*part-0.jsonl.gz as jsonl"):
        read_manifest(InputConfig(manifest=str(root)), str(tmp_path / "s"))
    # the same among files read ahead in threads: the error comes back from its thread, naming the file
    for i in (1, 2, 3):
        rows = [{"video_id": f"f{i}-{j}", "video_path": "p"} for j in range(50)]
        (root / f"part-{i}.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    with pytest.raises(ManifestError, match="cannot read manifest .*part-0.jsonl.gz as jsonl"):
        read_manifest(InputConfig(manifest=str(root)), str(tmp_path / "s"))
    for i in (1, 2, 3):
        os.remove(root / f"part-{i}.jsonl.gz")
    (root / "part-0.jsonl.gz").write_bytes(whole)

    listed = mf.manifest_files

    def then_removed(cfg):  # listed at the start, removed before it is read (a manifest being rewritten)
        fs, files = listed(cfg)
        os.remove(files[0].path)
        return fs, files

    monkeypatch.setattr(mf, "manifest_files", then_removed)
    with pytest.raises(ManifestError, match="part-0.jsonl.gz is gone .*being rewritten"):
        read_manifest(InputConfig(manifest=str(root)), str(tmp_path / "s"))
    assert list((tmp_path / "s").iterdir()) == []


def test_the_digest_of_what_a_node_read_depends_on_its_rows_not_its_batches():
    from pipeline.manifest import ManifestDigest

    ids = pa.array([f"v{i}" for i in range(100)])
    paths = pa.array([None if i % 7 == 0 else f"p/{i}.mp4" for i in range(100)])

    def digest(ids, paths, cuts):
        d = ManifestDigest()
        for a, b in zip([0] + cuts, cuts + [len(ids)]):
            d.update(ids.slice(a, b - a), paths.slice(a, b - a))
        return d.summary()

    one = digest(ids, paths, [])
    assert one["rows"] == 100
    assert digest(ids, paths, [7, 8, 50, 99]) == one  # other batches, same rows (slices with offsets too)
    swapped = pa.array([f"v{i}" for i in [1, 0] + list(range(2, 100))])
    assert digest(swapped, paths, [])["digest"] != one["digest"]  # the same ids in another order
    moved = pa.array([f"p/{i}.mp4" for i in range(100)])
    assert digest(ids, moved, [])["digest"] != one["digest"]  # the nulls filled
    other = pa.array([None if i % 7 == 0 else f"p/{i}.mp4" for i in range(99)] + ["q/99.mp4"])
    assert digest(ids, other, [30])["digest"] != one["digest"]  # one path changed
    joined = pa.array([f"v{i}" for i in range(98)] + ["v98v99", ""])  # the same bytes cut at another place
    assert digest(joined, paths, [])["digest"] != one["digest"]


def test_nodes_that_read_different_manifests_stop_every_rank(tmp_path):
    from pipeline.manifest import build_spill, nodes_disagree, spill_read
    from pipeline.runner import _node_manifest

    same = {"rows": 3, "files": 1, "digest": "a"}
    assert nodes_disagree({0: ("h0", same), 1: ("h1", dict(same))}) is None
    said = nodes_disagree({0: ("h0", same), 1: ("h1", same), 2: ("h2", {"rows": 5, "files": 2, "digest": "b"}),
                           3: ("h3", {"rows": 3, "files": 1, "digest": "c"})})
    assert said.startswith("the nodes read different manifests: node 0 (h0) read 3 rows from 1 file(s), "
                           "node 2 (h2) 5 rows from 2 file(s), node 3 (h3) as many, with other ids or paths.")
    assert "node 1" not in said

    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cfg = InputConfig(manifest=str(path))
    spills = tmp_path / "s"
    other = dict(spill_read(build_spill(cfg, str(tmp_path / "elsewhere"), "x")), rows=4)

    class TwoNodes:  # this node's rank 0 beside node 1's rank 0, which read another manifest
        def __new__(cls):
            from pipeline.distributed import DistContext

            class Ctx(DistContext):
                def gather(self, obj):
                    return [obj, ("node-b", 1, 0, "/elsewhere/spill.parquet", None, other)]

            return Ctx(rank=0, world_size=2, local_rank=0, local_world_size=1, host="node-a", node_rank=0)

    with pytest.raises(ManifestError, match=r"node 0 \(node-a\) read 2 rows from 1 file\(s\), node 1 \(node-b\) 4 "
                                            "rows"):
        _node_manifest(TwoNodes(), cfg, str(spills), "r")
    assert list(spills.iterdir()) == []  # this node's spill removed

    # the other node could not read the manifest at all: its error here, and this node's spill removed too
    failed = ("node-b", 1, 0, None, ("ManifestError", "cannot read manifest m.jsonl as jsonl: bad"), None)

    class FailedPeer:
        def __new__(cls):
            from pipeline.distributed import DistContext

            class Ctx(DistContext):
                def gather(self, obj):
                    return [obj, failed]

            return Ctx(rank=0, world_size=2, local_rank=0, local_world_size=1, host="node-a", node_rank=0)

    with pytest.raises(ManifestError, match="cannot read manifest m.jsonl as jsonl: bad"):
        _node_manifest(FailedPeer(), cfg, str(spills), "r")
    assert list(spills.iterdir()) == []


def test_a_start_check_that_fails_on_some_ranks_stops_every_rank_with_their_error():
    from pipeline.distributed import DistContext
    from pipeline.errors import DependencyError
    from pipeline.runner import _on_every_rank

    def rank(r, reports):
        class Ctx(DistContext):
            def gather(self, obj):
                return [obj if i == r else reports[i] for i in range(len(reports))]

        return Ctx(rank=r, world_size=len(reports), local_rank=0, local_world_size=1, host=f"h{r}")

    missing = ("ConfigError", "input.manifest m.parquet does not exist")
    reports = [(0, "h0", None), (1, "h1", missing), (2, "h2", None), (3, "h3", missing),
               (4, "h4", ("DependencyError", "gs:// URLs need the gcsfs package: pip install gcsfs"))]
    with pytest.raises(ConfigError) as raised:  # a rank whose own check passed stops with the others' error
        _on_every_rank(rank(0, reports), "x", lambda: "ok")
    assert str(raised.value) == ("input.manifest m.parquet does not exist (on ranks 1,3 on h1, h3; 1 other rank(s) "
                                 "failed otherwise)")

    def fails():
        raise DependencyError("gs:// URLs need the gcsfs package: pip install gcsfs")

    only4 = [(0, "h0", None), (1, "h1", None), (2, "h2", None), (3, "h3", None), reports[4]]
    said = r"^gs:// URLs need the gcsfs package: pip install gcsfs \(on rank 4 on h4\)$"
    with pytest.raises(DependencyError, match=said):
        _on_every_rank(rank(4, only4), "x", fails)
    assert _on_every_rank(rank(2, [(i, f"h{i}", None) for i in range(5)]), "x", lambda: 42) == 42

    class Alone(DistContext):  # one process: its own error, as it was
        def gather(self, obj):
            raise AssertionError("no collective with one rank")

    with pytest.raises(DependencyError, match=r"^gs:// URLs need the gcsfs package: pip install gcsfs$"):
        _on_every_rank(Alone(), "x", fails)


LATE = 60_000  # rows before the change: past the streaming readers' first block (1 MB), whose types they keep


def _late(fmt: str, late: dict, early: dict | None = None) -> str:
    """A manifest of LATE + 2 rows whose last two rows hold ``late`` (the rows before ``early``)."""
    rows = [{"video_id": f"id{i}", "video_path": f"v/{i}.mp4", **(late if i >= LATE else (early or {}))}
            for i in range(LATE + 2)]
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return ",".join(keys) + "\n" + "".join(",".join(str(r.get(k, "")) for k in keys) + "\n" for r in rows)


# (format, the early rows' fields, the last rows' fields, the type read, the first and the last row's value)
LATE_CASES = {
    "jsonl: a field that first appears late": ("jsonl", None, {"extra": 5}, "int64", None, 5),
    "jsonl: null, then a number": ("jsonl", {"x": None}, {"x": 3}, "int64", None, 3),
    "jsonl: integers, then a float": ("jsonl", {"x": 1}, {"x": 2.5}, "double", 1.0, 2.5),
    "jsonl: numbers, then a string": ("jsonl", {"x": 1}, {"x": "n/a"}, "string", "1", "n/a"),
    "jsonl: an object that gains a key": ("jsonl", {"x": {"a": 1}}, {"x": {"a": 1, "b": "z"}},
                                          "struct<a: int64, b: string>", {"a": 1, "b": None}, {"a": 1, "b": "z"}),
    "csv: empty, then text": ("csv", {"x": ""}, {"x": "late"}, "string", "", "late"),
    "csv: integers, then a float": ("csv", {"x": 7}, {"x": 2.5}, "double", 7.0, 2.5),
    "csv: dates, then text": ("csv", {"x": "2024-01-01"}, {"x": "unknown"}, "string", "2024-01-01", "unknown"),
}


@pytest.mark.parametrize("case", sorted(LATE_CASES))
def test_csv_and_jsonl_whose_types_change_after_the_first_block_are_read_whole(tmp_path, case, caplog):
    """pyarrow's streaming readers take a file's types from its first block (1 MB) and stop at a later value that
    does not fit them: a sparse field or column, an ``n/a`` among numbers. Such a manifest stopped the job at the
    start ("JSON parse error: unexpected field", "CSV conversion error to null"); the file is now read again whole,
    its types unified over all its rows (the oracle: pyarrow's whole-file readers, and Python's json where a field
    holds two kinds of value)."""
    fmt, early, late, typ, first, last = LATE_CASES[case]
    path = tmp_path / f"m.{fmt}"
    path.write_text(_late(fmt, late, early))
    with caplog.at_level("WARNING", "pipeline.manifest"):
        m = open_manifest(InputConfig(manifest=str(path)), str(tmp_path / "spill"))
    try:
        column = m.schema.names[2]
        assert str(m.schema.field(column).type) == typ and len(m) == LATE + 2
        rows = m.rows([0, LATE + 1])
        assert [rows[0][column], rows[1][column]] == [first, last]
        assert m.kept_ids()[LATE + 1].as_py() == f"id{LATE + 1}"
        assert len(os.listdir(tmp_path / "spill")) == 2  # the spill and its ids file: the first attempt's are gone
    finally:
        m.close()
    assert "the manifest is read again, that file whole" in caplog.text


def test_small_files_are_read_whole_at_once_and_only_a_large_one_has_the_manifest_read_again(tmp_path, caplog,
                                                                                            monkeypatch):
    """A dataset of many small JSONL files whose optional field appears late in each: read whole at once (they are
    held whole anyway), the manifest is not read again for each of them; a file over the read-ahead size streams, and
    its change has the manifest read again once."""
    import pipeline.manifest as mf

    (tmp_path / "ds").mkdir()
    for i in range(3):
        (tmp_path / "ds" / f"part-{i}.jsonl").write_text(_late("jsonl", {"extra": i}).replace('"id', f'"p{i}-id'))
    with caplog.at_level("WARNING", "pipeline.manifest"):
        table = read_manifest(InputConfig(manifest=str(tmp_path / "ds")), str(tmp_path / "spill"))
    assert table.num_rows == 3 * (LATE + 2) and table["extra"].to_pylist()[-1] == 2
    assert "read again" not in caplog.text
    monkeypatch.setattr(mf, "READ_AHEAD_MAX_BYTES", 1 << 20)  # each file now over it
    with caplog.at_level("WARNING", "pipeline.manifest"):
        table = read_manifest(InputConfig(manifest=str(tmp_path / "ds")), str(tmp_path / "spill"))
    assert table.num_rows == 3 * (LATE + 2) and caplog.text.count("the manifest is read again, that file whole") == 3


def test_a_late_type_change_in_a_compressed_file_of_a_dataset_read_ahead(tmp_path):
    import gzip

    (tmp_path / "ds").mkdir()
    with gzip.open(tmp_path / "ds" / "a.jsonl.gz", "wt") as f:  # read ahead in a thread, decompressed
        f.write(_late("jsonl", {"x": 2.5}, {"x": 2}))
    (tmp_path / "ds" / "b.jsonl").write_text('{"video_id": "b", "video_path": "b.mp4", "x": 1}\n')
    table = read_manifest(InputConfig(manifest=str(tmp_path / "ds")), str(tmp_path / "spill"))
    assert table.num_rows == LATE + 3 and table.schema.field("x").type == pa.float64()
    assert table["x"].to_pylist()[-3:] == [2.5, 2.5, 1.0]
    # a pandas categorical in one file and plain strings in the next: no wider type, but the strings cast
    (tmp_path / "cat").mkdir()
    pq.write_table(pa.table({"video_id": ["a"], "video_path": ["a"], "lang": pa.array(["en"]).dictionary_encode()}),
                   tmp_path / "cat" / "a.parquet")
    pq.write_table(pa.table({"video_id": ["b"], "video_path": ["b"], "lang": ["de"]}), tmp_path / "cat" / "b.parquet")
    assert read_manifest(InputConfig(manifest=str(tmp_path / "cat")), str(tmp_path / "spill"))["lang"].to_pylist() \
        == ["en", "de"]
    # across files, types are not widened: a later file whose values do not fit the first's stops the job, naming both
    (tmp_path / "ds" / "c.jsonl").write_text('{"video_id": "c", "video_path": "c.mp4", "x": "n/a"}\n')
    with pytest.raises(ManifestError, match=r"c.jsonl: column 'x' is string, in .*a.jsonl.gz double, and does not "
                                            "cast"):
        read_manifest(InputConfig(manifest=str(tmp_path / "ds")), str(tmp_path / "spill"))
