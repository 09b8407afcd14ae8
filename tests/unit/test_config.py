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
