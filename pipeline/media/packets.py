"""Containers and their packets through PyAV, whatever a file's metadata holds and whatever streams it adds as it
goes."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def open_container(path: str, **options):
    """``av.open(path)`` for reading, with metadata that is not UTF-8 passed over: PyAV refuses to open such a file
    (``UnicodeDecodeError``), which the ffmpeg CLI decodes whole. Old tools write tags in Latin-1 or a Windows code
    page (an AVI's INFO, an ASF's, ID3v1), and a damaged header reads as such: before, every decode but the probe's
    failed on them (found by fuzzing damaged files).

    Args:
        path: a local media file.
        options: more arguments of ``av.open`` (``hwaccel``).
    """
    import av

    return av.open(path, metadata_errors="ignore", **options)


def demux(container, *streams):
    """``container.demux(*streams)``, ending cleanly in a file that adds a stream after its header.

    FLV, MPEG-TS and MPEG-PS let a stream begin with its first packet, and a damaged FLV tag or TS packet reads as
    one. PyAV 18 passes over such a stream's packets, but at the end it flushes every stream FFmpeg then knows,
    the new one too, which its list of streams lacks: ``IndexError`` after every packet and the flush packet of
    every stream it listed were yielded (its read loop checks the index; only the flush does not). Nothing is lost
    by ending there; the decoders asked for their last frames already.

    Args:
        container: an open ``av`` input container.
        streams: the streams to read (none: all).

    Yields:
        Its packets, as ``container.demux`` does.
    """
    try:
        yield from container.demux(*streams)
    except IndexError:
        log.debug("%s added a stream after its header; its packets were passed over", container.name)
