"""A leaf's outcome as collect-leaf reports it, its partial stored: for round-0 check tests."""

from __future__ import annotations

import numpy as np

from aggregation.collector import LeafCollector
from aggregation.tensors import TensorSpec
from infra import keys
from infra.store import ObjectStore
from tasks.results import LeafOutcome


def stored_leaf(
    store: ObjectStore,
    leaf: str,
    norms: list[float],
    *,
    job: str = "hello-mobile",
    run_id: str = "default",
    axis: int = 0,
) -> LeafOutcome:
    """Round 0 of ``leaf``: one device a norm, each update ``norm`` along ``axis`` of a 3-vector.

    The collector's warm-up clips (or not) as collect-leaf's would; the partial
    goes to the leaf's key in ``store`` and the outcome carries its norm summary.
    """
    spec = {"w": TensorSpec((3,), "float32")}
    devices = [f"{leaf}-d{i}" for i in range(len(norms))]
    collector = LeafCollector(
        spec=spec, task_id="t", model_version="v", selected=frozenset(devices)
    )
    for device, norm in zip(devices, norms, strict=True):
        update = np.zeros(3, np.float32)
        update[axis] = norm
        collector.offer(
            device_id=device,
            task_id="t",
            model_version="v",
            num_samples=10,
            tensors={"w": update},
            metrics={},
        )
    partial = collector.result()
    summary = collector.norm_summary(partial)
    key = keys.partial_key(job, run_id, 0, leaf)
    return LeafOutcome(
        leaf=leaf,
        partial=store.put_bytes(key, partial.to_bytes(), kind="partial"),
        reported=len(norms),
        rejected={},
        rejection_examples={},
        clipped=dict(collector.clipped),
        norm_bound=collector.norm_bound,
        norms=summary.norms.to_json(),
        warmup_reference=summary.reference,
        largest_norm=summary.largest,
        duplicates=0,
        batches=1,
        bytes_in=100,
        finished_at=1000.0,
    )
