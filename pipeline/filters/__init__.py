"""The filter registry: adding a filter is one new module and one line in ``FILTERS``."""

from __future__ import annotations

from pipeline.config import FilterSpec, from_dict
from pipeline.errors import ConfigError
from pipeline.filters.base import Filter, FilterContext, SetupContext
from pipeline.filters.clip_classifier import ClipClassifierFilter
from pipeline.filters.probe import ProbeFilter
from pipeline.filters.signal import (
    BlackBorderFilter,
    ExposureFilter,
    SceneCutFilter,
    SharpnessFilter,
    StaticFilter,
)
from pipeline.filters.speech_cuts import SpeechCutsFilter
from pipeline.filters.synthetic import CpuBurnFilter, CrashOnceFilter, NoopFilter
from pipeline.filters.yolo_regions import YoloRegionsFilter

FILTERS: dict[str, type[Filter]] = {
    "probe": ProbeFilter,
    "black_borders": BlackBorderFilter,
    "static": StaticFilter,
    "exposure": ExposureFilter,
    "sharpness": SharpnessFilter,
    "scene_cuts": SceneCutFilter,
    "speech_cuts": SpeechCutsFilter,
    "yolo_regions": YoloRegionsFilter,
    "clip_classifier": ClipClassifierFilter,
    "noop": NoopFilter,
    "cpu_burn": CpuBurnFilter,
    "crash_once": CrashOnceFilter,
}

__all__ = ["FILTERS", "Filter", "FilterContext", "SetupContext", "batch_stats", "build_filters", "frame_requests_of",
           "validate_filter_specs"]


def _params(spec: FilterSpec):
    cls = FILTERS.get(spec.type)
    if cls is None:
        raise ConfigError(f"filters.{spec.name}: unknown filter type {spec.type!r}; known: {sorted(FILTERS)}")
    return cls, from_dict(cls.params_type, spec.params, f"filters.{spec.name}")


def validate_filter_specs(specs: tuple[FilterSpec, ...]) -> None:
    """Check every filter's type and params (ConfigError before any work)."""
    for spec in specs:
        cls, params = _params(spec)
        cls(spec.name, params)  # cross-field checks in the constructor; it loads nothing


def build_filters(specs: tuple[FilterSpec, ...]) -> list[Filter]:
    """Instantiate the enabled filters in config order."""
    out = []
    for spec in specs:
        if spec.enabled:
            cls, params = _params(spec)
            out.append(cls(spec.name, params))
    return out


def frame_requests_of(filters: list[Filter]) -> list:
    """The union of the filters' frame requests, in order, each once: what an item decodes for all of them."""
    return list(dict.fromkeys(r for f in filters for r in f.frame_requests()))


def batch_stats(filters: list[Filter]) -> dict[str, dict[str, int]]:
    """Per model batcher: the configured batch size, the limit in force (lower after running out of memory), the
    out-of-memory splits and the rows that did not fit alone; for the metrics log and the Prometheus endpoint."""
    return {name: {"max_batch": b.max_batch, "batch_limit": b.batch_limit, "oom_splits": b.oom_splits,
                   "oom_rows_failed": b.oom_rows_failed}
            for f in filters for name, b in f.batchers().items()}
