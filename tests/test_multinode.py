"""Multi-node on one machine: a head (with the Jobs API) and a second raylet from
`ray.cluster_utils.Cluster`, in their own process (apart from the session's `ray_local`).
Jobs go in through `JobSubmissionClient` exactly as on a real cluster; where their actors
and workers ran is read afterwards from Ray's state API (node id of every actor)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from medray import cluster

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, kather_dir) -> Path:
    """The Kather sample tiles imported into a fresh workdir (manifest with splits)."""
    from medray.data.config import DataConfig
    from medray.data.importers import import_folder

    wd = tmp_path_factory.mktemp("multinode") / "wd"
    import_folder(str(kather_dir), DataConfig(workdir=str(wd)))
    return wd


def run_job(
    info: dict, stage: str, overrides: list[str], env: dict[str, str] | None = None
) -> tuple[str, str]:
    """Submit `jobs/<stage>.py` with the shipped runtime env; wait; return (job id, log)."""
    jobs = cluster.client(info["dashboard"])
    entry = cluster.entrypoint(stage, None, overrides, sys.executable)
    runtime_env = cluster.runtime_env(REPO, cluster.SubmitConfig())
    runtime_env["env_vars"].update(env or {})
    submission = jobs.submit_job(entrypoint=entry, runtime_env=runtime_env)
    code = cluster.wait(jobs, submission, timeout_s=600)
    log = jobs.get_job_logs(submission)
    assert code == 0, log[-4000:]
    return jobs.get_job_info(submission).job_id, log


def actor_nodes(info: dict, job_id: str, class_part: str) -> dict[str, str]:
    """{actor id: node id} of the job's actors whose class name contains `class_part`."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=info["dashboard"], filters=[("job_id", "=", job_id)], limit=10_000, detail=True
    )
    return {a.actor_id: a.node_id for a in actors if class_part in (a.class_name or "")}


def test_embed_actors_run_on_both_nodes(two_nodes, workdir):
    pytest.importorskip("medray.embed", reason="embed stage not in this build yet")
    job_id, log = run_job(
        two_nodes,
        "embed",
        [f"workdir={workdir}", "backbone.input_size=32", "batch_size=2", "decode_cpus=0.5",
         "ray.num_workers=2", "ray.cpus_per_worker=1"],
        # Ray Data starts processing once the pool's actors are up, not before: on a short
        # job a slow-loading second actor could otherwise still be starting at the end.
        env={"RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S": "300"},
    )  # fmt: skip
    assert '"stage": "embed"' in log
    nodes = actor_nodes(two_nodes, job_id, "MapWorker")
    assert set(nodes.values()) == set(two_nodes["node_ids"]), nodes
    assert (workdir / "embeddings" / "LATEST").is_file()


def test_pretrain_places_two_workers_on_two_nodes(two_nodes, workdir):
    pytest.importorskip("medray.pretrain", reason="pretrain stage not in this build yet")
    # 1.5 CPUs per worker on 2-CPU nodes: one worker fits per node, so 2 workers need both.
    job_id, log = run_job(
        two_nodes,
        "pretrain",
        [
            f"workdir={workdir}",
            "ray.num_workers=2",
            "ray.cpus_per_worker=1.5",
            "epochs=1",
            "backbone.name=test_resnet",
            "backbone.weights=random",
            "image_size=32",
            "batch_size=4",
            "hidden_dim=64",
            "proj_dim=32",
            "loader_workers=0",
            "knn_max_images=0",
        ],  # fmt: skip
    )
    assert '"stage": "pretrain"' in log
    nodes = actor_nodes(two_nodes, job_id, "TrainWorker")
    assert len(nodes) == 2 and set(nodes.values()) == set(two_nodes["node_ids"]), nodes
