"""One way to write an output: the object, then its lineage record beside it.

Every model, program, partial, evaluation and update batch Canopy writes goes
through ``put_with_lineage`` (or, where the record must wait until after an
acknowledgement, through its second half ``record_lineage``), so no writer can
forget the record, spell it differently or write it before the object exists.
Observers (the Prefect asset events of ``tasks.ui``) hear each record after it
is stored: S3 stays the source of truth, the UI a view of it.

A caller on a round's critical path may pass ``later``: the record is then
written by whoever ``later`` hands it to (``tasks.deferred``: a thread of the
flow's), still only after the objects were stored, and the caller returns as
soon as they are. The round waits for its records before it commits, so a
committed round never lacks one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel

from infra.lineage import ArtifactRef, LineageKind, LineageRecord, make_record, write_lineage
from infra.store import ObjectRef, ObjectStore

LineageObserver = Callable[[LineageRecord], None]
# Takes the writing of a lineage record, to run it after the caller has returned.
Later = Callable[[Callable[[], LineageRecord]], None]


@dataclass(frozen=True)
class Output:
    """Bytes to store at ``key``, with the store's ``kind`` and caller metadata."""

    key: str
    data: bytes
    kind: str
    metadata: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, key: str, payload: Mapping[str, Any] | BaseModel, *, kind: str) -> Output:
        """JSON encoded as ``infra.store.put_json`` does (equal content, equal hash)."""
        body = payload.model_dump(mode="json") if isinstance(payload, BaseModel) else payload
        data = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return cls(key=key, data=data, kind=kind, metadata={"content-type": "application-json"})


@dataclass(frozen=True)
class Provenance:
    """What produced an output: the lineage record minus the outputs themselves."""

    kind: LineageKind
    inputs: Sequence[ObjectRef | ArtifactRef]
    parameters: Mapping[str, Any]
    started_at: datetime
    flow_run_id: str | None = None


def record_lineage(
    store: ObjectStore,
    outputs: Sequence[ObjectRef],
    provenance: Provenance,
    *,
    observers: Sequence[LineageObserver] = (),
) -> LineageRecord:
    """Write the lineage record of outputs that are already stored; tell the observers."""
    record = make_record(
        kind=provenance.kind,
        inputs=list(provenance.inputs),
        outputs=list(outputs),
        parameters=provenance.parameters,
        started_at=provenance.started_at,
        flow_run_id=provenance.flow_run_id,
    )
    write_lineage(store, record)
    for observe in observers:
        observe(record)
    return record


def put_all_with_lineage(
    store: ObjectStore,
    outputs: Sequence[Output],
    provenance: Provenance,
    *,
    observers: Sequence[LineageObserver] = (),
    later: Later | None = None,
) -> list[ObjectRef]:
    """Store outputs made by one step (a model and its strategy state), side by side; then
    one record for all, here or (``later``) after the caller has its references."""
    if not outputs:
        raise ValueError("put_all_with_lineage needs at least one output")

    def put(o: Output) -> ObjectRef:
        return store.put_bytes(o.key, o.data, kind=o.kind, metadata=dict(o.metadata) or None)

    if len(outputs) == 1:
        refs = [put(outputs[0])]
    else:
        with ThreadPoolExecutor(max_workers=len(outputs)) as pool:
            refs = list(pool.map(put, outputs))

    def record() -> LineageRecord:
        return record_lineage(store, refs, provenance, observers=observers)

    if later is None:
        record()
    else:
        later(record)
    return refs


def put_with_lineage(
    store: ObjectStore,
    output: Output,
    provenance: Provenance,
    *,
    observers: Sequence[LineageObserver] = (),
    later: Later | None = None,
) -> ObjectRef:
    """Store one output, then its lineage record beside it (``later``: see the module)."""
    return put_all_with_lineage(store, [output], provenance, observers=observers, later=later)[0]
