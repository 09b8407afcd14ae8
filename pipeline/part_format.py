"""How the output's Parquet files are written and read back here: with a CRC-32 on every page, verified by every read.

Parquet's readers check a file's framing (its footer, each page's header and length, the codec's stream), not the
values in a page: a bit flipped in a page of numbers after the commit (a disk's bad sector, a faulty copy between
stores, memory on the way) reads as another number. Measured with pyarrow 26 on a zstd part of 200 random
probabilities (``tests/benchmarks/bench_page_checksums.py``): of the 1,856 single-byte flips in that column's pages,
1,679 read without any error as other values, 132 failed the read and 45 changed nothing; DuckDB 2.0 and Polars 2.1
read such a part without complaint. A training set picked by ``prob > 0.9`` from such a table is silently another
one.

Every file the job writes therefore carries Parquet's page checksum (a CRC-32 of each page's bytes, in its header)
and says so in its footer (``CHECKSUM_KEY``); every read of the output by the job, compaction, ``jobs/status.py``
and ``jobs/verify.py`` verifies each page it reads against it, so a flipped bit is an error there, never a value. A
part written by an earlier version has no checksums: it reads as before, unverified, and ``jobs/verify.py`` counts it.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

CHECKSUM_KEY = b"mediasieve.page_checksums"
"""A footer key of the files written here: their pages carry CRC-32 checksums (the Parquet header's ``crc``)."""
CHECKSUM_KIND = b"crc32"
CHECKSUM_ERROR = "CRC checksum verification failed"
"""What Arrow's error says where a page's bytes do not match its checksum (it names no file)."""

CHECKED = ds.ParquetFileFormat(
    default_fragment_scan_options=ds.ParquetFragmentScanOptions(page_checksum_verification=True))
"""Parquet for ``pyarrow.dataset``, each page read verified against its checksum where it has one."""


def marked(schema: pa.Schema) -> pa.Schema:
    """``schema`` with the footer key that says its file's pages carry checksums."""
    return schema.with_metadata({**(schema.metadata or {}), CHECKSUM_KEY: CHECKSUM_KIND})


def write_table(table: pa.Table, where: Any, compression: str | None = "zstd", **options: Any) -> None:
    """``pq.write_table`` with a checksum on every page, and the footer saying so."""
    pq.write_table(table.replace_schema_metadata(marked(table.schema).metadata), where, compression=compression,
                   write_page_checksum=True, **options)


def writer(where: Any, schema: pa.Schema, compression: str | None = "zstd") -> pq.ParquetWriter:
    """A ``pq.ParquetWriter`` that writes a checksum on every page, its footer saying so."""
    return pq.ParquetWriter(where, marked(schema), compression=compression, write_page_checksum=True)


def dataset(files: str | list[str], fs) -> ds.Dataset:
    """The Parquet files ``files`` on ``fs`` as one dataset whose every page read is verified."""
    return ds.dataset(files, format=CHECKED, filesystem=fs)


def read_table(source: Any, **options: Any) -> pa.Table:
    """``pq.read_table`` with every page verified against its checksum."""
    return pq.read_table(source, page_checksum_verification=True, **options)


def open_file(source: Any) -> pq.ParquetFile:
    """``pq.ParquetFile`` whose every page read is verified against its checksum."""
    return pq.ParquetFile(source, page_checksum_verification=True)


def has_checksums(metadata: pq.FileMetaData) -> bool:
    """Whether the file whose footer is ``metadata`` was written with page checksums (by this version or later)."""
    return (metadata.metadata or {}).get(CHECKSUM_KEY) == CHECKSUM_KIND
