"""The edge pool's plumbing without a server: what the runner serves, what workers get.

The end-to-end behaviour (workers, leaf runs, same bytes as in-process) is in
tests/test_edge_pool.py; these are the pure parts it relies on.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from flows.deployments import (
    EDGE_LEAF_ENTRYPOINTS,
    PREFECT_YAML,
    DeploymentSpec,
    load_deployment_specs,
    served_parameters,
)
from flows.edge_leaf import DEPLOYMENT, EDGE_POOL, PICKUP_TIMEOUT_S, leaf_time_limit
from infra import keys
from infra.edge_workers import WORKER_QUERY_SECONDS, worker_command, worker_env, worker_name
from infra.settings import EdgePoolSettings
from tasks.leaf import CLOSE_OVERDUE_S, UNREADABLE_AFTER_CLOSE_S
from tasks.params import TrainingParams

SPEC = DeploymentSpec(
    name="hello", entrypoint="flows/federated.py:federated_training", parameters={"job": "x"}
)


def test_the_runner_serves_the_stacks_leaf_mode_unless_a_deployment_sets_its_own() -> None:
    edge = EdgePoolSettings(leaf_mode="edge-pool")
    own = SPEC.model_copy(update={"parameters": {"job": "x", "leaf_mode": "in-process"}})

    assert served_parameters(SPEC, EdgePoolSettings()) == {"job": "x"}
    assert served_parameters(SPEC, edge) == {"job": "x", "leaf_mode": "edge-pool"}
    assert served_parameters(own, edge)["leaf_mode"] == "in-process"


def test_canopy_up_edge_workers_sets_the_leaf_mode_through_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CANOPY_EDGE_LEAF_MODE", "edge-pool")
    assert served_parameters(SPEC)["leaf_mode"] == "edge-pool"
    monkeypatch.setenv("CANOPY_EDGE_LEAF_MODE", "elsewhere")
    with pytest.raises(ValueError, match="leaf_mode"):
        EdgePoolSettings()


def test_prefect_yaml_deploys_edge_leaf_on_the_edge_pool_and_the_runner_skips_it() -> None:
    raw = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    (edge,) = [d for d in raw if d["entrypoint"] in EDGE_LEAF_ENTRYPOINTS]

    assert f"{'edge-leaf'}/{edge['name']}" == DEPLOYMENT
    assert edge["work_pool"]["name"] == EDGE_POOL
    assert edge["name"] not in {s.name for s in load_deployment_specs()}
    assert len(load_deployment_specs()) == len(raw) - 1


def test_a_worker_gets_the_api_its_fast_poll_and_the_callers_s3_settings() -> None:
    env = worker_env({"CANOPY_S3_ENDPOINT_URL": "http://s3", "PREFECT_API_URL": "old"}, "http://x")

    assert env["PREFECT_API_URL"] == "http://x"
    assert env["CANOPY_S3_ENDPOINT_URL"] == "http://s3"
    assert float(env["PREFECT_WORKER_QUERY_SECONDS"]) == WORKER_QUERY_SECONDS <= 1
    command = worker_command(worker_name(2))
    assert command[1:] == [
        "worker", "start", "--pool", "edge", "--type", "process", "--name", "edge-worker-2"
    ]  # fmt: skip
    help_text = subprocess.run(
        [command[0], "worker", "start", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "--pool" in help_text and "--type" in help_text and "--name" in help_text


def test_a_leaf_run_may_take_the_rounds_deadline_and_the_leafs_own_limits() -> None:
    params = TrainingParams(job="hello-mobile", round_deadline_s=30)
    expected = PICKUP_TIMEOUT_S + 30 + CLOSE_OVERDUE_S + UNREADABLE_AFTER_CLOSE_S
    assert leaf_time_limit(params) == expected


def test_a_leaf_outcome_lives_in_its_round_beside_the_partials() -> None:
    assert (
        keys.leaf_outcome_key("job", "run", 7, "leaf-3") == "job/run/round-00007/leaves/leaf-3.json"
    )
    with pytest.raises(ValueError, match="leaf"):
        keys.leaf_outcome_key("job", "run", 7, "../x")


def test_the_leaf_module_a_worker_imports_pulls_no_torch() -> None:
    code = "import sys, flows.edge_leaf; print('torch' in sys.modules, 'executorch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
