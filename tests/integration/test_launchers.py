"""The launchers: the Slurm script runs the job through its own srun/torchrun line; the k8s manifest is sound."""

import os
import stat
import subprocess
import sys

import pyarrow.parquet as pq
import yaml

from tests.conftest import ROOT, base_config, make_corpus, write_manifest


def _shim(path, body):
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_slurm_script_runs_the_job_and_resumes(tmp_path, media_dir):
    rows = make_corpus(str(tmp_path / "c"), media_dir, 8)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(
        base_config(manifest, str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"))))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # stand-ins for the two Slurm commands the script calls, on a one-node "allocation"
    _shim(bin_dir / "scontrol", 'echo 127.0.0.1')
    _shim(bin_dir / "srun", 'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=0 exec "$@"')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1",
               SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=ROOT, GPUS_PER_NODE="2", CONFIG=str(tmp_path / "job.yaml"),
               MASTER_PORT=str(__import__("tests.s3server", fromlist=["free_port"]).free_port()),
               PYTHON=sys.executable, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    for attempt in range(2):
        proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(pq.read_table(str(tmp_path / "out" / "parts"))["video_id"].to_pylist()) == \
        sorted(r["video_id"] for r in rows)  # the second submission resumed: nothing twice
    assert "8 already done" in proc.stdout
    assert os.path.isdir(os.path.join(ROOT, "logs", "4242"))  # per-rank logs
    subprocess.run(["rm", "-rf", os.path.join(ROOT, "logs", "4242")])


def test_k8s_manifest_is_a_pytorchjob_with_secrets_from_the_environment():
    docs = list(yaml.safe_load_all(open(os.path.join(ROOT, "launch", "k8s", "pytorchjob.yaml"))))
    kinds = {d["kind"]: d for d in docs}
    job = kinds["PyTorchJob"]
    assert job["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["torchrun", "jobs/run.py"]
    assert container["envFrom"][0]["secretRef"]["name"]
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["job.yaml"])
    from pipeline.config import build_config

    cfg = build_config(config)  # the embedded config is a valid job config
    assert cfg.storage.cache_dir == "/cache" and "secret" not in kinds["ConfigMap"]["data"]["job.yaml"].lower()
