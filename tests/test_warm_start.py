"""The runner's warm flow-run processes (flows.warm_start): how the flow travels to the child.

The end-to-end path (a deployment run through `canopy up`'s runner) is
tests/test_stack.py; these pin the two pieces that make it work.
"""

from __future__ import annotations

import multiprocessing
import pickle
from collections.abc import Iterator
from multiprocessing.context import BaseContext

import cloudpickle
import prefect.flow_engine
import pytest
from prefect import flow

import flows.warm_start as warm_start
from flows.federated import federated_training


@pytest.fixture
def warm() -> Iterator[BaseContext]:
    """use_warm_processes for one test, then Prefect's own multiprocessing again."""
    before = prefect.flow_engine.multiprocessing
    ctx = warm_start.use_warm_processes(["json"])
    yield ctx
    prefect.flow_engine.multiprocessing = before  # type: ignore[assignment]


def test_flow_runs_start_from_the_fork_server(warm: BaseContext) -> None:
    assert warm_start.uses_warm_processes()
    # what run_flow_in_subprocess asks for ("spawn") is the preloading fork server
    ctx = prefect.flow_engine.multiprocessing.get_context("spawn")
    assert ctx.get_start_method() == "forkserver"
    # everything else still is the multiprocessing module
    assert prefect.flow_engine.multiprocessing.cpu_count() == multiprocessing.cpu_count()
    # the readiness probe: a child forked by the (started, preloaded) server comes and goes
    assert 0.0 <= warm_start.wait_until_warm(warm) < 60.0


def test_a_module_level_flow_travels_by_reference(warm: BaseContext) -> None:
    payload = cloudpickle.dumps(federated_training)
    # a name, not the function's code: the child takes the flow its fork server imported,
    # with the module's globals, so its postponed annotations (TreeShape) resolve
    assert len(payload) < 200
    assert pickle.loads(payload) is federated_training


def test_a_flow_defined_elsewhere_still_travels_by_value(warm: BaseContext) -> None:
    @flow(name="local-flow")
    def local_flow(x: int) -> int:
        return x + 1

    copy = pickle.loads(cloudpickle.dumps(local_flow))
    assert copy is not local_flow
    assert copy.name == "local-flow" and copy.fn(1) == 2
