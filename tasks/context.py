"""What every Canopy task needs: the run's parameters, where S3 is, who is running.

A ``RunContext`` is built once by the flow from validated parameters and the
environment's settings, then handed to each task; tasks never read global config.
The S3 client is cached per process and per settings, since building a boto3
client costs more than most of the requests it makes.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prefect.runtime import flow_run

from infra.recent_writes import RecentWrites
from infra.settings import GatewaySettings, S3Settings
from infra.store import S3ObjectStore
from tasks.params import TrainingParams
from tasks.run_cache import current_cache

if TYPE_CHECKING:  # the registry imports every built-in job's model, torch included
    from edge.jobs import JobSpec
    from edge.jobs.registry import JobSource


@dataclass(frozen=True)
class RunContext:
    """Immutable per-run context passed to every task."""

    params: TrainingParams
    s3: S3Settings
    gateway: GatewaySettings

    @property
    def job(self) -> str:
        """The job's declared name: what S3 keys, gateways and reports use.

        ``params.job`` is what the user gave (a built-in name, ``module:ATTR`` or
        ``path/to/file.py:ATTR``); it is resolved once per run and never used as a key.
        """
        return self.job_spec().name

    @property
    def run_id(self) -> str:
        return self.params.run_id

    def job_spec(self) -> JobSpec:
        """The job's spec, resolved from its reference once per run."""
        # Imported here, not at the top: a process that never resolves a job (an edge
        # worker's leaf run) then starts without torch (docs/orchestration.md).
        from edge.jobs import get_job

        ref = self.params.job
        return current_cache().job(ref, lambda: get_job(ref))

    def job_source(self) -> JobSource:
        """Where the job's code lives (file and sha256), for lineage records."""
        from edge.jobs.registry import job_source

        return job_source(self.params.job, self.job_spec())


@functools.lru_cache(maxsize=16)
def _store(settings_json: str) -> S3ObjectStore:
    # Reads of what this process just wrote (partials, models) are served from memory
    # when their sha256 matches (infra.recent_writes): no GET between a round's steps.
    return S3ObjectStore(S3Settings.model_validate_json(settings_json), recent=RecentWrites())


def store_for(settings: S3Settings) -> S3ObjectStore:
    """A cached S3 store for these settings (the secret is part of the cache key)."""
    payload = settings.model_dump(mode="json")
    if settings.secret_access_key is not None:
        payload["secret_access_key"] = settings.secret_access_key.get_secret_value()
    return _store(json.dumps(payload, sort_keys=True))


def current_flow_run_id() -> str | None:
    """The Prefect flow run making an artifact, for its lineage record."""
    run_id = flow_run.get_id()
    return str(run_id) if run_id else None
