"""The manifest's columns in types that every reader of the output reads.

A manifest's other columns pass through to every row, so their types become the output's. Some types that pyarrow,
pandas and DuckDB write, and that pyarrow reads back from Parquet, CSV and JSON, make the whole output unreadable
for a reader the users have (each measured with Spark 4.3, DuckDB 2.0 and Polars 2.1 on a part the job wrote):

- ``timestamp[ns]`` (pandas' ``datetime64[ns]``, DuckDB's ``TIMESTAMP_NS``): Spark refuses the file ("Illegal
  Parquet type: INT64 (TIMESTAMP(NANOS,...))"), and a value with digits below a microsecond stopped the job itself
  (pyarrow cannot make a Python ``datetime`` of it);
- ``time32``/``time64`` (DuckDB's ``TIME``; a CSV column such as ``00:01:30``, which pyarrow's CSV reader takes for
  a time of day): Spark refuses the file ("The data type TIME is not supported");
- ``float16``: Spark refuses the file; ``decimal256`` beyond 38 digits: Spark and Polars refuse it;
- the ``arrow.uuid`` extension (DuckDB's ``UUID``): Spark refuses the file, and as an id column its 16 raw bytes
  were cast to a string (an "Invalid UTF8" error, or where the bytes happen to be UTF-8, a garbled id);
- ``list_view``: Polars panics reading the file; a struct without fields (JSON's ``{}``): Parquet cannot hold it,
  so the job stopped at its first write.

Each becomes the nearest type that all of them read, without losing a value where one exists: timestamps in
microseconds (Spark's, Hive's and BigQuery's precision; digits below are dropped, said in a warning), times of day
and UUIDs as their usual strings (``01:02:03.500000``, ``8-4-4-4-12`` hex), ``float32``, ``decimal128`` or the
decimal's string, ``list``, and ``null`` for an empty struct. Other extension types stay (``arrow.json``,
``arrow.fixed_shape_tensor`` and ``arrow.bool8`` read in all three as their storage).
"""

from __future__ import annotations

import binascii

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


MAX_DECIMAL_DIGITS = 38  # Spark's and Polars' largest decimal; Parquet and pyarrow hold up to 76


def _never(_t: pa.DataType) -> bool:
    return False


# pyarrow before 16 has no list views (and before 18 no UUID type, which _is_uuid finds by its name)
_is_list_view = getattr(pa.types, "is_list_view", _never)
_is_large_list_view = getattr(pa.types, "is_large_list_view", _never)


def _is_uuid(t: pa.DataType) -> bool:
    return isinstance(t, pa.BaseExtensionType) and t.extension_name == "arrow.uuid"


def portable_type(t: pa.DataType) -> pa.DataType:
    """The type a manifest column of type ``t`` is written in (``t`` itself where every reader reads it)."""
    if _is_uuid(t):
        return pa.string()
    if pa.types.is_timestamp(t) and t.unit == "ns":
        return pa.timestamp("us", t.tz)
    if pa.types.is_time(t):
        return pa.string()
    if pa.types.is_float16(t):
        return pa.float32()
    if pa.types.is_decimal(t) and (t.precision > MAX_DECIMAL_DIGITS or pa.types.is_decimal256(t)):
        return pa.decimal128(t.precision, t.scale) if t.precision <= MAX_DECIMAL_DIGITS else pa.string()
    if pa.types.is_struct(t):
        if t.num_fields == 0:
            return pa.null()
        return pa.struct([f.with_type(portable_type(f.type)) for f in t])
    if _is_list_view(t) or _is_large_list_view(t):
        value = t.value_field.with_type(portable_type(t.value_type))
        return pa.list_(value) if _is_list_view(t) else pa.large_list(value)
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        value = t.value_field.with_type(portable_type(t.value_type))
        if pa.types.is_fixed_size_list(t):
            return pa.list_(value, t.list_size)
        return pa.list_(value) if pa.types.is_list(t) else pa.large_list(value)
    if pa.types.is_map(t):
        return pa.map_(t.key_field.with_type(portable_type(t.key_type)),
                       t.item_field.with_type(portable_type(t.item_type)), t.keys_sorted)
    return t


def uuid_strings(values: pa.Array) -> pa.Array:
    """``arrow.uuid`` values (or 16-byte binaries) as their canonical strings, ``8-4-4-4-12`` lower-case hex."""
    storage = values.storage if isinstance(values, pa.ExtensionArray) else values
    n = len(storage)
    if n == 0:
        return pa.array([], pa.string())
    data = np.frombuffer(storage.buffers()[1], np.uint8)[storage.offset * 16:(storage.offset + n) * 16]
    hexed = pa.array(np.frombuffer(binascii.hexlify(data.tobytes()), dtype="S32")).cast(pa.string())
    pieces = [pc.utf8_slice_codeunits(hexed, a, b) for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32))]
    out = pc.binary_join_element_wise(*pieces, "-")
    return pc.if_else(storage.is_null(), pa.scalar(None, pa.string()), out) if storage.null_count else out


def to_portable(values: pa.Array, target: pa.DataType, truncated: set[str] | None = None,
                where: str = "") -> pa.Array:
    """``values`` in ``target`` (``portable_type(values.type)``).

    Args:
        values: a column (or a child of one) as read.
        target: the type it is written in.
        truncated: where given, the dotted names of columns whose timestamps lost digits below a microsecond are
            added to it.
        where: the column's dotted name, for ``truncated``.
    """
    t = values.type
    if t.equals(target):
        return values
    if _is_uuid(t):
        return uuid_strings(values)
    if pa.types.is_null(target):  # an empty struct: nothing in it but whether it is null
        return pa.nulls(len(values))
    mask = values.is_null() if values.null_count else None
    if pa.types.is_struct(t):
        children = [to_portable(values.field(i), f.type, truncated, f"{where}.{f.name}") for i, f in enumerate(target)]
        return pa.StructArray.from_arrays(children, fields=list(target), mask=mask)
    if _is_list_view(t) or _is_large_list_view(t):
        # rebuilt from its lengths: pyarrow 26's cast of a list view to a list makes an invalid array (its offsets
        # one short), which the Parquet writer refuses
        large = _is_large_list_view(t)
        lengths = pc.fill_null(pc.list_value_length(values), 0).to_numpy()
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]), pa.int64() if large else pa.int32())
        cls = pa.LargeListArray if large else pa.ListArray
        plain = cls.from_arrays(offsets, pc.list_flatten(values), mask=mask)
        return to_portable(plain, target, truncated, where)
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        offsets = values.offsets  # of a slice: into the whole child, from where the slice begins
        first, last = offsets[0].as_py(), offsets[-1].as_py()
        items = to_portable(values.values.slice(first, last - first), target.value_type, truncated, f"{where}[]")
        cls = pa.ListArray if pa.types.is_list(t) else pa.LargeListArray
        return cls.from_arrays(pc.subtract(offsets, pa.scalar(first, offsets.type)), items, type=target, mask=mask)
    try:
        return values.cast(target)  # times, float16, decimals, timestamps; fixed-size lists and maps of them
    except pa.ArrowInvalid:
        if "timestamp[ns" not in str(t):
            raise
        if truncated is not None:  # digits below a microsecond
            truncated.add(where)
        return values.cast(target, safe=False)


def portable_batch(batch: pa.RecordBatch, keep: set[str] | frozenset[str] = frozenset(),
                   truncated: set[str] | None = None) -> pa.RecordBatch:
    """``batch`` with every column but those in ``keep`` in its portable type (``portable_type``)."""
    arrays, changed = [], False
    for name, column in zip(batch.schema.names, batch.columns):
        target = column.type if name in keep else portable_type(column.type)
        if not target.equals(column.type):
            column, changed = to_portable(column, target, truncated, name), True
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names) if changed else batch


def changes(schema: pa.Schema) -> list[str]:
    """``name (type -> type)`` for each column of ``schema`` that ``portable_batch`` writes in another type."""
    return [f"{f.name} ({f.type} -> {portable_type(f.type)})" for f in schema
            if not portable_type(f.type).equals(f.type)]
