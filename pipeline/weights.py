"""Which weights a job's models are: a content digest per model, part of the job's identity, so that weights replaced
at the same URL between two runs of one output are found before a row is written, not mixed in silently."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Any

import fsspec

from pipeline.errors import ConfigError
from pipeline.model_pool import is_local, list_source, lists_versions, localize_model, one_file

log = logging.getLogger(__name__)

_BLOCK = 8 << 20


@dataclass(frozen=True)
class ModelSource:
    """A model a filter loads: a file or directory at any fsspec URL (or local path).

    ``derived`` names files of a directory that are made from the model's weights and not read by this filter's
    backend (a classifier's ``model.onnx`` when it runs in torch): exporting one must not read as new weights.
    """

    uri: str
    storage_options: dict = field(default_factory=dict)
    derived: tuple[str, ...] = ()


def fingerprint(source: ModelSource, known: dict | None = None, copy_to: str | None = None) -> dict[str, Any]:
    """The weights at ``source`` now: ``{"uri", "files": [[relative path, bytes, version]], "derived", "sha256"}``.

    The digest of a single file is its ``sha256sum``; of a directory, the SHA-256 of its files' ``path<TAB>sha256``
    lines in path order. The files are read whole, once: where ``known`` (this model's fingerprint from the last
    run) lists the same files at the same sizes and versions (an ETag, a modification time), its digest is kept
    and nothing is read (a source that lists no version for a file is read at every start).

    Args:
        copy_to: the node's model cache: a remote model is copied there (``localize_model``, the copy this node's
            ranks then load) and hashed from the copy, so that it is downloaded once, not twice.

    Raises:
        ConfigError: the model does not exist.
    """
    fs, path, files = _listing(source)
    # a source that can change unseen under the same listing is read at every start (localize_model copies it anew
    # each time too)
    if (lists_versions(files) and known and known.get("uri") == source.uri and known.get("files") == files
            and known.get("sha256")):
        return known
    if copy_to and not is_local(source.uri):
        fs, path = fsspec.filesystem("file"), localize_model(source.uri, copy_to, 0, lambda: None,
                                                             source.storage_options)
    digest = _digest(fs, path, files)
    log.info("model %s: sha256 %s (%d file(s), %d bytes read)", source.uri, digest, len(files),
             sum(size or 0 for _, size, _ in files))
    return {"uri": source.uri, "files": files, "derived": list(source.derived), "sha256": digest}


def shown(identity: str | None) -> str:
    """A model's identity as messages show it: a digest cut to its first 12 hex digits, a packaged version whole."""
    if identity is None:
        return "none"
    return identity[:19] + "..." if identity.startswith("sha256:") else identity


def _listing(source: ModelSource) -> tuple[fsspec.AbstractFileSystem, str, list[list]]:
    """The model's filesystem, path and ``[relative path, bytes, version]`` of each of its files but the derived.

    Raises:
        ConfigError: the model does not exist.
    """
    fs, path, files = list_source(source.uri, source.storage_options)
    return fs, path, [[rel, size, version] for rel, size, version in files if rel not in source.derived]


def listed_anew(source: ModelSource, known: dict[str, Any]) -> str | None:
    """Whether the source of a recorded model now lists other files, sizes or versions than ``known`` (a listing;
    nothing is read): what the next run's start reads and hashes again. None where it lists the same."""
    try:
        _, _, files = _listing(source)
    except ConfigError:
        return "missing"
    except Exception as e:  # noqa: BLE001 - a status report: said, not raised
        return f"cannot be listed ({type(e).__name__}: {e})"
    if source.uri != known.get("uri") or files != known.get("files"):
        return "another size or version than recorded"
    return None


def check_copy(local: str, recorded: list[dict[str, Any]], host: str) -> None:
    """Check that the weights this rank loads from ``local`` are those rank 0 recorded for the run.

    A local path is read where it is, on every node: one whose image or init container put other weights there
    would mix its rows in under rank 0's digest; a remote model replaced between rank 0's digest and this node's
    copy, likewise. The files of each fingerprint of ``recorded`` (one per filter setting naming this model: two
    filters may read different files of one directory) are read, from the page cache where the model was just
    copied; one that matches is enough.

    Raises:
        ConfigError: none matches (both digests and the host named).
    """
    fs = fsspec.filesystem("file")
    digests = [_digest(fs, local, fp["files"]) for fp in recorded]
    if not any(d == fp["sha256"] for d, fp in zip(digests, recorded)):
        raise ConfigError(f"the weights at {recorded[0]['uri']} on {host} (sha256:{digests[0][:12]}...) are not those "
                          f"rank 0 recorded for this run (sha256:{recorded[0]['sha256'][:12]}...): a node with other "
                          "weights at that path, or weights replaced as the run started; give every node the same "
                          "weights")


def _digest(fs: fsspec.AbstractFileSystem, path: str, files: list) -> str:
    """A file's SHA-256, or a directory's: that of its ``files``' ``path<TAB>sha256`` lines, in their order."""
    if one_file(files):
        return _file_sha256(fs, path)
    lines = "".join(f"{rel}\t{_file_sha256(fs, path.rstrip('/') + '/' + rel)}\n" for rel, _, _ in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _file_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb", block_size=_BLOCK) as f:
        while block := f.read(_BLOCK):
            h.update(block)
    return h.hexdigest()


def weigh_models(sources: dict[str, ModelSource | str], known: dict[str, dict],
                 copy_to: str | None = None) -> tuple[dict[str, str], dict]:
    """Every model of the job: its identity (``sha256:<digest>``, or a packaged model's version as given) and the
    fingerprints to record for the next run's ``known``.

    Args:
        sources: per model (``<filter>.<setting>``), where its weights are, or the version that names them.
        known: the fingerprints the last run recorded (empty on the first run).
        copy_to: the node's model cache (``fingerprint``).

    Raises:
        ConfigError: a model does not exist, or cannot be read (the error says which and why): on rank 0 before
            any work, a ``MediasieveError`` that the other ranks raise too rather than wait for.
    """
    identity: dict[str, str] = {}
    record: dict[str, dict] = {}
    for key, source in sorted(sources.items()):
        if isinstance(source, str):
            identity[key] = source
            continue
        try:
            fp = fingerprint(source, known.get(key), copy_to)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - denied, cut short, unreachable: a model this job cannot load
            raise ConfigError(f"model {source.uri} ({key}) could not be read to record its weights "
                              f"({type(e).__name__}: {e})") from e
        identity[key] = f"sha256:{fp['sha256']}"
        record[key] = fp
    return identity, record
