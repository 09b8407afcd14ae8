"""The weights a job's models are part of its identity: replaced at the same URL between two runs of one output,
they are found before a row is written, not mixed in silently; the same bytes copied anew are no change."""

import hashlib
import json
import logging
import os
import re
import shutil

import pyarrow.parquet as pq
import pytest

from pipeline.config import build_config, validate_config
from pipeline.distributed import DistContext
from pipeline.errors import ConfigError
from pipeline.runner import run_rank
from pipeline.weights import ModelSource, check_copy, fingerprint, listed_anew, weigh_models
from tests.conftest import base_config, make_corpus, write_manifest
from tests.video.tiny_models import tiny_yolo


def _run(raw):
    cfg = build_config(raw)
    validate_config(cfg)
    return run_rank(cfg, DistContext())


def _sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def _recorded(out) -> dict:
    return json.loads(open(os.path.join(out, "_config.json")).read())


def _parts(out) -> dict[str, int]:
    parts = os.path.join(out, "parts")
    return {p: os.path.getsize(os.path.join(parts, p)) for p in os.listdir(parts)}


@pytest.fixture(scope="module")
def two_yolos(tmp_path_factory):
    d = tmp_path_factory.mktemp("yolos")
    return tiny_yolo(str(d / "a.pt"), seed=0), tiny_yolo(str(d / "b.pt"), seed=1)


def _yolo_job(tmp_path, media_dir, uri, options=None, n=2):
    rows = make_corpus(str(tmp_path / "c"), media_dir, n)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    filters = {"regions": {"type": "yolo_regions", "model_uri": uri, "imgsz": 160, "conf": 0.01, "step": 10,
                           "storage_options": options or {}}}
    return base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                       filters=filters)


def test_weights_replaced_at_the_same_s3_url_stop_the_rerun_before_any_row(tmp_path, media_dir, two_yolos, s3,
                                                                           bucket, caplog):
    a, b = two_yolos
    name, fs = bucket
    url = f"s3://{name}/models/yolo.pt"
    fs.put_file(a, url)
    raw = _yolo_job(tmp_path, media_dir, url, s3.options(), n=3)
    raw["input"]["limit"] = 2
    first = _run(raw).summary
    out = str(tmp_path / "out")
    rec = _recorded(out)
    assert rec["identity"]["models"] == {"regions.model_uri": f"sha256:{_sha256(a)}"}  # sha256sum of the file
    assert rec["models"]["regions.model_uri"]["uri"] == url
    assert rec["model_history"] == [{"from_run": first["run_id"], "models": rec["identity"]["models"]}]
    before = _parts(out)

    from pipeline.status import format_status, job_status

    assert job_status(build_config(raw))["models"]["listed_anew"] == {}
    fs.put_file(b, url)  # new weights, same URL
    raw["input"]["limit"] = None
    said = format_status(job_status(build_config(raw)))  # an operator's look before the rerun: a listing, no read
    assert (f"; regions.model_uri at {url}: another size or version than recorded (the next run reads it again, and "
            "refuses to go on if its digest differs)") in said
    with pytest.raises(ConfigError, match=r"models\.regions\.model_uri differs .*the weights at "
                                          rf"{url} \(sha256:{_sha256(a)[:12]}\.\.\. then, "
                                          rf"sha256:{_sha256(b)[:12]}\.\.\. now\) are not those its rows"):
        _run(raw)
    assert _parts(out) == before  # no row written, none touched
    assert _recorded(out) == rec  # nor the record

    raw["resume"] = {"allow_config_change": True}
    with caplog.at_level(logging.WARNING, logger="pipeline.resume"):
        second = _run(raw).summary
    assert second["this_run"]["items"] == 1  # the third item, with the new weights
    assert "models.regions.model_uri" in caplog.text
    history = _recorded(out)["model_history"]
    assert [h["from_run"] for h in history] == [first["run_id"], second["run_id"]]
    assert history[1]["models"] == {"regions.model_uri": f"sha256:{_sha256(b)}"}
    by_run = {r["video_id"]: r["result_info"]["run_id"] for r in pq.read_table(os.path.join(out, "parts")).to_pylist()}
    assert by_run == {"id-0000": first["run_id"], "id-0001": first["run_id"], "id-0002": second["run_id"]}

    status = job_status(build_config(raw))
    assert status["models"] == {"weights": {"regions.model_uri": f"sha256:{_sha256(b)}"},
                                "since_run": second["run_id"], "uris": {"regions.model_uri": url}, "earlier_sets": 1,
                                "listed_anew": {}}
    assert (f"models   : regions.model_uri sha256:{_sha256(b)[:12]}... ({url}), since run {second['run_id']}; rows "
            "of earlier runs were made with 1 other set(s) of weights") in format_status(status)


def test_the_same_weights_copied_anew_are_no_change_and_unchanged_ones_are_not_read_again(
        tmp_path, media_dir, two_yolos, caplog):
    a, _ = two_yolos
    model = str(tmp_path / "w" / "yolo.pt")
    os.makedirs(os.path.dirname(model))
    shutil.copy(a, model)
    raw = _yolo_job(tmp_path, media_dir, model)

    def hashed() -> int:  # rank 0's digests of the source (each rank's check of what it loads is apart)
        return sum("bytes read" in r.getMessage() for r in caplog.records if r.name == "pipeline.weights")

    with caplog.at_level(logging.INFO, logger="pipeline.weights"):
        _run(raw)
        assert hashed() == 1
        caplog.clear()
        _run(raw)
        assert hashed() == 0  # same size and modification time: the recorded digest stands
        os.remove(model)
        shutil.copy(a, model)  # an init container copying the weights at each start: a new mtime, the same bytes
        os.utime(model, (1, 1))
        _run(raw)
        assert hashed() == 1
    rec = _recorded(str(tmp_path / "out"))
    assert rec["models"]["regions.model_uri"]["files"][0][2] == str(os.stat(model).st_mtime)
    assert len(rec["model_history"]) == 1


def test_a_missing_model_stops_the_job_before_any_work(tmp_path, media_dir, s3, bucket):
    name, _ = bucket
    raw = _yolo_job(tmp_path, media_dir, f"s3://{name}/models/none.pt", s3.options())
    with pytest.raises(ConfigError, match=rf"model file s3://{name}/models/none.pt does not exist"):
        _run(raw)
    assert not os.path.exists(tmp_path / "out" / "parts") or not os.listdir(tmp_path / "out" / "parts")
    assert not os.path.exists(tmp_path / "out" / "_config.json")


def test_a_new_silero_vad_version_is_a_different_job(tmp_path, media_dir):
    rows = make_corpus(str(tmp_path / "c"), media_dir, 1, kinds=("speech.wav",))
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    raw = base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"),
                      filters={"speech_cuts": {}})
    _run(raw)
    path = tmp_path / "out" / "_config.json"
    rec = json.loads(path.read_text())
    import importlib.metadata

    assert rec["identity"]["models"] == {"speech_cuts.vad": f"silero-vad=={importlib.metadata.version('silero-vad')}"}
    rec["identity"]["models"]["speech_cuts.vad"] = "silero-vad==5.1.2"  # rows made by an older package
    path.write_text(json.dumps(rec))
    with pytest.raises(ConfigError, match=r"models\.speech_cuts\.vad differs .*silero-vad==5\.1\.2"):
        _run(raw)


def test_an_output_begun_before_models_were_recorded_resumes_with_a_warning(tmp_path, media_dir, two_yolos,
                                                                             caplog):
    a, _ = two_yolos
    raw = _yolo_job(tmp_path, media_dir, a)
    _run(raw)
    path = tmp_path / "out" / "_config.json"
    rec = json.loads(path.read_text())
    for key in ("models", "model_history"):
        rec.pop(key)
    rec["identity"].pop("models")  # as the last version wrote it
    path.write_text(json.dumps(rec))
    with caplog.at_level(logging.WARNING, logger="pipeline.resume"):
        _run(raw)
    assert "did not record models.regions.model_uri" in caplog.text
    assert len(json.loads(path.read_text())["model_history"]) == 1


def test_a_directory_digest_covers_every_file_but_derived_ones(tmp_path):
    d = tmp_path / "clf"
    (d / "backbone").mkdir(parents=True)
    (d / "backbone" / "model.safetensors").write_bytes(b"w" * 1000)
    (d / "head.json").write_text('{"image_size": 32}')
    torch_side = ModelSource(str(d), {}, ("model.onnx",))
    first = fingerprint(torch_side)
    (d / "model.onnx").write_bytes(b"exported")  # jobs/export_onnx.py writes it next to the weights
    assert fingerprint(torch_side, first) == first
    assert listed_anew(ModelSource(str(d), {}, tuple(first["derived"])), first) is None  # as status sees it
    assert fingerprint(ModelSource(str(d)))["sha256"] != first["sha256"]  # the onnx backend reads it
    # two filters on one directory, one on each backend: each rank's check takes either's files
    check_copy(str(d), [first, fingerprint(ModelSource(str(d)))], "node-1")
    with pytest.raises(ConfigError, match=rf"the weights at {d} on node-1 \(sha256:{first['sha256'][:12]}\.\.\.\) are not "
                                          r"those rank 0 recorded for this run \(sha256:000000000000"):
        check_copy(str(d), [{**first, "sha256": "0" * 64}], "node-1")
    (d / "backbone" / "model.safetensors").write_bytes(b"v" + b"w" * 999)  # the same size, other weights
    assert fingerprint(torch_side, first)["sha256"] != first["sha256"]
    # a recorded digest is kept only for the same files at the same sizes and versions
    assert fingerprint(torch_side, {**first, "sha256": "stale"})["sha256"] != "stale"


def test_weigh_models_names_packaged_weights_by_version_and_files_by_digest(tmp_path):
    f = tmp_path / "w.onnx"
    f.write_bytes(b"abc")
    identity, record = weigh_models({"s.vad": "silero-vad==6.0", "y.model_uri": ModelSource(str(f))}, {})
    assert identity == {"s.vad": "silero-vad==6.0", "y.model_uri": f"sha256:{hashlib.sha256(b'abc').hexdigest()}"}
    assert list(record) == ["y.model_uri"]


def test_the_software_of_each_run_is_recorded_and_a_change_said_or_refused(tmp_path, media_dir, caplog):
    from pipeline.software import software_versions

    rows = make_corpus(str(tmp_path / "c"), media_dir, 2)
    raw = base_config(write_manifest(str(tmp_path / "m.parquet"), rows), str(tmp_path / "c"), str(tmp_path / "out"),
                      str(tmp_path / "cache"))
    first = _run(raw).summary
    assert first["software"] == [{"versions": software_versions(), "ranks": [0]}]
    path = tmp_path / "out" / "_config.json"
    rec = json.loads(path.read_text())
    assert rec["software_history"] == [{"from_run": first["run_id"], "software": [software_versions()]}]
    with caplog.at_level(logging.WARNING):
        assert _run(raw).summary["this_run"]["items"] == 0
    assert len(json.loads(path.read_text())["software_history"]) == 1  # the same software: no new entry
    assert "software differs" not in caplog.text
    rec["software_history"][0]["software"][0]["av"] = "15.0.0"  # the rows so far were made by an older image
    rec["software_history"][0]["software"][0]["libavcodec"] = "58.134.100"
    path.write_text(json.dumps(rec))

    strict = {**raw, "resume": {**raw.get("resume", {}), "on_software_change": "fail"}}
    av = software_versions()["av"]
    with pytest.raises(ConfigError, match=rf"other software than this run's \(av 15\.0\.0 -> {re.escape(av)}; "
                                          rf"libavcodec 58\.134\.100 -> .*the software of run {first['run_id']} on\), "
                                          "and resume.on_software_change is fail"):
        _run(strict)
    assert json.loads(path.read_text()) == rec  # refused before anything was recorded

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        third = _run(raw).summary  # by default an upgrade is no different job: said, recorded, not refused
    assert f"this run's software differs from that of the runs before it (av 15.0.0 -> {av}; libavcodec " \
           f"58.134.100 -> " in caplog.text and f"since run {first['run_id']})" in caplog.text
    assert [h["from_run"] for h in json.loads(path.read_text())["software_history"]] == [first["run_id"],
                                                                                        third["run_id"]]
    from pipeline.status import format_status, job_status

    status = job_status(build_config(raw))
    assert status["software"] == {"since_run": third["run_id"], "earlier_sets": 1}
    assert (f"software : the current set since run {third['run_id']}; rows of earlier runs were made with 1 other "
            "set(s)") in format_status(status)


def test_weights_replaced_as_the_run_starts_stop_it_before_any_row(tmp_path, media_dir, two_yolos, monkeypatch):
    """Between rank 0's digest and a rank's load (seconds on a big job's start), the weights at the path change:
    the rank that would load them stops, rather than write rows under the recorded digest."""
    import pipeline.runner as runner

    a, b = two_yolos
    model = str(tmp_path / "yolo.pt")
    shutil.copy(a, model)
    real = runner.weigh_models

    def then_replaced(*args, **kwargs):
        out = real(*args, **kwargs)
        shutil.copy(b, model)
        return out

    monkeypatch.setattr(runner, "weigh_models", then_replaced)
    with pytest.raises(ConfigError, match=rf"the weights at {model} on \S+ \(sha256:{_sha256(b)[:12]}\.\.\.\) are "
                                          rf"not those rank 0 recorded for this run \(sha256:{_sha256(a)[:12]}"):
        _run(_yolo_job(tmp_path, media_dir, model))
    assert not os.path.exists(tmp_path / "out" / "parts") or not os.listdir(tmp_path / "out" / "parts")
