"""Worker nodes SIGKILLed (raylet, object store and their workers at once) while a stage runs as a
Ray job. Judged by what ends up in storage.

- train_vqvae loses a node with a DDP rank while the cluster still has room for both ranks
  elsewhere, no node replaces it: the run ends at exactly the configured step, model and
  optimizer resumed;
- tokenize, on the autoencoder that run trained, loses a node while shards are being written
  (a node is added first: the readers need a whole free CPU beside the encoder actor): every image
  ends up in exactly one complete shard;
- train_vqvae loses a node with a DDP rank when the node left has room for one rank only, and a
  replacement node joins: a rank runs on the new node and the run ends at exactly the configured
  step, model and optimizer resumed;
- train_vqvae loses a node and no room is left for its ranks: the stage fails within
  ``ray.resource_wait_seconds`` with an error naming what it asked for, checkpoints kept.

Each kill takes a node away for good, so conftest runs this module after every other cluster test.
The three-node cluster (one CPU each) goes: head + 2 workers -> head + 1 -> head + 2 (one added) ->
head + 1 -> head + 1 (one killed, one added) -> head alone.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import signal
import tarfile
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient

from pipelines.data import storage
from pipelines.data.shards import KEY_INDEX_SUFFIX, read_key_index
from pipelines.training import OPTIMIZER_FILE
from tests.cluster.services import RayCluster, http_get, wait_until
from tests.cluster.test_pipeline_job import CLASSES, manifest, submit, wait_job
from tests.pipelines.conftest import tiny_raw_config
from vq_core.checkpoint import load_checkpoint

PER_CLASS = 20  # 80 images: 10 shards of 8 in tokenize, so the kill lands while it writes
STEPS = 16
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints
EVERY = 4
WAIT = 10  # ray.resource_wait_seconds of the run that is left without room
# The run whose node is replaced waits for room at most this long: the new node must start and
# join in that time on a busy machine.
REPLACEMENT_WAIT = 180


def _actor_nodes(cluster: RayCluster, class_name: str, alive_only: bool = True) -> set[str]:
    """Nodes of the actors whose class name contains ``class_name``: the alive ones, or all the
    State API still lists (dead ones included) with ``alive_only=False``."""
    body = http_get(
        f"{cluster.dashboard}/api/v0/actors?limit=10000&detail=true",
        cluster.auth_headers,
        timeout=30,
    )
    actors = json.loads(body)["data"]["result"]["result"]
    return {
        a["node_id"]
        for a in actors
        if class_name in (a.get("class_name") or "")
        and (a.get("state") == "ALIVE" or not alive_only)
    }


def _kill_worker_node(cluster: RayCluster, among: set[str] | None = None) -> dict[str, Any]:
    """SIGKILL every process of one worker node (never the head), preferring nodes in ``among``;
    the node is not replaced."""
    nodes = [n for n in cluster.alive_nodes() if not n["is_head_node"]]
    assert nodes, "no worker node left to kill"
    preferred = [n for n in nodes if among and n["node_id"] in among]
    victim = cluster.node_service((preferred or nodes)[0])
    killed_at = time.monotonic()
    pids = victim.kill(signal.SIGKILL)
    cluster.workers.remove(victim)
    return {"name": victim.name, "pids": pids, "at": killed_at, "preferred": bool(preferred)}


@contextlib.contextmanager
def _stopped_on_failure(client, job: str) -> Iterator[None]:
    """Stop the job if the block fails, so that it does not run on into the next test."""
    try:
        yield
    except BaseException:
        if not client.get_job_status(job).is_terminal():
            client.stop_job(job)
        raise


def _checkpoint_steps(ray_dir: str) -> list[int]:
    steps = {
        int(m.group(1)) for f in storage.list_files(ray_dir) if (m := re.search(r"step-(\d+)/", f))
    }
    return sorted(steps)


def _registered_steps(ray_dir: str) -> list[int]:
    snapshots = [f for f in storage.list_files(ray_dir) if f.endswith(SNAPSHOT)]
    text = "".join(storage.read_bytes(f).decode(errors="replace") for f in snapshots)
    return sorted({int(s) for s in re.findall(r"step-(\d+)", text)})


def _wait_for_registered_checkpoint(client, job: str, ray_dir: str) -> list[int]:
    """Wait for a checkpoint Ray Train has registered (listed in its snapshot), not merely one
    whose files are being uploaded: a restart only resumes from a registered one."""
    deadline = time.monotonic() + 300
    while not (registered := _registered_steps(ray_dir)):
        assert not client.get_job_status(job).is_terminal(), client.get_job_logs(job)[-5000:]
        assert time.monotonic() < deadline, "no registered checkpoint after 300 s"
        time.sleep(0.5)
    return registered


@pytest.fixture(scope="module")
def fault_config(ray_cluster, s3_server, aws_env, mlflow_server, cluster_root):
    """Write a config for a run under ``runs/<name>``; returns (config path, output dir)."""
    from pipelines.data.demo_data import generate_corpus

    source = s3_server.url("corpus-faults")
    generate_corpus(source, classes=CLASSES, images_per_class=PER_CLASS, image_size=16)

    def make(name: str, resource_wait: float = WAIT, **train_vqvae: Any) -> tuple[Any, str]:
        output_dir = s3_server.url("runs", name)
        raw = tiny_raw_config(output_dir, source)
        raw["ray"] = {"address": "auto", "resource_wait_seconds": resource_wait}
        raw["mlflow"] = {"tracking_uri": mlflow_server.url, "experiment": name}
        raw["train_vqvae"] |= {
            "num_workers": 2,
            "cpus_per_worker": 1,
            "steps": STEPS,
            "checkpoint_every": EVERY,
            "eval_every": EVERY,
            "max_failures": 3,
            **train_vqvae,
        }
        # One encoder actor of half a CPU: wherever it restarts, a node keeps a whole CPU for the
        # readers (a read task takes one).
        raw["tokenize"] |= {"num_actors": 1, "cpus_per_actor": 0.5, "shard_max_samples": 8}
        config = cluster_root / f"{name}.yaml"
        config.write_text(yaml.safe_dump(raw))
        return config, output_dir

    return make


def _kill_a_rank_node_mid_training(
    cluster: RayCluster,
    job_env: dict[str, str],
    run: tuple[Any, str],
    timeout: float,
    after_kill: Callable[[dict[str, Any]], Any] | None = None,
) -> dict[str, Any]:
    """train_vqvae as a job with ``run`` (config, output_dir); once Ray Train has registered a
    checkpoint, SIGKILL a worker node holding a DDP rank, call ``after_kill(kill)`` (its result is
    returned as "after"), and wait for the job to end."""
    config, output_dir = run
    ray_dir = storage.join(output_dir, "train_vqvae", "ray")
    client, job = submit(cluster, job_env, config, module="jobs.stage train_vqvae")
    with _stopped_on_failure(client, job):
        registered = _wait_for_registered_checkpoint(client, job, ray_dir)
        kill = _kill_worker_node(cluster, among=_actor_nodes(cluster, "RayTrainWorker"))
        assert kill["preferred"], "no DDP rank on a worker node"
        after = after_kill(kill) if after_kill else None
        status = wait_job(client, job, timeout=timeout)
    ended = time.monotonic()
    return {
        "config": config,
        "output_dir": output_dir,
        "ray_dir": ray_dir,
        "status": status,
        "log": client.get_job_logs(job),
        "registered_at_kill": registered,
        "kill": kill,
        "recovered_s": ended - kill["at"],  # until the job ended, succeeded or failed
        "after": after,
    }


@pytest.fixture(scope="module")
def trained(ray_cluster, job_env, fault_config) -> dict[str, Any]:
    """train_vqvae as a job; once a checkpoint is registered, a worker node with a DDP rank is
    killed. Head and the other worker node are left: room for both ranks."""
    return _kill_a_rank_node_mid_training(
        ray_cluster, job_env, fault_config("node-kill"), timeout=600
    )


def _assert_ended_at_the_last_step_from_resumed_state(
    output_dir: str, ray_dir: str, registered_at_kill: list[int], tracking_uri: str
) -> dict[str, Any]:
    """What storage and MLflow hold after a run that lost a node: it finished at exactly the
    configured step, and it resumed (model and optimizer) from a checkpoint registered no earlier
    than the kill. Returns the checkpoint steps, Adam's step counts and the resume steps."""
    m = manifest(output_dir, "train_vqvae")
    assert m is not None and m.steps == STEPS
    steps = _checkpoint_steps(ray_dir)
    assert steps[-1] == STEPS and all(s % EVERY == 0 for s in steps), steps
    final = [f for f in storage.list_files(ray_dir) if f"step-{STEPS:08d}/{OPTIMIZER_FILE}" in f]
    assert len(final) == 1, final
    state = torch.load(io.BytesIO(storage.read_bytes(final[0])), weights_only=True)["state"]
    adam_steps = {int(s["step"]) for s in state.values()}
    # Adam counted every step since the start: its state came back from the checkpoint, it was
    # not re-created after the restart (that would count only the steps since the resume).
    assert state, final
    assert adam_steps == {STEPS}, adam_steps

    history = MlflowClient(tracking_uri=tracking_uri).get_metric_history(
        m.mlflow_run_id, "resumed_at_step"
    )
    resumed = [int(h.value) for h in history]
    # The kill landed mid-run: the run restarted from a checkpoint short of the last step.
    assert resumed and all(0 < r < STEPS and r % EVERY == 0 for r in resumed), resumed
    assert resumed[0] >= max(registered_at_kill), resumed
    return {"steps": steps, "adam_steps": sorted(adam_steps), "resumed": resumed}


def test_worker_node_killed_mid_training_without_a_replacement(trained, mlflow_server):
    assert trained["status"] == "SUCCEEDED", trained["log"][-6000:]
    found = _assert_ended_at_the_last_step_from_resumed_state(
        trained["output_dir"], trained["ray_dir"], trained["registered_at_kill"], mlflow_server.url
    )
    kill = trained["kill"]
    print(
        f"\nkilled {kill['name']} ({len(kill['pids'])} processes) with checkpoints "
        f"{trained['registered_at_kill']}; resumed at {found['resumed']}; job succeeded "
        f"{trained['recovered_s']:.0f} s after the kill; checkpoints in storage "
        f"{found['steps']}, Adam steps {found['adam_steps']}"
    )


def _tar_keys(uri: str) -> list[str]:
    """The sample keys of a shard, read from the tar itself (one ``.cls`` member per sample)."""
    with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri))) as tar:
        names = [member.name for member in tar.getmembers()]
    return [name[: -len(".cls")] for name in names if name.endswith(".cls")]


def test_worker_node_killed_mid_tokenize(trained, ray_cluster, job_env):
    assert trained["status"] == "SUCCEEDED", "tokenize needs the autoencoder trained above"
    config, output_dir = trained["config"], trained["output_dir"]
    stage_dir = storage.join(output_dir, "tokenize")
    ray_cluster.add_worker("n1")
    ray_cluster.wait_for_nodes(3)
    client, job = submit(ray_cluster, job_env, config, module="jobs.stage tokenize")
    with _stopped_on_failure(client, job):
        deadline = time.monotonic() + 300
        while not [f for f in storage.list_files(stage_dir) if f.endswith(".tar")]:
            assert not client.get_job_status(job).is_terminal(), client.get_job_logs(job)[-5000:]
            assert time.monotonic() < deadline, "no shard written after 300 s"
            time.sleep(0.2)
        shards_at_kill = len([f for f in storage.list_files(stage_dir) if f.endswith(".tar")])
        kill = _kill_worker_node(ray_cluster, among=_actor_nodes(ray_cluster, "MapWorker"))
        statuses = [wait_job(client, job, timeout=600)]
    logs = client.get_job_logs(job)
    if statuses[0] != "SUCCEEDED":  # the lost node failed the job: submit it again
        client, job = submit(ray_cluster, job_env, config, module="jobs.stage tokenize")
        statuses.append(wait_job(client, job, timeout=600))
        logs += client.get_job_logs(job)
    recovered = time.monotonic() - kill["at"]
    assert statuses[-1] == "SUCCEEDED", logs[-6000:]

    m = manifest(output_dir, "tokenize")
    corpus_keys = {f"{c}/{i:05d}" for c in CLASSES for i in range(PER_CLASS)}
    assert m.samples == len(corpus_keys) and m.bad_inputs.count == 0, m.summary()
    # Read back from the tars: every image exactly once, none counted twice.
    keys_by_shard = {s.uri: _tar_keys(s.uri) for s in m.shards}
    keys = [k for shard_keys in keys_by_shard.values() for k in shard_keys]
    assert sorted(keys) == sorted(corpus_keys)
    assert sum(s.samples for s in m.shards) == len(keys)
    for shard in m.shards:
        assert shard.samples == len(keys_by_shard[shard.uri]), shard.name
        index = read_key_index(shard.uri).column("key").to_pylist()
        assert sorted(index) == sorted(keys_by_shard[shard.uri]), shard.name
    # No partial shard visible, nothing in the directory beside what the manifest lists.
    files = storage.list_files(stage_dir)
    assert not [f for f in files if f.endswith(storage.TMP_SUFFIX)], files
    assert sorted(f for f in files if f.endswith(".tar")) == sorted(keys_by_shard)
    indexes = sorted(f for f in files if f.endswith(KEY_INDEX_SUFFIX))
    assert len(indexes) == len(m.shards), indexes
    print(
        f"\nkilled {kill['name']} ({len(kill['pids'])} processes, encoder actor on it: "
        f"{kill['preferred']}) with {shards_at_kill} shard(s) written; jobs {statuses}; done "
        f"{recovered:.0f} s after the kill; {len(m.shards)} shards, {len(keys)} keys"
    )


def test_worker_node_killed_mid_training_with_a_replacement(
    ray_cluster, job_env, fault_config, mlflow_server
):
    # Head and one worker node: one rank on each. Once the worker node is killed, the head alone
    # has room for one rank only, so the restarted run needs the replacement node.
    ray_cluster.wait_for_nodes(2)

    def replace(kill: dict[str, Any]) -> tuple[Any, str, float]:
        """Start node r1 at once; its node id and how long after the kill it joined."""
        replacement = ray_cluster.add_worker("r1")
        new_node = wait_until(
            lambda: next(
                (
                    n["node_id"]
                    for n in ray_cluster.alive_nodes()
                    if "node_r1" in n["resources_total"]
                ),
                None,
            ),
            REPLACEMENT_WAIT,
            "the replacement node to join",
            replacement,
        )
        return replacement, new_node, time.monotonic() - kill["at"]

    run = _kill_a_rank_node_mid_training(
        ray_cluster,
        job_env,
        fault_config("node-replaced", resource_wait=REPLACEMENT_WAIT),
        timeout=600,
        after_kill=replace,
    )
    assert run["status"] == "SUCCEEDED", run["log"][-6000:]
    replacement, new_node, joined_s = run["after"]
    kill, registered = run["kill"], run["registered_at_kill"]

    # The replacement took part: a training worker of this run ran on it (no other run trained
    # since it joined). Without it the run could not have placed its two ranks.
    assert new_node in _actor_nodes(ray_cluster, "RayTrainWorker", alive_only=False)
    found = _assert_ended_at_the_last_step_from_resumed_state(
        run["output_dir"], run["ray_dir"], registered, mlflow_server.url
    )
    print(
        f"\nkilled {kill['name']} ({len(kill['pids'])} processes) with checkpoints {registered}; "
        f"{replacement.name} joined {joined_s:.0f} s after the kill; resumed at "
        f"{found['resumed']}; job succeeded {run['recovered_s']:.0f} s after the kill; checkpoints in "
        f"storage {found['steps']}, Adam steps {found['adam_steps']}"
    )


def test_no_room_left_after_a_lost_node_fails_within_the_wait(ray_cluster, job_env, fault_config):
    # Head and one worker node (the replacement above) are left: room for the two ranks, one on
    # each, until the kill.
    ray_cluster.wait_for_nodes(2)
    run = _kill_a_rank_node_mid_training(
        ray_cluster, job_env, fault_config("no-room", steps=100_000), timeout=300
    )
    status, log, kill, failed_after = run["status"], run["log"], run["kill"], run["recovered_s"]
    output_dir, ray_dir, registered = run["output_dir"], run["ray_dir"], run["registered_at_kill"]

    assert status == "FAILED", log[-6000:]
    assert "vqpipe: error: train_vqvae: the Ray cluster could not place 2 training worker(s)" in log
    assert "of 1 CPU each (2 CPU in all) within ray.resource_wait_seconds=10" in log
    assert "it has 1 CPU on 1 alive node(s)" in log
    # It waited the configured time for room, and not much longer.
    assert WAIT <= failed_after < WAIT + 120, failed_after
    # What was written stays: the last registered checkpoint (where a new run of the stage
    # resumes) is complete and loadable; no manifest claims the stage finished.
    assert manifest(output_dir, "train_vqvae") is None
    last = max(_registered_steps(ray_dir))
    assert last >= max(registered)
    models = [f for f in storage.list_files(ray_dir) if f"step-{last:08d}/model.pt" in f]
    assert len(models) == 1, models
    _, extra = load_checkpoint(storage.read_bytes(models[0]))
    assert extra["step"] == last
    steps = _checkpoint_steps(ray_dir)
    print(
        f"\nkilled {kill['name']} with checkpoints {registered}; job failed {failed_after:.0f} s "
        f"later; checkpoints in storage {steps}"
    )
