"""The GPU device kit cuts its stream (ORT and the rest) into parts that fit one transfer each and joins them back byte
for byte."""

import hashlib
import importlib.util
import os

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("device_kit", os.path.join(ROOT, "tests", "gpu", "device_kit.py"))
kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kit)


def test_split_then_join_gives_the_same_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(kit, "PART", 1000)
    stream = tmp_path / "src" / "stream.tar"  # the bench media, decord and onnxruntime-gpu, as prepare packs them
    stream.parent.mkdir()
    data = os.urandom(4500)
    stream.write_bytes(data)
    (tmp_path / ".ort7").mkdir()
    (tmp_path / ".ort7" / "part").write_bytes(b"a part left by an earlier prepare")
    folders = kit.split(str(stream), str(tmp_path))
    assert [os.path.basename(f) for f in folders] == [".ort1", ".ort2", ".ort3", ".ort4", ".ort5"]
    assert all(os.path.getsize(os.path.join(f, "part")) <= 1000 for f in folders)
    os.rename(tmp_path / ".ort5", tmp_path / ".ort10")  # numeric order, not lexical
    os.rename(tmp_path / ".ort4", tmp_path / ".ort5")
    joined = kit.join(str(tmp_path))
    assert joined == os.path.join(str(tmp_path), "build", "stream.tar")
    assert hashlib.sha256(open(joined, "rb").read()).digest() == hashlib.sha256(data).digest()


def test_join_without_parts_says_what_to_carry(tmp_path):
    with pytest.raises(SystemExit, match="carry each of them first"):
        kit.join(str(tmp_path))
