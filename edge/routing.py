"""Which leaf a device belongs to: rendezvous (highest-random-weight) hashing.

Every gateway and the round flow must agree on a device's leaf without talking
to each other, so the answer is a pure function of the device id and the leaf
names. For each leaf we hash ``leaf + NUL + device_id`` with sha256 and pick the
leaf with the largest hash (ties, which need a sha256 collision, go to the
smallest leaf name). Compared with ``hash(device) % n_leaves``:

* it is stable across processes and machines (sha256, not Python's salted
  ``hash()``), and does not depend on the order of ``leaves``;
* adding or removing one leaf only moves the devices that win or lose that
  leaf (about 1/n of them), so a resized tree keeps most devices in place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence


def _weight(leaf: str, device_id: str) -> int:
    digest = hashlib.sha256(f"{leaf}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest, "big")


def leaf_for_device(device_id: str, leaves: Sequence[str]) -> str:
    """The leaf ``device_id`` belongs to among ``leaves`` (order does not matter)."""
    if not leaves:
        raise ValueError("leaf_for_device needs at least one leaf")
    # max() keeps the first of equal weights, so sorting makes ties go to the smallest name.
    return max(sorted(leaves), key=lambda leaf: _weight(leaf, device_id))


def assign_leaves(device_ids: Iterable[str], leaves: Sequence[str]) -> dict[str, list[str]]:
    """Group devices by leaf (every leaf present, possibly empty; input order kept)."""
    groups: dict[str, list[str]] = {leaf: [] for leaf in leaves}
    for device_id in device_ids:
        groups[leaf_for_device(device_id, leaves)].append(device_id)
    return groups
