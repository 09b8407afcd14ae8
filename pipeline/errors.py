"""Typed errors of the job and which of them are worth retrying.

Item failures become rows whose ``error_type`` is the class name of one of these errors; system failures
(``ConfigError``, ``StallError``, ``OutputLockedError``) stop the job loudly.
"""

from __future__ import annotations

import re
from collections.abc import Iterator


class MediasieveError(Exception):
    """Base of every error this project raises on purpose."""


# ---- system failures: the job stops -------------------------------------------------------------
class ConfigError(MediasieveError):
    """The config or the command line is wrong; raised before any work starts."""


class ManifestError(MediasieveError):
    """The input manifest cannot be read or is inconsistent (missing columns, duplicate ids)."""


class OutputLockedError(MediasieveError):
    """Another live run holds the output directory."""


class StallError(MediasieveError):
    """No progress for longer than the configured stall timeout: a worker is dead or hung."""


class GpuFailure(MediasieveError):
    """CUDA failed in this process and strict GPU mode forbids falling back to CPU."""


class CacheFullError(MediasieveError):
    """The node-local cache's disk is full even after evicting every entry not in use: every item this rank fetched
    would fail, so the rank stops instead of turning the rest of its share of the manifest into failure rows."""


class StorageHungError(MediasieveError):
    """Fetch after fetch went silent (``storage.fetch_silence_s``) with none served in between: the storage (a
    hung mount, an endpoint that accepts and never answers) is down for this node, and every item left in the
    rank's share would get a ``FetchTimeout`` row, so the rank stops instead."""


class OutputHungError(MediasieveError):
    """A write to the output directory (a part's commit, the lease, the summary) did not finish within
    ``output.commit_timeout_s``: the output storage is hung, so the rank stops rather than hang with it."""


class DependencyError(MediasieveError):
    """An optional package needed by the configured filters is not installed."""


# ---- item failures: the item gets a failure row and the job goes on ------------------------------
class ItemError(MediasieveError):
    """An error that fails one item; its class name is written to the row's ``error_type``."""


class BadInputError(ItemError):
    """The manifest row itself is unusable (empty path, path escaping its storage root)."""


class FetchError(ItemError):
    """The media could not be fetched through any storage tier."""


class NotFoundError(FetchError):
    """No tier has the object."""


class AccessDeniedError(FetchError):
    """A tier refused access to the object."""


class TransientFetchError(FetchError):
    """A timeout, 5xx or throttling answer that survived every retry."""


class FetchTimeout(TransientFetchError):
    """The fetch went silent for ``storage.fetch_silence_s`` (no byte, no new attempt), or got less than
    ``storage.fetch_min_bytes_per_s`` on average over that time: it was abandoned on its
    thread (Python cannot kill it) so that the rank goes on; a rerun tries the item again."""


class DecodeError(ItemError):
    """The media is corrupt, truncated, empty or of an unsupported format."""


class DecodeTimeout(DecodeError):
    """Decoding took longer than the per-item limit."""


class ModelTimeout(ItemError):
    """No model instance became free within the acquire timeout."""


class ItemTimeout(ItemError):
    """The item's filters ran past ``runtime.item_timeout_s``; its worker thread was abandoned and replaced."""


class CrashError(ItemError):
    """The item kills the process that works on it (a native crash or the OOM killer): seen in a rehearsal child,
    or in ``resume.max_item_crashes`` deaths of the job's own processes (``pipeline.crashes``)."""


class OutOfMemory(ItemError):
    """The item's work did not fit in the device's (or the host's) free memory, even alone in its model batch
    (``pipeline.batching``): other models or tenants held the memory, or the item itself is too large."""


class FilterError(ItemError):
    """A filter raised an unexpected exception on this item."""


class ShutdownError(ItemError):
    """The item was abandoned because the rank is shutting down (never written as a success)."""


# Error type -> whether a retry (in this run's fetch loop, or on a rerun) may succeed.
RETRYABLE: dict[type[BaseException], bool] = {
    TransientFetchError: True,
    ModelTimeout: True,
    ShutdownError: True,
    NotFoundError: False,
    AccessDeniedError: False,
    BadInputError: False,
    DecodeError: False,
    DecodeTimeout: False,
    ItemTimeout: True,
    CrashError: False,
    OutOfMemory: True,
    FilterError: False,
}


def is_retryable(error: BaseException) -> bool:
    """Return whether ``error`` is transient, looking up the most specific class in ``RETRYABLE``.

    Args:
        error: the exception raised for an item.

    Returns:
        True when retrying the same operation may succeed.
    """
    for cls in type(error).__mro__:
        if cls in RETRYABLE:
            return RETRYABLE[cls]
    return False


def error_chain(error: BaseException | None, limit: int = 8) -> Iterator[BaseException]:
    """``error`` and the errors it was raised from or during (``__cause__``, else ``__context__``), at most
    ``limit`` of them: what a check of "was this, deep down, a full disk / an out-of-memory" walks."""
    for _ in range(limit):
        if error is None:
            return
        yield error
        error = error.__cause__ or error.__context__


SECRET_WORDS = ("secret", "password", "passwd", "token", "key_id", "access_key", "credential", "signature")
SECRET_NAMES = {"key", "account_key", "sas_key", "private_key", "api_key", "apikey", "auth", "sig"}
"""Names of settings and URL query parameters whose values are credentials: s3fs, adlfs and gcsfs options; a
presigned S3 URL's ``X-Amz-Signature``, ``X-Amz-Credential`` and ``X-Amz-Security-Token`` (an STS session's own
secret), GCS's ``X-Goog-Signature``, an Azure SAS's ``sig``, a CDN's ``token``."""


def is_secret_name(name: str) -> bool:
    """Whether a setting or a query parameter called ``name`` holds a credential."""
    n = name.lower()
    return n in SECRET_NAMES or any(w in n for w in SECRET_WORDS)


_QUERY_VALUE = re.compile(r"([?&;])([^=&;\s'\"#?]+)=([^&;\s'\"#]*)")
_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s:@'\"]+):([^/\s@'\"]+)@")


def redact_urls(text: str) -> str:
    """``text`` with the credentials of the URLs in it replaced by ``***``: the values of query parameters that name
    one (a signed URL's signature and session token: they grant access until they expire) and a password in
    ``scheme://user:password@host``. Error messages quote the URL they failed on; a row's ``error_message``,
    ``failures.jsonl`` and the log are read by more people than the manifest is."""
    if "=" in text:
        text = _QUERY_VALUE.sub(lambda m: f"{m[1]}{m[2]}=***" if is_secret_name(m[2]) and m[3] else m[0], text)
    return _USERINFO.sub(r"\1:***@", text) if "@" in text else text
