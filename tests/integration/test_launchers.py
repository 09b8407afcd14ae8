"""The launchers: the Slurm script runs the job through its own srun/torchrun line, stops it cleanly at the time limit
and requeues it; the k8s manifest is sound."""

import os
import signal
import stat
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import ROOT, base_config, make_corpus, write_manifest


def _shim(path, body):
    path.write_text("#!/bin/bash\n" + body + "\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _slurm_env(tmp_path, srun_body: str, **extra) -> dict:
    """Stand-ins for Slurm's commands: ``scontrol`` answers the node list and records a requeue."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _shim(bin_dir / "scontrol", f'if [ "$1" = requeue ]; then echo "$@" >> {tmp_path}/requeued; else echo 127.0.0.1; fi')
    _shim(bin_dir / "srun", srun_body)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_NODELIST="node1", SLURM_NNODES="1",
               SLURM_JOB_ID="4343", SLURM_SUBMIT_DIR=ROOT, GPUS_PER_NODE="2", PYTHON=sys.executable,
               MASTER_PORT=str(__import__("tests.s3server", fromlist=["free_port"]).free_port()), OMP_NUM_THREADS="1",
               REQUEUE_AFTER_S="0")  # the signal comes seconds after the start here
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_RESTART_COUNT"):
        env.pop(k, None)
    return {**env, **extra}


def _sbatch(env) -> subprocess.Popen:
    return subprocess.Popen(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _slow_job(tmp_path, media_dir) -> tuple[list[dict], object]:
    """``job.yaml`` over 16 items at 4 items/s on 2 ranks (one consumer each, 0.5 s an item): a signal sent once
    two parts are committed comes mid-job. Returns the manifest's rows and the output directory."""
    rows = make_corpus(str(tmp_path / "c"), media_dir, 16)
    manifest = write_manifest(str(tmp_path / "m.parquet"), rows)
    out = tmp_path / "out"
    raw = base_config(manifest, str(tmp_path / "c"), str(out), str(tmp_path / "cache"),
                      filters={"noop": {"sleep_s": 0.5}}, output={"dir": str(out), "rows_per_file": 2},
                      runtime={"consumers": 1, "producers": 1})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    return rows, out


def _wait_for(condition, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_slurm_script_stops_the_job_cleanly_at_the_time_limit_and_requeues_it(tmp_path, media_dir):
    """Slurm's USR1 before the time limit (``--signal=B:USR1@600``): the script stops the real job (SIGTERM through
    srun and torchrun: finished rows committed, the lease released) and requeues it; the requeued job resumes."""
    rows, out = _slow_job(tmp_path, media_dir)
    env = _slurm_env(tmp_path, f'echo "$TORCH_DISABLE_SHARE_RDZV_TCP_STORE" > {tmp_path}/share; '
                     'while [[ "$1" == --* ]]; do shift; done; SLURM_NODEID=0 exec "$@"', CONFIG=str(tmp_path / "job.yaml"))
    proc = _sbatch(env)
    try:
        _wait_for(lambda: (out / "parts").is_dir() and len(os.listdir(out / "parts")) >= 2)
        proc.send_signal(signal.SIGUSR1)  # what Slurm sends the batch shell ten minutes before the limit
        _out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode != 0, err[-3000:]
    assert "the time limit is near: stopping the job cleanly" in err
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "4343"]
    assert (tmp_path / "share").read_text().strip() == "1"  # torchrun's workers meet in a store of their own
    committed = pq.read_table(str(out / "parts"))["video_id"].to_pylist()
    assert 4 <= len(committed) < 16 and len(set(committed)) == len(committed)
    assert not (out / "_lease.json").exists() and not (out / "_SUCCESS").exists()  # a clean stop, not a kill

    env["SLURM_RESTART_COUNT"] = "1"  # the requeued job: the same script again
    again = subprocess.run(["bash", os.path.join(ROOT, "launch", "slurm.sbatch")], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert sorted(pq.read_table(str(out / "parts"))["video_id"].to_pylist()) == sorted(r["video_id"] for r in rows)
    assert (out / "_SUCCESS").exists() and len((tmp_path / "requeued").read_text().splitlines()) == 1
    assert f"{len(committed)} already done" in again.stdout  # resumed: what the first allocation committed
    assert os.path.isdir(os.path.join(ROOT, "logs", "4343", "node0"))  # per-rank logs
    subprocess.run(["rm", "-rf", os.path.join(ROOT, "logs", "4343")])


def _usr1_once_started(tmp_path, srun_body: str, **extra) -> tuple[int, str]:
    """Run the script over a stand-in srun (which touches ``started``), send it USR1 once srun started: its exit
    code and stderr."""
    env = _slurm_env(tmp_path, f"touch {tmp_path}/started; {srun_body}", CONFIG="configs/default.yaml", **extra)
    proc = _sbatch(env)
    try:
        _wait_for(lambda: (tmp_path / "started").exists(), 30)
        proc.send_signal(signal.SIGUSR1)
        _out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
        subprocess.run(["rm", "-rf", os.path.join(ROOT, "logs", "4343")])
    return proc.returncode, err


@pytest.mark.parametrize("srun_exit, extra, requeued, said", [
    (143, {"SLURM_RESTART_COUNT": "2", "MAX_REQUEUES": "2"}, False, "not requeued: MAX_REQUEUES=2 reached"),
    (143, {"REQUEUE": "0"}, False, "REQUEUE=0: submit the same command again to resume"),
    (0, {}, False, ""),  # the job finished as the signal came: nothing to requeue
    (143, {"SLURM_RESTART_COUNT": "4"}, True, "requeue 5 of at most 50"),
])
def test_slurm_script_requeue_decisions(tmp_path, srun_exit, extra, requeued, said):
    """A stand-in srun that waits until its SIGTERM, then exits with ``srun_exit``."""
    rc, err = _usr1_once_started(tmp_path, f'trap "kill %1; exit {srun_exit}" TERM; sleep 60 & wait', **extra)
    assert rc == srun_exit, err
    assert (tmp_path / "requeued").exists() == requeued
    assert said in err


def test_slurm_script_ignores_a_usr1_at_the_start_of_a_job_shorter_than_the_warning(tmp_path):
    """A time limit under ten minutes has Slurm send USR1 at once: the job runs on to its end, nothing is requeued
    (else every allocation would stop at its start and be requeued, MAX_REQUEUES times)."""
    rc, err = _usr1_once_started(tmp_path, "sleep 2; exit 0", REQUEUE_AFTER_S="600")
    assert rc == 0, err
    assert "the time limit is shorter than the warning; the job runs until the limit" in err
    assert not (tmp_path / "requeued").exists()


def test_k8s_manifest_is_a_pytorchjob_with_secrets_from_the_environment():
    docs = list(yaml.safe_load_all(open(os.path.join(ROOT, "launch", "k8s", "pytorchjob.yaml"))))
    kinds = {d["kind"]: d for d in docs}
    job = kinds["PyTorchJob"]
    assert job["spec"]["elasticPolicy"]["rdzvBackend"] == "c10d"
    container = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]
    assert container["command"][:2] == ["torchrun", "jobs/run.py"]
    assert container["envFrom"][0]["secretRef"]["name"]
    shutdown = int({e["name"]: e["value"] for e in container["env"]}["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    # a replaced worker pod rejoins (test_k8s_indexed_job_pods_run_the_job_and_a_replaced_pod_rejoins_it)
    assert {e["name"]: e["value"] for e in container["env"]}["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    pod = job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > shutdown  # the kubelet waits for torchrun's own wait
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["job.yaml"])
    from pipeline.config import build_config

    cfg = build_config(config)  # the embedded config is a valid job config
    assert shutdown > cfg.runtime.shutdown_grace_s + 60  # the workers' clean stop, and a commit
    assert cfg.storage.cache_dir == "/cache" and "secret" not in kinds["ConfigMap"]["data"]["job.yaml"].lower()


def _pod_env(tmp_path, container: dict, **values: str) -> dict:
    """The environment Kubernetes gives the Indexed Job's container (the YAML's values, with ``values`` in place of
    what the cluster or the downward API would set), and a ``torchrun`` on PATH as in the image."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _shim(bin_dir / "torchrun", f'exec {sys.executable} -m torch.distributed.run "$@"')
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OMP_NUM_THREADS="1",
               **{e["name"]: e["value"] for e in container["env"] if "value" in e})
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return {**env, **values}


def _indexed_job() -> tuple[dict, dict, dict, str]:
    docs = list(yaml.safe_load_all(open(os.path.join(ROOT, "launch", "k8s", "indexed-job.yaml"))))
    kinds = {d["kind"]: d for d in docs}
    job = kinds["Job"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    return kinds, job, container, kinds["ConfigMap"]["data"]["job.yaml"]


def test_k8s_indexed_job_is_wired_together():
    """A plain batch/v1 Indexed Job (no operator): the names that must agree do (the Service's name is the pods'
    subdomain and the rendezvous host's domain; completions, parallelism and NNODES; GPUs), a disruption is not
    counted as a failure, and index 0's success ends the Job."""
    from pipeline.config import build_config

    kinds, job, container, config_text = _indexed_job()
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    service = kinds["Service"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NNODES"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": job["metadata"]["name"]}
    assert pod["subdomain"] == service["metadata"]["name"]
    assert env["RDZV_HOST"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"  # index 0's DNS name
    assert int(env["RDZV_PORT"]) in [p["port"] for p in service["spec"]["ports"]]
    assert int(env["GPUS_PER_POD"]) == container["resources"]["limits"]["nvidia.com/gpu"]
    uid = next(e for e in container["env"] if e["name"] == "JOB_UID")
    assert uid["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/controller-uid']"
    assert pod["restartPolicy"] == "Never"  # what podFailurePolicy requires
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}  # first: it wins
    assert {"action": "FailJob", "onExitCodes": {"containerName": container["name"], "operator": "In",
                                                 "values": [2]}} in rules  # the job's code for a config error
    assert spec["successPolicy"]["rules"] == [{"succeededIndexes": "0"}]
    script = container["command"][2]
    assert container["command"][:2] == ["bash", "-c"] and "trap 'kill -TERM \"$child\"" in script  # SIGTERM on
    assert container["envFrom"][0]["secretRef"]["name"] and "secret" not in config_text.lower()
    shutdown = int(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > shutdown  # the kubelet waits for torchrun's own wait
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"  # else a replaced pod never rejoins (the test below)
    cfg = build_config(yaml.safe_load(config_text))
    assert shutdown > cfg.runtime.shutdown_grace_s + 60
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert os.path.dirname(env["CONFIG"]) == mounts["config"] and cfg.storage.cache_dir == mounts["cache"]


def test_k8s_indexed_job_pods_run_the_job_and_a_replaced_pod_rejoins_it(tmp_path, media_dir):
    """The container's own command, run as Kubernetes would run it in two pods (its environment, the index, the
    args), with the rendezvous host's DNS name replaced by this machine's address. Then an eviction: pod 1 gets
    SIGTERM mid-run and stops cleanly; the Job's replacement pod for index 1 (a fresh node cache) rejoins pod 0,
    whose torchrun restarts its worker into the new rendezvous; both end with 0 and every item has one row."""
    from tests.s3server import free_port

    _kinds, _job, container, _config = _indexed_job()
    rows, out = _slow_job(tmp_path, media_dir)
    base = _pod_env(tmp_path, container, RDZV_HOST="127.0.0.1", RDZV_PORT=str(free_port()), GPUS_PER_POD="1",
                    CONFIG=str(tmp_path / "job.yaml"), JOB_UID=f"uid-{os.getpid()}")  # JOB_UID: the fieldRef's

    def pod(index: int, name: str) -> subprocess.Popen:
        args = [*container["command"], *container["args"], f"storage.cache_dir={tmp_path / name}"]
        return subprocess.Popen(args, env={**base, "JOB_COMPLETION_INDEX": str(index)}, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / f"{name}.log", "w"),
                                start_new_session=True)

    def log(name: str) -> str:
        return (tmp_path / f"{name}.log").read_text()[-3000:]

    pods = [pod(0, "pod0"), pod(1, "pod1")]
    try:
        _wait_for(lambda: (out / "parts").is_dir() and len(os.listdir(out / "parts")) >= 2)
        pods[1].send_signal(signal.SIGTERM)  # the kubelet's stop of an evicted pod: to its process 1
        assert pods[1].wait(120) not in (0, 2), log("pod1")  # stopped, not finished nor refused: the Job replaces it
        assert pods[0].poll() is None, log("pod0")  # pod 0 waits in a new rendezvous for the replacement
        replacement = pod(1, "pod1-new")
        assert pods[0].wait(120) == 0, log("pod0")
        assert replacement.wait(60) == 0, log("pod1-new")
    finally:
        for p in pods + [locals().get("replacement")]:
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    table = pq.read_table(str(out / "parts")).to_pylist()
    ok = [r["video_id"] for r in table if r["result_info"]["succeed"]]
    assert sorted(ok) == sorted(r["video_id"] for r in rows)  # one success row each: nothing lost, nothing twice
    assert len({r["result_info"]["run_id"] for r in table}) >= 2  # the replacement's rows came from a second run
    assert (out / "_SUCCESS").exists()
    assert "torchrun shares its rendezvous store" not in (tmp_path / "pod0.log").read_text()


def test_k8s_indexed_job_pod_ends_with_2_on_a_config_error(tmp_path):
    """torchrun ends with 1 whatever its workers' codes; the pod's script ends with the job's 2 for a config error,
    which the Job's podFailurePolicy fails the Job on at once (before: retried with back-off until backoffLimit,
    every pod, each after torchrun's own restarts)."""
    from tests.s3server import free_port

    _kinds, _job, container, _config = _indexed_job()
    raw = base_config("m.parquet", str(tmp_path / "c"), str(tmp_path / "out"), str(tmp_path / "cache"))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(raw))
    env = _pod_env(tmp_path, container, NNODES="1", GPUS_PER_POD="1", RDZV_PORT=str(free_port()),
                   CONFIG=str(tmp_path / "job.yaml"), JOB_UID="uid-config", JOB_COMPLETION_INDEX="0",
                   MAX_RESTARTS="1")  # a restart: its code counts
    proc = subprocess.run([*container["command"], "runtime.consumers=0"], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "runtime.consumers must be >= 1" in proc.stderr and "the Job fails without retrying" in proc.stderr


def test_the_exit_code_is_written_by_local_rank_0_only_and_a_failed_write_is_said(tmp_path, monkeypatch, caplog):
    import importlib.util

    spec = importlib.util.spec_from_file_location("mediasieve_run", os.path.join(ROOT, "jobs", "run.py"))
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    path = tmp_path / "code"
    monkeypatch.setenv("MEDIASIEVE_EXIT_CODE_FILE", str(path))
    monkeypatch.setenv("LOCAL_RANK", "1")
    run.say_exit_code(2)
    assert not path.exists()  # another local rank: the node's rank 0 says it
    monkeypatch.setenv("LOCAL_RANK", "0")
    run.say_exit_code(2)
    assert path.read_text() == "2\n"
    run.say_exit_code(None)  # an attempt's start: the last attempt's code goes
    assert not path.exists()
    monkeypatch.setenv("MEDIASIEVE_EXIT_CODE_FILE", str(tmp_path / "no-such-dir" / "code"))
    run.say_exit_code(2)  # the launcher then ends with torchrun's own code
    assert "cannot write the exit code to" in caplog.text
