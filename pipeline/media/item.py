"""One fetched item as the filters see it: its local file and what has been decoded from it so far."""

from __future__ import annotations

import threading

from pipeline.media.probe import MediaInfo, probe_media


class MediaItem:
    """A fetched item, decoded lazily and once: every filter that asks for the same data gets the same object.

    Args:
        item_id: the manifest id.
        local_path: the file in the node cache (or in place on a local tier).
        size_bytes: file size.
    """

    def __init__(self, item_id: str, local_path: str, size_bytes: int):
        self.item_id = item_id
        self.local_path = local_path
        self.size_bytes = size_bytes
        self._lock = threading.Lock()
        self._info: MediaInfo | None = None
        self.decode_backend: str | None = None
        self.frames_decoded: int | None = None

    @property
    def info(self) -> MediaInfo:
        """Container and stream metadata (probed once)."""
        with self._lock:
            if self._info is None:
                self._info = probe_media(self.local_path)
                self.decode_backend = self.decode_backend or "pyav"
            return self._info
