"""Job configuration: nested frozen dataclasses loaded from YAML, overridden by ``section.key=value``.

Every field has a docstring-style comment; ``Literal`` marks a closed set of choices. ``load_config`` turns
unknown keys, wrong types and bad values into one ``ConfigError`` before any work starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from pipeline.errors import ConfigError, redact_urls


@dataclass(frozen=True)
class InputConfig:
    """Where the items come from."""

    manifest: str | None = None
    """Manifest URL (any fsspec URL), one row per item: a Parquet, JSONL or CSV file (JSONL and CSV also gzip-, bz2-,
    xz- or zstd-compressed); a directory, read as a dataset that Spark, DuckDB or pyarrow wrote (every data file
    below it in path order; names beginning with ``_`` or ``.`` skipped; ``key=value`` directories added as string
    columns); or a glob of files (``s3://b/manifest/part-*.parquet``)."""
    format: Literal["auto", "parquet", "jsonl", "csv"] = "auto"
    """Manifest format; ``auto`` picks it from each file's extension."""
    listing_glob: str | None = None
    """Listing mode instead of a manifest: a glob over a storage prefix (e.g. ``s3://b/videos/**/*.mp4``)."""
    id_column: str = "video_id"
    """Column holding the item id (unique)."""
    path_column: str = "video_path"
    """Column holding the item path: absolute (any fsspec URL) or relative to each storage tier's root."""
    on_duplicate_ids: Literal["error", "drop"] = "error"
    """Duplicate ids: ``error`` stops before any work, naming them; ``drop`` keeps the first with a warning."""
    limit: int | None = None
    """Process only the first N items of the manifest (for trials)."""
    portable_types: bool = True
    """Write the manifest's other columns in types that Spark, DuckDB, Polars and pyarrow all read
    (``pipeline.portable``): nanosecond timestamps in microseconds, times of day and UUIDs as strings, float16 as
    float32, list views as lists, an empty struct as null. False keeps them as read (an output begun before this
    setting whose parts hold such a column resumes only so); an id column is always a string, a UUID in its
    canonical form."""
    storage_options: dict = field(default_factory=dict)
    """fsspec storage options for the manifest or listing URL."""


@dataclass(frozen=True)
class TierConfig:
    """One shared-filesystem or object-store tier that relative paths resolve against."""

    name: str = ""
    """Name recorded in ``result_info.storage_tier`` when this tier serves an item."""
    root: str = ""
    """Root URL of the tier: a directory (a FUSE mount of a parallel filesystem), or ``s3://bucket/prefix``."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options, e.g. ``{client_kwargs: {endpoint_url: ..., region_name: ...}}`` for S3, MinIO or OSS."""


@dataclass(frozen=True)
class StorageConfig:
    """The node-local cache and the ordered fetch tiers behind it."""

    cache_dir: str = "/tmp/mediasieve-cache"
    """Node-local cache directory (shared by the ranks of a node). What earlier runs left there (a crash, a
    restart) counts towards the limit and is evicted first; a partial download or entry unused for twice
    ``runtime.stall_timeout_s`` is abandoned and removed (the age protects another job sharing the directory)."""
    cache_max_bytes: int = 180_000_000_000
    """Byte limit of the cache; finished items are evicted oldest first, never one still in use. Where the disk
    fills before the limit, the rank evicts everything not in use and tries again once; if it is still full, the
    rank stops (``CacheFullError``, exit code 1) rather than fail every item left in its share."""
    use_cache: bool = True
    """Copy every fetched item into the cache (False: local-filesystem tiers are read in place)."""
    fetch: bool = True
    """False: items are not fetched at all (control-plane runs with the ``noop`` filter; no media is read)."""
    tiers: tuple[TierConfig, ...] = ()
    """Tiers tried in order for relative paths after the cache."""
    retries: int = 4
    """Retries of a transient fetch error (timeout, 5xx, throttling) per tier."""
    backoff_base_s: float = 0.5
    """First retry delay; doubles each retry, with full jitter."""
    backoff_max_s: float = 30.0
    """Cap on one retry delay."""
    max_item_bytes: int = 50_000_000_000
    """Items larger than this fail with a FetchError instead of filling the disk."""
    http_read_timeout_s: float = 60.0
    """http(s) URLs: a server that sends nothing for this long fails the attempt (transient, so it is retried).
    There is no limit on a whole download, which aiohttp otherwise sets to 5 minutes (a 5 GB file at 10 MB/s
    never finished)."""
    fetch_silence_s: float | None = 300.0
    """A fetch during which no byte arrives and no new attempt starts for this long is abandoned: its item gets a
    ``FetchTimeout`` row (retryable) and the producer goes on (a hung mount or an endpoint that never answers
    otherwise holds the producer, and then the rank, for good, and on every rerun again). When as many fetches
    in a row as there are producers go silent with none served between them, the storage is down for this node
    and the rank stops (``StorageHungError``, exit code 1). Below ``runtime.stall_timeout_s``; None: no limit."""
    fetch_min_bytes_per_s: float = 1024.0
    """A fetch that gets fewer bytes than this per second, on average over the last ``fetch_silence_s``, is given up
    as a silent one is (a link that trickles a byte now and then is never silent; curl's ``--speed-limit``). Far below
    any working link: a slow but steady download is never cut, however long it takes. 0: silence only."""
    hung_tier_skip_s: float = 600.0
    """A tier on which a fetch went silent (``fetch_silence_s``) while later tiers remain is skipped for this long:
    its items are fetched from the tiers after it at once, instead of each waiting out the silence. Then it is tried
    again; still silent, it is skipped twice as long (up to 16 times this), until it serves a fetch."""


@dataclass(frozen=True)
class RuntimeConfig:
    """Threads, queue, work units and device."""

    producers: int = 6
    """Fetch threads per rank."""
    consumers: int = 6
    """Decode-and-filter threads per rank."""
    queue_depth: int = 16
    """Fetched items waiting for a consumer; producers block when it is full."""
    unit_size: int = 16
    """Items per work unit; ranks pull the next unit dynamically."""
    stall_timeout_s: float = 900.0
    """No item finished for this long while work remains: the rank reports a stall and stops (a full task queue
    counts from the limit of the last item in the consumers' hands: ``item_timeout_per_hour_s``)."""
    item_timeout_s: float | None = 600.0
    """An item still in its filters after this long gets an ``ItemTimeout`` failure row, and a fresh consumer
    thread takes over from the stuck one (Python cannot kill a thread: it is abandoned, and its late result, if
    any, is dropped). Below ``stall_timeout_s``; None: no limit (a hanging file then stalls the rank). Longer media
    get more: ``item_timeout_per_hour_s``."""
    item_timeout_per_hour_s: float = 1200.0
    """Added to ``item_timeout_s`` per hour of the item's media (its probed duration, once a filter has probed it):
    a 2-hour film gets 600 + 2400 s. The signal filters read a long clip at 4 frames a second all through, about a
    whole decode of it: an hour of 1080p on one CPU decoder thread takes minutes, past a limit set for clips. While
    an item is within its limit, a full task queue is no stall (``stall_timeout_s`` counts from its deadline). 0:
    one limit for every item."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: the rank's LOCAL_RANK GPU when CUDA is present, else CPU."""
    empty_cache_every: int = 10
    """On GPU, ``torch.cuda.empty_cache()`` every N items per consumer."""
    dist_timeout_s: float = 7200.0
    """torch.distributed collective timeout (barriers wait for the slowest rank to finish its work)."""
    shutdown_grace_s: float = 20.0
    """After SIGTERM, how long items already in a filter may take before they are abandoned."""
    strict_gpu: bool = False
    """Any fallback from a requested GPU provider, or a CUDA failure at run time, is fatal (``--strict-gpu``)."""
    mixed_software: Literal["warn", "fail"] = "warn"
    """Ranks whose software differs (a node on another image: another FFmpeg, torch or silero-vad, whose rows may
    differ for the same input): ``warn`` says so at the start and goes on (``summary.json``'s ``software`` lists
    each set); ``fail`` stops every rank before any work, naming what differs."""
    torch_threads: int | None = None
    """torch intra-op threads per rank (None: leave torch's default)."""
    progress: bool = True
    """Show a tqdm bar per rank."""
    metrics_interval_s: float = 10.0
    """Seconds between lines of the per-rank JSON-lines metrics log."""
    prometheus_port: int | None = None
    """Serve Prometheus metrics on this port plus the local rank (None: off)."""


@dataclass(frozen=True)
class ModelPoolConfig:
    """Exclusive model instances per rank."""

    instances: int = 6
    """Instances per model and rank (one per consumer is enough)."""
    acquire_timeout_s: float = 300.0
    """Waiting longer than this for a free instance fails the item with ModelTimeout."""
    model_cache_dir: str | None = None
    """Node-local directory for downloaded model files (default: ``<storage.cache_dir>/models``)."""


@dataclass(frozen=True)
class OutputConfig:
    """Where and how rows are written."""

    dir: str = ""
    """Output directory (any fsspec URL)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for the output URL."""
    rows_per_file: int = 2000
    """A part file is committed every N rows ..."""
    flush_interval_s: float = 120.0
    """... or every T seconds, whichever comes first."""
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"
    """Parquet compression codec."""
    compact_mb: float | None = None
    """At the end of a complete run, rank 0 merges the small part files into parts of about this many MB before
    the summary and ``_SUCCESS`` (``pipeline.compaction``; ``jobs/compact.py`` does the same on demand). None: no."""
    lease_timeout_s: float = 120.0
    """A run's lease on the output directory is live while its heartbeat is younger than this."""
    commit_timeout_s: float | None = 600.0
    """A write to the output that has not finished after this long (a part's commit with its retries, the lease at
    the start, the summary) means the output storage is hung (a hung mount): the rank stops with
    ``OutputHungError`` (exit code 1) and its uncommitted rows are left for the rerun, instead of the process
    hanging, unseen, until the scheduler's time limit. The lease's release and the metrics upload are held to it
    too. None: no limit."""
    finish_timeout_s: float | None = 3600.0
    """The end of a run on rank 0 (reading the committed parts for the summary, removing second success rows,
    compacting when asked, writing the summary and the marker) that has not finished after this long means the
    output storage is hung: the rank stops with ``OutputHungError`` (exit code 1), every row stays committed, and the
    rerun finishes the output. Its reads (the id and status columns of every part) take as long as the output is
    large: raise it for outputs of billions of rows, or for compaction of terabytes. None: no limit."""


@dataclass(frozen=True)
class ResumeConfig:
    """What a rerun on the same output directory does."""

    retry_failed: bool | Literal["retryable"] = True
    """Redo items whose only rows are failures. False: skip them too. ``retryable``: redo only those whose latest
    failure row says ``retryable`` (a fetch timeout, an out-of-memory, a transient storage error), and skip those
    that failed for good (corrupt or missing media, a crash ledger refusal): on a corpus with 1% corrupt files, a
    week's elastic restarts and reruns would otherwise fetch and decode them again each time."""
    allow_config_change: bool = False
    """Resume even though the input, the filters or the settings that change the pictures (``video``'s
    ``decode_max_side``, ``square_pixels``, ``tone_map``, ``deinterlace``) differ from the recorded config: the
    rows of the two configs then sit in one table."""
    on_schema_change: Literal["fail", "conform"] = "fail"
    """When the committed rows have another schema than this run writes (another mediasieve version or
    model): ``fail`` stops before any work; ``conform`` writes the new rows in the committed schema (fields it
    lacks are dropped, fields this run no longer fills are null), so the table stays one table to its readers.
    A changed type always stops."""
    on_software_change: Literal["warn", "fail"] = "warn"
    """When this run's software (``pipeline.software``: FFmpeg's libraries, PyAV, torch, silero-vad, the models'
    runtimes, mediasieve's own commit) differs from the last run's that made rows here: ``warn`` says what changed
    and goes on (``software_history`` in ``_config.json`` says which runs made which rows: refusing would stop every
    rerun after a security update); ``fail`` stops before any work, naming what changed, for a table that must come
    from one build."""
    max_item_crashes: int | None = 2
    """An item in flight when its process died (a segfault or abort in a native decoder, the OOM killer) is a
    suspect on the rerun: rehearsed in a child process, where a crash gives it a ``CrashError`` row, then run
    alone; one that was in flight in this many deaths is not tried again (``CrashError``). The ledger is
    ``<output.dir>/_crashes.json`` (delete an entry to try the item again). None: no journal, no ledger."""


@dataclass(frozen=True)
class VideoConfig:
    """How video is decoded for the filters (once per item)."""

    backends: tuple[str, ...] = ("decord", "torchcodec", "pyav", "pillow")
    """Decoder backends in order of preference; the next takes over when one cannot open or decode a file
    (``pillow``: animated WebP, which FFmpeg does not decode)."""
    decode_device: Literal["cpu", "cuda"] = "cpu"
    """``cuda``: NVDEC decode on the rank's GPU through torchcodec's CUDA build or PyAV (measure first: CPU decode
    was faster on an H200's 16 cores; NVDEC saved CPU time where frames are decoded small). torchcodec and PyAV
    are then tried first on GPU ranks, the other backends after them on the CPU, and
    ``result_info.decode_backend`` reads ``torchcodec-nvdec`` or ``pyav-nvdec`` for what NVDEC decoded."""
    max_frames: int = 8192
    """An item whose frame plan needs more frames fails (a hostile file cannot exhaust a worker; the memory they take
    is bounded by ``max_decoded_bytes``). 2048 before: the users' four classifiers (48 frames, 64 windows each,
    spread over a long clip) need about 6,200 frames of a long clip, at a long side of about 455 in the reduced
    pass (``reduced_pass_bytes``), 2.2 GB."""
    max_pixels: int = 8192 * 4320
    """Frames larger than this fail the item."""
    max_decoded_bytes: int = 8 << 30
    """An item whose decoded frames (count x width x height x 3, after ``decode_max_side``) would pass this fails
    before decoding: the two caps above alone allow 8192 frames of 8K, 870 GB."""
    reduced_pass_bytes: int | None = 320 << 20
    """An item whose frames for every filter would take more than this in one pass decodes the frames that need
    fewer pixels (the static and scene-cut filters' 4 a second, at a long side of 256 or less; a clip classifier's,
    at its model's short side) in a second pass at that size. Measured on this 2-core CPU with the default
    filters: a 2-minute 1080p clip took 47-54 s and a peak RSS of 7.5-8.4 GB in one pass (2.8 GB of frames; a 4K
    clip of over 80 s passed ``max_decoded_bytes``), 13-17 s and 2.0 GB in two (0.2 GB of frames); 30 s of 1080p
    9.0 s against 5.6 s, 10 s 3.2 against 2.1. Below about 300 MB one pass is faster (720p 20 s: 1.3 s against
    1.8): the second pass decodes again what lies near the first's frames. None: always one pass."""
    decode_max_side: int | None = None
    """Decode downscaled so the long side is at most this (None: source size); outputs stay in source pixels."""
    square_pixels: bool = True
    """Decode anamorphic video (a sample aspect ratio other than 1: DVD, HDV, some broadcast) with square pixels,
    shrinking the stretched side, so the filters and models see shapes as a player shows them (a circle round, not
    squeezed by a quarter); crop boxes and regions stay in stored pixels, as ``ffmpeg -vf crop`` takes them.
    False: the stored pixels."""
    tone_map: bool = True
    """HDR video (``probe.video.hdr``: a PQ or HLG transfer) is tone-mapped to SDR BT.709 after decoding, before any
    filter or model sees it (``pipeline.video.tonemap``): its pixels as coded are flat and grey, and its exposure,
    sharpness and model inputs meant something else than for SDR video. False: the pixels as coded."""
    deinterlace: bool = True
    """Interlaced video (``probe.video.interlaced``: broadcast and camcorder 576i, 480i, 1080i) is made progressive
    as it is decoded, before any filter or model sees it (``pipeline.video.deinterlace``): its frames as stored show
    combing wherever anything moves (on a moving test clip the sharpness filter's Laplacian variance read 2.4 times
    the progressive source's). False: the frames as stored."""
    decode_timeout_s: float = 120.0
    """Per-item, per-backend limit on reading the file's frame index and decoding; past it the item fails with
    DecodeTimeout and its decode stops at the next frame (PyAV) or slice of 32 frames (decord, torchcodec) instead
    of running on for nobody. A decode stuck inside one native call cannot be stopped: it keeps its own thread
    (not one that later decodes wait for) and shows as ``decodes_past_deadline`` in the metrics."""
    random_access_containers: tuple[str, ...] = ("mp4", "mov", "matroska", "webm", "flv")
    """Containers (FFmpeg demuxer names, as ``probe.container`` lists them) in which the random-access backends
    (decord, torchcodec) return the frame asked for. In others they were measured to return other frames without an
    error (MPEG-PS and MPEG-TS, AVI with B-frames), so those files are decoded by PyAV from the start, in order."""
    random_access_codecs: tuple[str, ...] = ("h264", "hevc", "av1", "vp9", "vp8", "mpeg2video", "mjpeg", "prores",
                                             "dnxhd")
    """Codecs (``probe.video.codec``) measured frame-exact through decord and torchcodec in the containers above;
    any other (MPEG-4 part 2 with B-frames: decord misplaces frames) is decoded by PyAV in order."""


@dataclass(frozen=True)
class FilterSpec:
    """One configured filter instance; ``params`` are validated by the filter's own params dataclass."""

    name: str
    """Instance name: the output column."""
    type: str
    """Registry key of the filter class."""
    enabled: bool = True
    """Switch the filter on or off."""
    params: dict = field(default_factory=dict)
    """Filter-specific settings."""


@dataclass(frozen=True)
class JobConfig:
    """The whole job."""

    input: InputConfig = field(default_factory=InputConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    model_pool: ModelPoolConfig = field(default_factory=ModelPoolConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    video: VideoConfig = field(default_factory=VideoConfig)
    filters: tuple[FilterSpec, ...] = ()
    """Filters in the order they run; YAML gives them as a mapping ``name: {type:, enabled:, ...params}``."""

    @property
    def enabled_filters(self) -> tuple[FilterSpec, ...]:
        return tuple(f for f in self.filters if f.enabled)


# ---- loading ---------------------------------------------------------------------------------------

_MISSING = object()


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it in canonical form."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: null is not allowed")
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}")
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, where)
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type, data: dict, where: str = "config") -> Any:
    """Build the frozen dataclass ``cls`` from ``data``, rejecting unknown keys and wrong types.

    Args:
        cls: a dataclass type whose fields are annotated with supported types.
        data: the mapping read from YAML.
        where: dotted path used in error messages.

    Returns:
        An instance of ``cls``.

    Raises:
        ConfigError: on an unknown key, a wrong type or a value outside a ``Literal``.
    """
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; valid keys are {names}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], f"{where}.{name}" if where != "config" else name)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def _filters_from_mapping(raw: Any) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, dict):
        raise ConfigError("filters: expected a mapping of filter name to its settings")
    out = []
    for name, body in raw.items():
        body = {} if body is None else body
        if not isinstance(body, dict):
            raise ConfigError(f"filters.{name}: expected a mapping, got {body!r}")
        body = dict(body)
        spec = {"name": str(name), "type": body.pop("type", str(name)), "enabled": body.pop("enabled", True)}
        spec["params"] = body
        out.append(spec)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into its key path and a YAML-parsed value.

    Args:
        text: one command-line override.

    Returns:
        The key path and the value (``null``, numbers, booleans and lists parse as YAML).
    """
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value")
    key, value = text.split("=", 1)
    path = [p for p in key.strip().split(".")]
    if not all(path):
        raise ConfigError(f"override {text!r}: empty key segment")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return path, parsed


def apply_override(raw: dict, path: list[str], value: Any) -> None:
    """Set ``raw[path[0]][path[1]]... = value``, creating mappings as needed (validation comes later)."""
    node = raw
    for part in path[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = {}
            node[part] = nxt
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a section")
        node = nxt
    node[path[-1]] = value


def load_raw(path: str | None) -> dict:
    """Read a YAML config (safe loader) into a plain mapping; ``None`` gives an empty one."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path}: top level must be a mapping")
    return raw


def build_config(raw: dict, overrides: list[str] = ()) -> JobConfig:
    """Apply overrides to a raw mapping and build a validated ``JobConfig``.

    Args:
        raw: the YAML mapping.
        overrides: ``section.key=value`` strings, applied in order.

    Returns:
        The frozen, type-checked config (filter params are checked by ``validate_config``).
    """
    raw = json.loads(json.dumps(raw))  # deep copy; YAML scalars are JSON-compatible here
    for text in overrides:
        path, value = parse_override(text)
        apply_override(raw, path, value)
    raw = dict(raw)
    raw["filters"] = _filters_from_mapping(raw.get("filters"))
    return from_dict(JobConfig, raw)


def load_config(path: str | None, overrides: list[str] = (), work: bool = True) -> JobConfig:
    """Load, override and validate a job config: the single entry used by ``jobs/run.py``.

    Args:
        path: YAML file, or None for the built-in defaults.
        overrides: ``section.key=value`` strings.
        work: also check what the work needs (decoders, filters); see ``validate_config``.

    Returns:
        A validated ``JobConfig``.

    Raises:
        ConfigError: with one clear message, before any work.
    """
    cfg = build_config(load_raw(path), overrides)
    validate_config(cfg, work)
    return cfg


def validate_config(cfg: JobConfig, work: bool = True) -> None:
    """Check values and cross-field rules that types alone cannot express.

    ``work=False`` leaves out the decoder and filter checks, which import torch and the filters' modules (2 s, and
    as long again to unload): the commands that only read or rewrite the output (``jobs/status.py``,
    ``jobs/compact.py``) start in a fraction of a second, and report on an output whose job's filters changed since.
    """
    if bool(cfg.input.manifest) == bool(cfg.input.listing_glob):
        raise ConfigError("input: set exactly one of input.manifest and input.listing_glob")
    if not cfg.output.dir:
        raise ConfigError("output.dir is required")
    positive = {
        "runtime.producers": cfg.runtime.producers,
        "runtime.consumers": cfg.runtime.consumers,
        "runtime.queue_depth": cfg.runtime.queue_depth,
        "runtime.unit_size": cfg.runtime.unit_size,
        "runtime.empty_cache_every": cfg.runtime.empty_cache_every,
        "model_pool.instances": cfg.model_pool.instances,
        "output.rows_per_file": cfg.output.rows_per_file,
        "storage.cache_max_bytes": cfg.storage.cache_max_bytes,
    }
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if cfg.storage.retries < 0:
        raise ConfigError("storage.retries must be >= 0")
    for key in ("commit_timeout_s", "finish_timeout_s"):
        limit = getattr(cfg.output, key)
        if limit is not None and limit <= 0:
            raise ConfigError(f"output.{key}={limit:g} must be above 0 (None: no limit)")
    if cfg.storage.hung_tier_skip_s <= 0:
        raise ConfigError(f"storage.hung_tier_skip_s={cfg.storage.hung_tier_skip_s:g} must be above 0")
    if cfg.storage.fetch_min_bytes_per_s < 0:
        raise ConfigError(f"storage.fetch_min_bytes_per_s={cfg.storage.fetch_min_bytes_per_s:g} must be 0 or more")
    silence = cfg.storage.fetch_silence_s
    if silence is not None and not 0 < silence < cfg.runtime.stall_timeout_s:
        raise ConfigError(f"storage.fetch_silence_s={silence:g} must be above 0 and below runtime.stall_timeout_s="
                          f"{cfg.runtime.stall_timeout_s:g} (else a hung fetch stalls the rank first)")
    item_limit = cfg.runtime.item_timeout_s
    if item_limit is not None and not 0 < item_limit < cfg.runtime.stall_timeout_s:
        raise ConfigError(f"runtime.item_timeout_s={item_limit} must be above 0 and below runtime.stall_timeout_s="
                          f"{cfg.runtime.stall_timeout_s} (else a hanging item stalls the rank first)")
    if not cfg.runtime.item_timeout_per_hour_s >= 0:
        raise ConfigError(f"runtime.item_timeout_per_hour_s={cfg.runtime.item_timeout_per_hour_s:g} must be 0 or more")
    if cfg.resume.max_item_crashes is not None and cfg.resume.max_item_crashes < 1:
        raise ConfigError(f"resume.max_item_crashes={cfg.resume.max_item_crashes} must be 1 or more (null turns the "
                          "crash ledger off)")
    if cfg.output.compact_mb is not None and not cfg.output.compact_mb > 0:
        raise ConfigError(f"output.compact_mb={cfg.output.compact_mb} must be above 0 (null: no compaction)")
    for i, tier in enumerate(cfg.storage.tiers):
        if not tier.name or not tier.root:
            raise ConfigError(f"storage.tiers[{i}]: name and root are required")
    if work:
        _validate_work(cfg)


def _validate_work(cfg: JobConfig) -> None:
    """The decoders and the filters: their names, and each filter's params and cross-field rules."""
    from pipeline.video.decoders import BACKENDS

    unknown = [b for b in cfg.video.backends if b not in BACKENDS]
    if unknown or not cfg.video.backends:
        raise ConfigError(f"video.backends: unknown {unknown}; choose from {sorted(BACKENDS)}")
    if cfg.video.reduced_pass_bytes is not None and cfg.video.reduced_pass_bytes < 1:
        raise ConfigError(f"video.reduced_pass_bytes={cfg.video.reduced_pass_bytes} must be 1 or more (null: one "
                          "pass always)")
    if cfg.video.decode_device == "cuda" and not {"torchcodec", "pyav"} & set(cfg.video.backends):
        raise ConfigError("video.decode_device: cuda decodes with NVDEC through torchcodec or PyAV, neither of which "
                          f"is in video.backends {list(cfg.video.backends)}")
    names = [f.name for f in cfg.filters]
    if len(set(names)) != len(names):
        raise ConfigError(f"filters: duplicate filter names {names}")
    if not cfg.enabled_filters:
        raise ConfigError("filters: no filter is enabled")
    from pipeline.filters import validate_filter_specs  # registry import is deferred: filters import config

    validate_filter_specs(cfg.filters)


def to_dict(cfg: Any) -> Any:
    """The resolved config as plain JSON-able data (filters back in their mapping form)."""
    if isinstance(cfg, JobConfig):
        out = {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name != "filters"}
        out["filters"] = {
            s.name: {"type": s.type, "enabled": s.enabled, **s.params} for s in cfg.filters
        }
        return out
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple):
        return [to_dict(v) for v in cfg]
    return cfg


PICTURE_KEYS = ("decode_max_side", "square_pixels", "tone_map", "deinterlace")
"""The ``video`` settings that change the pictures every video filter and model sees (their size, shape, tone and
fields), so every video result: part of the job's identity. The others (backends, caps, timeouts, decode device)
change how an item is decoded or whether it fails, not what its row says."""


def job_identity(cfg: JobConfig) -> dict:
    """The parts of a config that must match for a rerun to resume the same job: the input, the enabled filters
    with their parameters, and the ``video`` settings that change the pictures (``PICTURE_KEYS``); never a
    credential (``identity_clean``)."""
    d = to_dict(cfg)
    inp = dict(d["input"])
    inp.pop("limit", None)
    inp.pop("portable_types", None)  # the committed parts' schema guards it (resume.writer_schema)
    return identity_clean({"input": inp, "filters": {k: v for k, v in d["filters"].items() if v.get("enabled", True)},
                           "video": {k: d["video"][k] for k in PICTURE_KEYS}})


def identity_clean(obj: Any) -> Any:
    """A job identity (or a part of one) without credentials: every ``storage_options`` dropped (how the bytes are
    reached, with keys and secrets, is no part of the job: the models' digests are), and the credentials of URLs
    (a signed URL's signature and token, ``errors.redact_urls``) replaced by ``***``, so that a URL signed anew for
    a rerun names the same job. The identity is written to ``_config.json`` and compared between ranks, whose
    message names each value."""
    if isinstance(obj, dict):
        return {k: identity_clean(v) for k, v in obj.items() if k != "storage_options"}
    if isinstance(obj, list):
        return [identity_clean(v) for v in obj]
    return redact_urls(obj) if isinstance(obj, str) else obj


def job_arguments(description: str | None, log_level: str = "INFO") -> argparse.ArgumentParser:
    """The command line the job and its tools share: ``--config``, ``section.key=value`` overrides (the same for a
    tool as for the job whose output it reads) and ``--log-level``; each tool adds its own options.

    Args:
        description: the tool's help text (its module docstring).
        log_level: the default of ``--log-level``.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the job's YAML config (default: built-in defaults)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, as given to the job")
    parser.add_argument("--log-level", default=log_level)
    return parser
