"""The filter contract: declare needs and output type, implement one method from media to a typed result."""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import pyarrow as pa

from pipeline.batching import first_line, is_out_of_memory, release_memory
from pipeline.errors import ConfigError, FilterError, MediasieveError, OutOfMemory
from pipeline.media.item import MediaItem

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NoParams:
    """A filter without settings."""


@dataclass
class FilterContext:
    """What a filter may use besides the media: the rank's device and model pool."""

    device: str
    pool: Any  # pipeline.model_pool.ModelPool; typed loosely to keep filters free of runtime imports
    rank: int = 0


@dataclass
class SetupContext:
    """What a filter may use once per process to get ready: the device, the model pool, and ``localize`` (a model
    URI -> a node-local path, downloaded once per node)."""

    device: str
    pool: Any
    localize: Any  # Callable[[str, dict], str]
    strict_gpu: bool = False
    cache_dir: str | None = None
    """Node-local directory for derived artefacts (TensorRT engines): ``<storage.cache_dir>``."""

    def engine_cache(self) -> str | None:
        """Node-local TensorRT engine cache of this rank's device (``<cache_dir>/trt-engines/cuda0``): one writer
        per directory, since the ranks of a node start at once, and kept across runs and restarts."""
        if not self.cache_dir:
            return None
        return os.path.join(self.cache_dir, "trt-engines", self.device.replace(":", ""))

    def scratch_dir(self) -> str:
        """Where a filter writes work files, named ``*.part``: the node cache's scratch, where a killed process's
        leftovers are swept (the system temporary directory without a cache directory)."""
        if not self.cache_dir:
            import tempfile

            return tempfile.gettempdir()
        from pipeline.storage import SCRATCH_DIR

        return os.path.join(self.cache_dir, SCRATCH_DIR)


@contextlib.contextmanager
def loading_model(filter_name: str, uri: str) -> Iterator[None]:
    """Around building a filter's model from its files and warming it up: an error of the files (empty, cut short,
    corrupt, a model of another kind or shape, a sidecar that is not JSON) becomes one ``ConfigError`` naming the
    filter and the model, before any work, as a bad config does; running out of memory and a GPU's failure pass as
    they are (the node's, not the file's)."""
    try:
        yield
    except MediasieveError:
        raise
    except Exception as e:  # noqa: BLE001 - ultralytics, torch, onnx and ORT each raise their own
        from models.circuit_breaker import is_cuda_failure

        if is_out_of_memory(e) or is_cuda_failure(e):
            raise
        raise ConfigError(f"filters.{filter_name}: {uri} does not load as this filter's model "
                          f"({first_line(e).rstrip(': ')}): empty, cut short, corrupt, or a model of another kind; "
                          "no item was started") from e


RUNTIME = pa.struct([("backend", pa.string()), ("execution_provider", pa.string()), ("io_binding", pa.bool_()),
                     ("fallback_reason", pa.string())])
"""Where a model-backed filter ran, in its row (and, aggregated, in the run summary)."""


class Filter:
    """Base of every filter.

    Subclasses set ``params_type`` (a frozen dataclass validated from the config), ``output_type`` (a pyarrow
    struct) and implement ``apply``. The base times the call and turns unexpected exceptions into
    ``FilterError`` so that an item fails with a typed error and the job goes on.
    """

    params_type: ClassVar[type] = NoParams
    output_type: ClassVar[pa.DataType] = pa.struct([])
    weight_free: ClassVar[bool] = False
    """No model: ``rehearse`` runs the whole filter."""

    def __init__(self, name: str, params: Any):
        self.name = name
        self.params = params
        self.runtime: dict[str, Any] | None = None
        """Where the filter's model runs (backend, execution_provider, io_binding, fallback_reason), set in setup."""

    def runtime_now(self) -> dict[str, Any] | None:
        """``runtime`` as it stands now (a circuit breaker may have moved the model since setup)."""
        return self.runtime

    def runtimes(self) -> dict[str, dict[str, Any]]:
        """Every model of the filter and where it runs now, for the run summary (``name`` or ``name/model``)."""
        now = self.runtime_now()
        return {self.name: now} if now is not None else {}

    def batchers(self) -> dict[str, Any]:
        """The filter's ``DynamicBatcher`` per model (``name`` or ``name/model``), for the metrics: a batch limit
        below ``max_batch`` says the model ran out of memory at the configured batch size."""
        return {}

    def model_sources(self) -> dict[str, Any]:
        """Each model the filter loads, by the setting that names it (``model_uri``): a
        ``pipeline.weights.ModelSource``, or a string naming weights that a package ships (``silero-vad==6.2.1``).
        Their digests are part of the job's identity (none by default)."""
        return {}

    def setup(self, ctx: SetupContext) -> None:
        """Load models into ``ctx.pool`` (once per process, before any item); nothing by default."""

    def frame_requests(self) -> list:
        """Frames this filter needs (``pipeline.video.sampling`` requests); the item decodes their union once."""
        return []

    def arrow_type(self) -> pa.DataType:
        """The output column's type (override when it depends on params)."""
        return self.output_type

    def apply(self, media: MediaItem, ctx: FilterContext) -> dict:
        """Compute this filter's result for one item.

        Args:
            media: the fetched item with lazily decoded data.
            ctx: device and model pool.

        Returns:
            A mapping matching ``arrow_type()``.
        """
        raise NotImplementedError

    def rehearse(self, media: MediaItem, ctx: FilterContext) -> None:
        """The native part of this filter's work, for an item that was in flight when a process died: run in a
        bare child process (no setup, no models, CPU), where a crash costs that child only (``pipeline.crashes``).
        The whole filter where it has no model; nothing by default otherwise."""
        if self.weight_free:
            self.apply(media, ctx)

    def run(self, media: MediaItem, ctx: FilterContext) -> tuple[dict, float]:
        """Apply with timing and error typing; returns the result and its seconds: its own, with its readers'
        seconds in a pass over the clip that another filter read (``MediaItem.claim_seconds``), without the other
        filters' readers' seconds in a pass it read."""
        start = time.perf_counter()
        before = media.streams_read()
        try:
            result = self.apply(media, ctx)
        except MediasieveError:
            raise  # typed: an item failure becomes its row, a system failure stops the rank
        except Exception as e:  # noqa: BLE001 - any bug in a filter fails this item, not the job
            if is_out_of_memory(e):  # not the filter's bug: retryable, and the memory is given back first
                release_memory()
                raise OutOfMemory(f"{self.name}: {first_line(e)}") from e
            where = raised_at(e)
            # a bug: the row says where, the log keeps the whole stack for the report
            log.warning("filter %s raised %s on item %s (a bug in mediasieve or a model; the item fails)",
                        self.name, type(e).__name__, media.item_id, exc_info=True)
            raise FilterError(f"{self.name}: {type(e).__name__}: {e}" + (f" (at {where})" if where else "")) from e
        return result, time.perf_counter() - start + media.claim_seconds(self.frame_requests(), before)


def raised_at(e: BaseException) -> str | None:
    """Where ``e`` was raised, as ``pipeline/audio/cuts.py:123 in cut_points``: the innermost frame of mediasieve's
    own code (a library's frame names where it was called wrongly less often than ours does), else the innermost."""
    frames = traceback.extract_tb(e.__traceback__)
    if not frames:
        return None
    ours = [f for f in frames if f"{os.sep}pipeline{os.sep}" in f.filename or f"{os.sep}models{os.sep}" in f.filename]
    f = (ours or frames)[-1]
    parts = f.filename.split(os.sep)
    short = os.sep.join(parts[-3:] if len(parts) >= 3 and parts[-3] == "pipeline" else parts[-2:])
    return f"{short}:{f.lineno} in {f.name}"


class VideoFilter(Filter):
    """A filter of the decoded video: ``apply_video`` gets the item's frames (decoded once for every filter); an
    item without a video stream gets a null column."""

    def apply(self, media: MediaItem, ctx: FilterContext) -> dict | None:
        video = media.video()
        return None if video is None else self.apply_video(video, media, ctx)

    def rehearse(self, media: MediaItem, ctx: FilterContext) -> None:
        """The decode of every frame the item's filters asked for (and the whole filter where it has no model)."""
        if self.weight_free:
            self.apply(media, ctx)
        else:
            media.video()

    def apply_video(self, video: Any, media: MediaItem, ctx: FilterContext) -> dict:
        """Compute the result from ``video`` (a ``pipeline.video.decoders.DecodedVideo``)."""
        raise NotImplementedError
