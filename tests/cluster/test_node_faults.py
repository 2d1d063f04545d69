"""A worker node SIGKILLed (raylet, object store and its workers at once) in the middle of a DDP
train_vqvae job; a replacement node joins. Judged by what ends up in storage."""

from __future__ import annotations

import io
import json
import re
import signal
import time

import torch
import yaml
from mlflow.tracking import MlflowClient

from pipelines import storage
from pipelines.training import OPTIMIZER_FILE
from tests.cluster.services import http_get
from tests.cluster.test_pipeline_job import CLASSES, manifest, submit, wait_job
from tests.pipelines.conftest import tiny_raw_config

STEPS = 16
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints
EVERY = 4


def _train_worker_nodes(cluster) -> set[str]:
    body = http_get(
        f"{cluster.dashboard}/api/v0/actors?limit=10000&detail=true",
        cluster.auth_headers,
        timeout=30,
    )
    actors = json.loads(body)["data"]["result"]["result"]
    return {
        a["node_id"]
        for a in actors
        if a.get("class_name") == "RayTrainWorker" and a.get("state") == "ALIVE"
    }


def _checkpoint_steps(ray_dir: str) -> list[int]:
    steps = {
        int(m.group(1)) for f in storage.list_files(ray_dir) if (m := re.search(r"step-(\d+)/", f))
    }
    return sorted(steps)


def _registered_steps(ray_dir: str) -> list[int]:
    snapshots = [f for f in storage.list_files(ray_dir) if f.endswith(SNAPSHOT)]
    text = "".join(storage.read_bytes(f).decode(errors="replace") for f in snapshots)
    return sorted({int(s) for s in re.findall(r"step-(\d+)", text)})


def test_worker_node_killed_mid_training_with_a_replacement(
    ray_cluster, s3_server, aws_env, job_env, mlflow_server, cluster_root
):
    from pipelines.demo_data import generate_corpus

    source = s3_server.url("corpus-faults")
    output_dir = s3_server.url("runs", "node-kill")
    generate_corpus(source, classes=CLASSES, images_per_class=6, image_size=16)
    raw = tiny_raw_config(output_dir, source)
    raw["ray"] = {"address": "auto"}
    raw["mlflow"] = {"tracking_uri": mlflow_server.url, "experiment": "node-kill"}
    raw["train_vqvae"] |= {
        "num_workers": 2,
        "cpus_per_worker": 1,
        "steps": STEPS,
        "checkpoint_every": EVERY,
        "eval_every": EVERY,
        "max_failures": 3,
    }
    config = cluster_root / "node-kill.yaml"
    config.write_text(yaml.safe_dump(raw))
    ray_dir = storage.join(output_dir, "train_vqvae", "ray")

    client, job = submit(ray_cluster, job_env, config, module="jobs.stage train_vqvae")
    client_job = (client, job)
    deadline = time.monotonic() + 300
    # Wait for a checkpoint Ray Train has registered (listed in its snapshot), not merely one
    # whose files are being uploaded: a restart only resumes from a registered one.
    while not (registered := _registered_steps(ray_dir)):
        assert not client.get_job_status(job).is_terminal(), client.get_job_logs(job)[-5000:]
        assert time.monotonic() < deadline, "no registered checkpoint after 300 s"
        time.sleep(0.5)

    # Kill a worker node (not the head) that runs a DDP rank, all its processes at once.
    nodes = {n["node_id"]: n for n in ray_cluster.alive_nodes()}
    victims = [nodes[i] for i in _train_worker_nodes(ray_cluster) if not nodes[i]["is_head_node"]]
    assert victims, "no DDP rank on a worker node"
    victim = ray_cluster.node_service(victims[0])
    steps_at_kill = registered
    killed_at = time.monotonic()
    pids = victim.kill(signal.SIGKILL)
    ray_cluster.add_worker(f"r{int(killed_at) % 1000}")  # the replacement node
    ray_cluster.workers.remove(victim)
    ray_cluster.wait_for_nodes(3, timeout=120)

    status = wait_job(*client_job)
    recovered = time.monotonic() - killed_at
    log = client.get_job_logs(job)
    assert status == "SUCCEEDED", log[-6000:]

    # Storage: the stage finished at exactly the configured step, from resumed state.
    m = manifest(output_dir, "train_vqvae")
    assert m is not None and m.steps == STEPS
    steps = _checkpoint_steps(ray_dir)
    assert steps[-1] == STEPS and all(s % EVERY == 0 for s in steps), steps
    final = [f for f in storage.list_files(ray_dir) if f"step-{STEPS:08d}/{OPTIMIZER_FILE}" in f]
    assert len(final) == 1, final
    state = torch.load(io.BytesIO(storage.read_bytes(final[0])), weights_only=True)["state"]
    adam_steps = {int(s["step"]) for s in state.values()}
    # Adam counted every step since the start: its state came back from the checkpoint, it was
    # not re-created after the restart.
    assert adam_steps == {STEPS}, adam_steps

    history = MlflowClient(tracking_uri=mlflow_server.url).get_metric_history(
        m.mlflow_run_id, "resumed_at_step"
    )
    resumed = [int(h.value) for h in history]
    assert resumed and all(0 < r < STEPS and r % EVERY == 0 for r in resumed), resumed
    assert resumed[0] >= max(steps_at_kill), (resumed, steps_at_kill)
    print(
        f"killed node {victim.name} ({len(pids)} processes) with checkpoints {steps_at_kill}; "
        f"resumed at {resumed}; job succeeded {recovered:.0f} s after the kill; "
        f"checkpoints in storage {steps}"
    )
