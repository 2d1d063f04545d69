"""The pipeline as a Ray job on the multi-node cluster, with storage and MLflow on real servers.

One submission is stopped (its driver killed) once train_vqvae has finished; the job is submitted
again and must skip the finished stage, finish the rest, and leave the same outputs a clean run
would. What the runs wrote is then read back from the bucket and the MLflow server.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.data import storage
from pipelines.manifest import StageManifest, read_manifest
from pipelines.stages import get_stage, stage_names
from tests.cluster.services import http_get
from tests.pipelines.conftest import tiny_raw_config

STAGES = stage_names()

REPO = Path(__file__).resolve().parents[2]
CLASSES = ["circle", "square", "triangle", "cross"]
PER_CLASS = 6
CORRUPT = 2
JOB_TIMEOUT_S = 900  # generous: the machine is shared and its load varies a lot


def submit(
    cluster, env: dict[str, str], config: Path, *overrides: str, module: str = "jobs.run_pipeline"
) -> tuple[Any, str]:
    """Submit ``python -m MODULE CONFIG --set ...`` with the auth token; the repo is the working dir."""
    sets = " ".join(f"--set {o}" for o in overrides)
    return submit_command(cluster, env, f"python -m {module} {config} {sets}".strip())


def submit_command(cluster, env: dict[str, str], entrypoint: str) -> tuple[Any, str]:
    """Submit ``entrypoint`` as a job with the auth token; the repo is the working dir."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard, headers=cluster.auth_headers)
    job_id = client.submit_job(
        entrypoint=entrypoint,
        runtime_env={
            "working_dir": str(REPO),
            "excludes": [".venv", ".git", "runs", "tests/infra/kuberay", "*.pyc"],
            "env_vars": env | {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONUNBUFFERED": "1"},
        },
    )
    return client, job_id


def wait_job(client, job_id: str, timeout: float = JOB_TIMEOUT_S) -> str:
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return str(status.value)
        time.sleep(2)
    client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    raise TimeoutError(f"job {job_id} not done after {timeout} s; log tail:\n{logs[-4000:]}")


def manifest(output_dir: str, stage: str) -> StageManifest | None:
    """The stage's typed manifest, None until the stage has finished."""
    return read_manifest(output_dir, get_stage(stage).manifest)


@pytest.fixture(scope="module")
def pipeline_job(ray_cluster, s3_server, aws_env, job_env, mlflow_server, cluster_root):
    """Run the pipeline as a job twice (the first one killed after train_vqvae); return a summary."""
    from pipelines.data.demo_data import generate_corpus

    source = s3_server.url("corpus")
    output_dir = s3_server.url("runs", "job")
    generate_corpus(
        source,
        classes=CLASSES,
        images_per_class=PER_CLASS,
        image_size=16,
        corrupt_files=CORRUPT,
    )
    raw = tiny_raw_config(output_dir, source)
    raw["ray"] = {"address": "auto"}
    raw["mlflow"] = {"tracking_uri": mlflow_server.url, "experiment": "cluster-job"}
    raw["train_vqvae"] |= {"num_workers": 2, "cpus_per_worker": 1, "steps": 8}
    raw["tokenize"] |= {"num_actors": 2}
    config = cluster_root / "job.yaml"
    config.write_text(yaml.safe_dump(raw))

    started = time.monotonic()
    client, first = submit(ray_cluster, job_env, config, "mlflow.run_name=first")
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while manifest(output_dir, "train_vqvae") is None:
        status = client.get_job_status(first)
        if status.is_terminal() or time.monotonic() > deadline:
            raise AssertionError(
                f"first job {status} before train_vqvae finished:\n"
                f"{client.get_job_logs(first)[-6000:]}"
            )
        time.sleep(1)
    train_done = time.monotonic() - started
    client.stop_job(first)  # the driver is killed mid-pipeline
    first_status = wait_job(client, first, timeout=60)
    interrupted = {s: manifest(output_dir, s) for s in STAGES}

    restarted = time.monotonic()
    client, second = submit(ray_cluster, job_env, config, "mlflow.run_name=second")
    second_status = wait_job(client, second)
    finished = time.monotonic()
    logs = client.get_job_logs(first) + client.get_job_logs(second)
    print(
        f"train_vqvae done after {train_done:.0f} s; second job {second_status} "
        f"{finished - restarted:.0f} s after resubmission; total {finished - started:.0f} s"
    )
    return {
        "output_dir": output_dir,
        "first_status": first_status,
        "second_status": second_status,
        "interrupted": interrupted,
        "manifests": {s: manifest(output_dir, s) for s in STAGES},
        "logs": logs,
        "second_log": client.get_job_logs(second),
        "jobs": (first, second),
    }


def test_resubmitted_job_finishes_every_stage(pipeline_job):
    assert pipeline_job["first_status"] == "STOPPED"
    assert pipeline_job["second_status"] == "SUCCEEDED", pipeline_job["second_log"][-6000:]
    for stage in STAGES:
        m = pipeline_job["manifests"][stage]
        assert m is not None, stage


def test_finished_stage_skipped_after_the_driver_died(pipeline_job):
    interrupted = pipeline_job["interrupted"]
    assert interrupted["tokenize"] is None
    before = interrupted["train_vqvae"]
    after = pipeline_job["manifests"]["train_vqvae"]
    assert after.mlflow_run_id == before.mlflow_run_id  # not trained again
    assert "train_vqvae: up to date" in pipeline_job["second_log"]


def test_outputs_sit_in_the_bucket(pipeline_job):
    out = pipeline_job["output_dir"]
    m = pipeline_job["manifests"]
    assert m["train_vqvae"].checkpoint.startswith("s3://")
    assert storage.exists(m["train_vqvae"].checkpoint)
    tok = m["tokenize"]
    assert tok.samples == PER_CLASS * len(CLASSES)
    assert tok.bad_inputs.count == CORRUPT
    shards = [s.uri for s in tok.shards]
    assert shards and all(s.startswith(out) and storage.exists(s) for s in shards)
    assert sum(s.samples for s in tok.shards) == tok.samples
    assert not [f for f in storage.list_files(out) if f.endswith(storage.TMP_SUFFIX)]
    # Ray Train's checkpoints went to the bucket too, and the run ended at the configured step.
    ckpts = [f for f in storage.list_files(storage.join(out, "train_vqvae", "ray"))]
    assert any("/checkpoint" in f or "step-" in f for f in ckpts), ckpts[:10]
    assert any("step-00000008" in f for f in ckpts), ckpts[:10]


def test_ddp_workers_ran_on_two_nodes(pipeline_job, ray_cluster):
    body = http_get(
        f"{ray_cluster.dashboard}/api/v0/actors?limit=10000&detail=true",
        ray_cluster.auth_headers,
        timeout=30,
    )
    actors = json.loads(body)["data"]["result"]["result"]
    workers = [a for a in actors if a.get("class_name") == "RayTrainWorker"]
    nodes = {a["node_id"] for a in workers if a.get("node_id")}
    assert len(nodes) >= 2, [(a["class_name"], a.get("node_id")) for a in workers]
    # On a cluster a run keeps its placement-group cleaner (the controller can die while the
    # cluster lives on); no run was given Ray Data datasets, so none started a dataset manager.
    started = {a.get("class_name") for a in actors}
    assert "PlacementGroupCleaner" in started and "DatasetManager" not in started, started


def test_mlflow_runs_metrics_and_artifacts(pipeline_job, mlflow_server, s3_server):
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("cluster-job")
    parents = {
        r.info.run_name: r
        for r in client.search_runs(
            [experiment.experiment_id], filter_string="tags.`vqpipe.kind` = 'pipeline'"
        )
    }
    assert {"first", "second"} <= set(parents)
    assert parents["second"].info.status == "FINISHED"
    runs = {}
    for name in ("first", "second"):
        for run in client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parents[name].info.run_id}'",
        ):
            if run.info.status == "FINISHED":
                runs[run.data.tags["vqpipe.stage"]] = run
    assert set(runs) == set(STAGES)
    for stage, run in runs.items():
        assert run.info.run_id == pipeline_job["manifests"][stage].mlflow_run_id, stage
        assert "manifest.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
    vq = runs["train_vqvae"]
    history = client.get_metric_history(vq.info.run_id, "train/loss")
    assert [h.step for h in history] == [2, 4, 6, 8]
    assert vq.data.params["train_vqvae.num_workers"] == "2"
    # Artifacts are proxied by the server into the bucket.
    stored = storage.list_files(s3_server.url("mlartifacts"))
    assert any(f.endswith(f"{vq.info.run_id}/artifacts/manifest.json") for f in stored), stored[:5]


def test_credentials_appear_nowhere(
    pipeline_job, secret_key, s3_server, mlflow_server, cluster_root, ray_cluster
):
    needle = secret_key.encode()
    leaks = []
    # Everything in the bucket: outputs, checkpoints, MLflow artifacts.
    for uri in storage.list_files(s3_server.url()):
        if needle in storage.read_bytes(uri):
            leaks.append(uri)
    if needle in pipeline_job["logs"].encode():
        leaks.append("job logs")
    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name("cluster-job")
    for run in client.search_runs([experiment.experiment_id]):
        if secret_key in json.dumps([run.data.params, run.data.tags]):
            leaks.append(f"MLflow run {run.info.run_name} params/tags")
    for path in [*(REPO / "infra").rglob("*"), REPO / "configs" / "cluster.yaml"]:
        if path.is_file() and needle in path.read_bytes():
            leaks.append(str(path.relative_to(REPO)))
    # What Ray keeps about the jobs (their runtime_env).
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(ray_cluster.dashboard, headers=ray_cluster.auth_headers)
    for job_id in pipeline_job["jobs"]:
        if secret_key in json.dumps(jobs.get_job_info(job_id).runtime_env or {}):
            leaks.append(f"runtime_env of job {job_id}")
    # Every file the services wrote: Ray nodes' logs (workers, raylets, runtime_env agents, job
    # drivers), the MLflow server's log and database, the S3 server's log.
    for path in cluster_root.rglob("*"):
        if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
            leaks.append(str(path.relative_to(cluster_root)))
    assert leaks == []


def test_pinned_tokenizer_in_the_bucket_encodes_the_corpus_again(
    pipeline_job, ray_cluster, s3_server, job_env, mlflow_server
):
    """`vqpipe tokenize --checkpoint s3://...` as a job: the autoencoder train_vqvae left in the
    bucket, pinned, encodes the same corpus to exactly the codes the pipeline's tokenize wrote."""
    from pipelines.data.shards import iter_manifest_samples
    from pipelines.stage_manifests import TokenizeManifest
    from pipelines.tokenizer import sha256_of

    checkpoint = pipeline_job["manifests"]["train_vqvae"].checkpoint
    output = s3_server.url("runs", "pinned")
    client, job = submit_command(
        ray_cluster,
        job_env,
        f"python -m jobs.cli tokenize --checkpoint {checkpoint} --input {s3_server.url('corpus')}"
        f" --output {output} --set ray.address=auto --set tokenize.num_actors=2"
        f" --set mlflow.tracking_uri={mlflow_server.url}",
    )
    status = wait_job(client, job)
    assert status == "SUCCEEDED", client.get_job_logs(job)[-6000:]

    pinned = read_manifest(output, TokenizeManifest)
    assert pinned.tokenizer.checkpoint == checkpoint
    assert pinned.tokenizer.sha256 == sha256_of(storage.read_bytes(checkpoint))
    assert not [k for k in pinned.inputs if "train_vqvae" in k]  # no train_vqvae stage behind it
    assert [k for k in pipeline_job["manifests"]["tokenize"].inputs if "train_vqvae" in k]

    def codes(m):
        return {s["key"]: (s["label"], s["top"], s["bottom"]) for s in iter_manifest_samples(m)}

    again, first = codes(pinned), codes(pipeline_job["manifests"]["tokenize"])
    assert sorted(again) == sorted(first) and len(again) == PER_CLASS * len(CLASSES)
    for key, (label, top, bottom) in first.items():
        assert again[key][0] == label, key
        assert (again[key][1] == top).all() and (again[key][2] == bottom).all(), key
