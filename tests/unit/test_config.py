import dataclasses
import json
import os
import subprocess
import sys

import pytest
import yaml

from pipeline.config import build_config, load_config, parse_override, to_dict
from pipeline.errors import ConfigError
from tests.conftest import ROOT


def _write(tmp_path, raw):
    p = tmp_path / "job.yaml"
    p.write_text(yaml.safe_dump(raw))
    return str(p)


def _good(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"video_id": "a", "video_path": "a.mp4"}\n')
    return {"input": {"manifest": str(manifest)}, "output": {"dir": str(tmp_path / "out")}, "filters": {"probe": {}}}


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, _good(tmp_path)), ["runtime.producers=3", "storage.cache_max_bytes=1000",
                                                          "runtime.device=cpu", "filters.probe.enabled=true"])
    assert cfg.runtime.producers == 3
    assert cfg.storage.cache_max_bytes == 1000
    assert cfg.runtime.consumers == 6 and cfg.runtime.queue_depth == 16 and cfg.model_pool.instances == 6
    assert cfg.input.id_column == "video_id" and cfg.input.path_column == "video_path"
    assert [f.name for f in cfg.enabled_filters] == ["probe"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.runtime.producers = 1  # frozen


@pytest.mark.parametrize("override, message", [
    ("runtime.bogus=1", "unknown key"),
    ("bogus.key=1", "unknown key"),
    ("runtime.producers=many", "expected an integer"),
    ("runtime.producers=1.5", "expected an integer"),
    ("runtime.progress=3", "true or false"),
    ("runtime.device=tpu", "not one of"),
    ("runtime.queue_depth=0", ">= 1"),
    ("filters.probe.type=nope", "unknown filter type"),
    ("filters.noop.sleep_s=abc", "expected a number"),
    ("filters.noop.bogus=1", "unknown key"),
    ("filters.probe.enabled=false", "no filter is enabled"),
    ("input.listing_glob=/x/*.mp4", "exactly one"),
    ("storage.fetch_min_bytes_per_s=-1", "fetch_min_bytes_per_s=-1 must be 0 or more"),
    ("resume.retry_failed=maybe", r"resume.retry_failed: 'maybe' fits none of"),
    ("video.reduced_pass_bytes=0", r"video.reduced_pass_bytes=0 must be 1 or more"),
    ("noequals", "section.key=value"),
])
def test_bad_values_are_one_clear_error(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, _good(tmp_path)), [override])


def test_tiers_are_typed(tmp_path):
    raw = _good(tmp_path)
    raw["storage"] = {"tiers": [{"name": "s3", "root": "s3://b/p", "storage_options": {"anon": True}}]}
    cfg = load_config(_write(tmp_path, raw))
    assert cfg.storage.tiers[0].root == "s3://b/p"
    raw["storage"] = {"tiers": [{"name": "s3", "rot": "s3://b/p"}]}
    with pytest.raises(ConfigError, match=r"storage.tiers\[0\]: unknown key"):
        load_config(_write(tmp_path, raw))


def test_override_values_parse_as_yaml():
    assert parse_override("a.b=null") == (["a", "b"], None)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert parse_override("a.b=x=y") == (["a", "b"], "x=y")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, _good(tmp_path)), ["filters.noop.sleep_s=0.5"])
    again = build_config(json.loads(json.dumps(to_dict(cfg))))
    assert again == cfg


def _run_cli(args, cwd):
    return subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "run.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("extra, message", [
    (["runtime.bogus=1"], "unknown key"),
    (["runtime.consumers=two"], "expected an integer"),
    (["input.manifest=/nonexistent/manifest.parquet"], "does not exist"),
])
def test_cli_config_errors_exit_non_zero_before_work(tmp_path, extra, message):
    raw = _good(tmp_path)
    proc = _run_cli(["--config", _write(tmp_path, raw), *extra], tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # no work done, nothing written


def test_shipped_configs_are_valid_in_shape():
    # every shipped config parses and type-checks (input existence is checked at run time, not here)
    import glob

    from pipeline.config import build_config, load_raw, validate_config

    paths = glob.glob(os.path.join(ROOT, "configs", "*.yaml"))
    assert len(paths) >= 2
    for path in paths:
        cfg = build_config(load_raw(path))
        validate_config(cfg)
        assert cfg.enabled_filters, path


def test_cli_strict_gpu_flag_reaches_the_recorded_config(tmp_path, media_dir):
    from tests.conftest import make_corpus, write_manifest

    rows = make_corpus(str(tmp_path / "c"), media_dir, 2)
    raw = {"input": {"manifest": write_manifest(str(tmp_path / "m.parquet"), rows)},
           "storage": {"cache_dir": str(tmp_path / "cache"), "tiers": [{"name": "s", "root": str(tmp_path / "c")}]},
           "runtime": {"progress": False}, "output": {"dir": str(tmp_path / "out")}, "filters": {"noop": {}}}
    proc = _run_cli(["--config", _write(tmp_path, raw), "--strict-gpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    recorded = json.load(open(tmp_path / "out" / "_config.json"))
    assert recorded["config"]["runtime"]["strict_gpu"] is True


def test_nvdec_decode_without_an_nvdec_backend_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"NVDEC through torchcodec or PyAV, neither of which is in video.backends "
                                          r"\['decord', 'pillow'\]"):
        load_config(_write(tmp_path, _good(tmp_path)), ["video.decode_device=cuda", "video.backends=[decord, pillow]"])
    assert load_config(_write(tmp_path, _good(tmp_path)), ["video.decode_device=cuda"]).video.decode_device == "cuda"
    assert load_config(_write(tmp_path, _good(tmp_path)),
                       ["video.decode_device=cuda", "video.backends=[decord, pyav]"]).video.backends == ("decord", "pyav")


def test_ranks_given_another_job_are_named_setting_by_setting():
    from pipeline.config import job_identity, load_config
    from pipeline.resume import rank_settings, ranks_disagree

    def settings(*overrides, out="/out"):
        cfg = load_config(None, ["input.manifest=/m.parquet", "output.dir=/out", "filters.probe.type=probe",
                                 *overrides])
        return rank_settings(job_identity(cfg), out, cfg.input.portable_types)

    same = settings()
    assert ranks_disagree([same, settings(), settings("runtime.producers=7", "storage.cache_dir=/elsewhere")]) is None
    said = ranks_disagree([same, settings("video.decode_max_side=256"), settings(out="/other"), same,
                           settings("video.decode_max_side=256")])
    assert said.startswith("the ranks were not given the same job (output.dir: \"/out\" on ranks 0,1,3,4; \"/other\" "
                           "on rank 2 | video.decode_max_side: ")
    assert "256 on ranks 1,4" in said
    # a filter enabled on one rank only: its settings are absent on the others
    extra = settings("filters.noop2.type=noop")
    said = ranks_disagree([same, extra])
    assert 'filters.noop2.type: "(unset)" on rank 0; "noop" on rank 1' in said
    # not in the job's identity (the committed schema guards it between runs), but the same for every rank of one
    said = ranks_disagree([same, settings("input.portable_types=false")])
    assert said and "input.portable_types: true on rank 0; false on rank 1" in said


def test_credentials_stay_out_of_the_job_identity_and_a_url_signed_anew_is_the_same_job():
    """The identity is written to _config.json and its differences between ranks are printed: a filter's
    storage_options (an S3 key and secret) were written and printed as they were, and a manifest at a signed URL
    was another job at every rerun (the URL is signed anew), refused as a changed input.manifest."""
    from pipeline.config import job_identity, load_config
    from pipeline.resume import identity_changes, redact

    def identity(signature: str) -> dict:
        return job_identity(load_config(None, [
            f"input.manifest=https://h.example/m.parquet?X-Amz-Security-Token=TOKEN-{signature}&X-Amz-Signature={signature}",
            "output.dir=/o", "filters.y.type=yolo_regions", "filters.y.model_uri=s3://b/y.pt",
            "filters.y.storage_options={key: AKIAEXAMPLE, secret: TOPSECRET}"]))

    first, again = identity("SIG1"), identity("SIG2")
    said = json.dumps(first)
    assert "TOPSECRET" not in said and "AKIAEXAMPLE" not in said and "SIG1" not in said
    assert first["input"]["manifest"] == "https://h.example/m.parquet?X-Amz-Security-Token=***&X-Amz-Signature=***"
    assert first == again and identity_changes(first, again) == ([], [])
    # an output recorded before: its identity held both, and its rerun is still the same job
    old = json.loads(said.replace("***", "SIG0"))
    old["filters"]["y"]["storage_options"] = {"key": "AKIAEXAMPLE", "secret": "TOPSECRET"}
    assert identity_changes(old, again) == ([], [])
    assert identity_changes(old, identity("SIG3") | {"video": {**first["video"], "tone_map": False}})[0] == \
        ["video.tone_map"]
    # the resolved config written beside it: credentials by name, and in URLs
    written = redact({"input": {"manifest": "https://h/m?sig=abc&lang=en"}, "storage": {"secret": "s"}})
    assert written == {"input": {"manifest": "https://h/m?sig=***&lang=en"}, "storage": {"secret": "***"}}


def test_signed_urls_and_passwords_in_messages_and_log_records_are_redacted(caplog):
    import logging

    from pipeline.errors import redact_urls
    from pipeline.metrics import RedactSecrets

    cases = {  # a presigned S3 URL (with an STS session token), GCS and Azure SAS, a CDN token, a password
        "url='https://b.s3.amazonaws.com/v.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F2026"
        "&X-Amz-Security-Token=IQoJb3Jp&X-Amz-SignedHeaders=host&X-Amz-Signature=abc123'":
            "url='https://b.s3.amazonaws.com/v.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
            "&X-Amz-Security-Token=***&X-Amz-SignedHeaders=host&X-Amz-Signature=***'",
        "https://storage.googleapis.com/b/o?X-Goog-Credential=sa%40p&X-Goog-Signature=9f":
            "https://storage.googleapis.com/b/o?X-Goog-Credential=***&X-Goog-Signature=***",
        "https://a.blob.core.windows.net/c/v.mp4?sv=2022-11-02&se=2026-12-06&sp=r&sig=AbC%2B":
            "https://a.blob.core.windows.net/c/v.mp4?sv=2022-11-02&se=2026-12-06&sp=r&sig=***",
        "https://cdn.example/v.mp4?token=xyz&quality=hd#t=10": "https://cdn.example/v.mp4?token=***&quality=hd#t=10",
        "ftp://user:hunter2@host/v.mp4": "ftp://user:***@host/v.mp4",
    }
    for text, clean in cases.items():
        assert redact_urls(text) == clean
    untouched = "s3://bucket/key.mp4 https://x.example/a?b=c&lang=en width=320 a=b"
    assert redact_urls(untouched) == untouched

    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "fetch of %s failed", ("https://h/v?sig=SECRET",),
                               None)
    try:
        raise OSError("403 for https://h/v?token=SECRET2")
    except OSError:
        import sys

        record.exc_info = sys.exc_info()
    RedactSecrets().filter(record)
    assert record.getMessage() == "fetch of https://h/v?sig=*** failed"
    assert "SECRET2" not in record.exc_text and "token=***" in record.exc_text
