"""The S3 key layout, as pure functions: the one place that says where an object lives.

Every object of a training run lives under ``{job}/{run}/``::

    {job}/{run}/commit.json                              last committed round (the only pointer)
    {job}/{run}/round-{r:05d}/global.safetensors         global model devices train in round r
    {job}/{run}/round-{r:05d}/global.pte                 its ExecuTorch training program
    {job}/{run}/program-template-b{B}.pte(.layout.json)  exported once; rounds patch weights
    {job}/{run}/round-{r:05d}/server-state.safetensors   strategy state (momentum, Adam moments)
    {job}/{run}/round-{r:05d}/evaluation.json            held-out metrics of round r's global model
    {job}/{run}/round-{r:05d}/tasks/{leaf}.json          task manifest of one leaf node
    {job}/{run}/round-{r:05d}/updates/{leaf}/{batch}.safetensors
                                                         group-committed device updates
    {job}/{run}/round-{r:05d}/partials/{node}.safetensors  summed partial aggregate of a node
    {job}/{run}/round-{r:05d}/leaves/{leaf}.json         a leaf's outcome, from an edge worker
    {job}/{run}/round-{r:05d}/report.json                round metrics and outcome
    {job}/{run}/round-{r:05d}/device-evaluation/tasks/{leaf}.json
                                                         evaluation task of one leaf (federated
                                                         evaluation of round r's new global model)
    {job}/{run}/round-{r:05d}/device-evaluation/results/{leaf}/{batch}.safetensors
                                                         group-committed evaluation results
    {job}/{run}/round-{r:05d}/device-evaluation/metrics.json
                                                         their sums and means

Outside any run::

    control/active/{job}.json                            which run/round gateways serve for a job
    devices/{job}/{device_id}.json                       a device enrolled for a job (registry)
    devices/{job}/index/{writer}-{seq:06d}-n{count}.json  ids a gateway enrolled (registry index)
    _lineage/{key}.json                                  lineage record of the object at {key}

Round numbers in keys have five digits (``round-00007``); Prefect's flow-run
names and artifact keys use four (``round-0007``), which are not S3 keys.
Round 0's ``global.safetensors`` is the initial model. Finishing round r writes
``round-{r+1:05d}/global.safetensors`` and then, last, ``commit.json``: readers
follow the pointer, so nobody ever sees half a round (single-object PUTs are
atomic in S3).
"""

from __future__ import annotations

import re

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

LINEAGE_PREFIX = "_lineage/"
DEVICES_PREFIX = "devices/"


def check_segment(value: str, what: str) -> str:
    """Refuse key segments that could escape their prefix or break URLs."""
    if not _SEGMENT.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not a valid key segment: use letters, digits, '.', '_' or '-' "
            "(at most 128 characters, starting with a letter or digit)"
        )
    return value


def run_prefix(job: str, run: str) -> str:
    return f"{check_segment(job, 'job')}/{check_segment(run, 'run id')}/"


def round_prefix(job: str, run: str, rnd: int) -> str:
    if rnd < 0:
        raise ValueError(f"round must be >= 0, got {rnd}")
    return f"{run_prefix(job, run)}round-{rnd:05d}/"


def commit_key(job: str, run: str) -> str:
    return f"{run_prefix(job, run)}commit.json"


def global_model_key(job: str, run: str, rnd: int) -> str:
    return f"{round_prefix(job, run, rnd)}global.safetensors"


def program_key(job: str, run: str, rnd: int) -> str:
    return f"{round_prefix(job, run, rnd)}global.pte"


def program_template_key(job: str, run: str, batch_size: int) -> str:
    """The run's parity-verified ExecuTorch program, exported once; rounds patch its weights."""
    return f"{run_prefix(job, run)}program-template-b{batch_size}.pte"


def program_layout_key(job: str, run: str, batch_size: int) -> str:
    """Where each parameter's bytes sit in the program template (JSON)."""
    return f"{program_template_key(job, run, batch_size)}.layout.json"


def server_state_key(job: str, run: str, rnd: int) -> str:
    return f"{round_prefix(job, run, rnd)}server-state.safetensors"


def evaluation_key(job: str, run: str, rnd: int) -> str:
    """Held-out metrics of the global model devices train in round ``rnd``."""
    return f"{round_prefix(job, run, rnd)}evaluation.json"


def task_manifest_key(job: str, run: str, rnd: int, leaf: str) -> str:
    return f"{round_prefix(job, run, rnd)}tasks/{check_segment(leaf, 'leaf')}.json"


def updates_prefix(job: str, run: str, rnd: int, leaf: str) -> str:
    return f"{round_prefix(job, run, rnd)}updates/{check_segment(leaf, 'leaf')}/"


def update_batch_key(job: str, run: str, rnd: int, leaf: str, batch: str) -> str:
    return f"{updates_prefix(job, run, rnd, leaf)}{check_segment(batch, 'batch')}.safetensors"


_BATCH_COUNT = re.compile(r"-n(\d{1,9})\.safetensors$")


def batch_name(gateway_id: str, millis: int, seq: int, count: int) -> str:
    """A batch id that carries its update count, so a LIST alone tells how many reports landed.

    The round's close watcher counts reports across every leaf from key names
    (no GET per batch); readers still take the count from the batch itself.
    """
    if count < 1:
        raise ValueError(f"a batch holds at least one update, got {count}")
    return f"{gateway_id}-{millis}-{seq:06d}-n{count}"


def batch_update_count(key: str) -> int:
    """Updates in the batch at ``key`` according to its name (1 for a name without a count)."""
    found = _BATCH_COUNT.search(key)
    return int(found.group(1)) if found else 1


def device_evaluation_prefix(job: str, run: str, rnd: int) -> str:
    """Everything of round ``rnd``'s federated evaluation (of the model the round made)."""
    return f"{round_prefix(job, run, rnd)}device-evaluation/"


def evaluation_task_key(job: str, run: str, rnd: int, leaf: str) -> str:
    return f"{device_evaluation_prefix(job, run, rnd)}tasks/{check_segment(leaf, 'leaf')}.json"


def evaluation_results_prefix(job: str, run: str, rnd: int, leaf: str) -> str:
    return f"{device_evaluation_prefix(job, run, rnd)}results/{check_segment(leaf, 'leaf')}/"


def evaluation_batch_key(job: str, run: str, rnd: int, leaf: str, batch: str) -> str:
    return (
        f"{evaluation_results_prefix(job, run, rnd, leaf)}"
        f"{check_segment(batch, 'batch')}.safetensors"
    )


def device_evaluation_key(job: str, run: str, rnd: int) -> str:
    """The summed device metrics of round ``rnd``'s federated evaluation."""
    return f"{device_evaluation_prefix(job, run, rnd)}metrics.json"


def partial_key(job: str, run: str, rnd: int, node: str) -> str:
    return f"{round_prefix(job, run, rnd)}partials/{check_segment(node, 'node')}.safetensors"


def leaf_outcome_key(job: str, run: str, rnd: int, leaf: str) -> str:
    """What a leaf collected, as the ``edge-leaf`` flow on an edge worker stores it (JSON):
    how the round reads a leaf that ran on the edge pool (Prefect results are no store)."""
    return f"{round_prefix(job, run, rnd)}leaves/{check_segment(leaf, 'leaf')}.json"


def round_report_key(job: str, run: str, rnd: int) -> str:
    return f"{round_prefix(job, run, rnd)}report.json"


def active_job_key(job: str) -> str:
    return f"control/active/{check_segment(job, 'job')}.json"


def registry_prefix(job: str) -> str:
    """Prefix under which the devices enrolled for ``job`` are registered."""
    return f"{DEVICES_PREFIX}{check_segment(job, 'job')}/"


def device_key(job: str, device_id: str) -> str:
    """A device's registry record for ``job``: ``devices/{job}/{device_id}.json``.

    Per job, so the flow of one job samples only devices that enrolled for it,
    and the device id is the key's last segment (listing is enough to sample).
    """
    return f"{registry_prefix(job)}{check_segment(device_id, 'device id')}.json"


def registry_index_prefix(job: str) -> str:
    """Prefix of the job's registry index shards (``edge.registry_index``).

    Inside the registry prefix, so a registry is one folder; device ids are key
    segments (no ``/``), so no device record can ever sit under it.
    """
    return f"{registry_prefix(job)}index/"


def registry_shard_key(job: str, writer: str, seq: int, count: int) -> str:
    """One index shard: ``count`` ids the gateway process ``writer`` enrolled, its ``seq``-th."""
    if seq < 0 or count < 1:
        raise ValueError(f"a shard has seq >= 0 and at least one id, got seq={seq} count={count}")
    return f"{registry_index_prefix(job)}{check_segment(writer, 'writer')}-{seq:06d}-n{count}.json"


def lineage_key(object_key: str) -> str:
    """Where the lineage record of the object at ``object_key`` lives."""
    return f"{LINEAGE_PREFIX}{object_key}.json"


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into (bucket, key), with a clear error otherwise."""
    if not uri.startswith("s3://"):
        raise ValueError(f"expected an s3://BUCKET/KEY URI, got {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ValueError(f"expected an s3://BUCKET/KEY URI with both parts, got {uri!r}")
    return bucket, key
