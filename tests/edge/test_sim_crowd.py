"""The large-fleet knobs of the simulator: pool slicing, the JSON config, the start ramp."""

from __future__ import annotations

import asyncio

import pytest

from edge.simulator.client import POOL_SLICE, DeviceClient, GatewayPool
from edge.simulator.crowd import crowd_config
from edge.simulator.fleet import Fleet

URLS = ["http://127.0.0.1:1", "http://127.0.0.1:2"]


def test_a_gateways_connections_are_split_over_small_pools_and_a_device_keeps_its_own() -> None:
    async def main() -> None:
        pool = GatewayPool(URLS, max_connections=3 * POOL_SLICE + 1)
        try:
            clients = {id(pool.client(0, slot)) for slot in range(10)}
            assert len(clients) == 4  # ceil((3 * POOL_SLICE + 1) / POOL_SLICE) for gateway 0
            assert pool.client(0, 1) is pool.client(2, 5)  # index and slot wrap around
            assert pool.client(1, 0) is not pool.client(0, 0)
            device = DeviceClient(
                pool, device_id="d", home=7, job="j", runtimes=["pytorch"], enrolment_secret="s"
            )
            assert (device.gateway % 2, device.slot) == (1, 3)  # home 7: gateway 1, slot 7 // 2
        finally:
            await pool.aclose()

    asyncio.run(main())


def test_the_crowd_config_takes_every_simulation_field_and_refuses_unknown_ones() -> None:
    config = crowd_config(
        {
            "job": "hello-mobile",
            "devices": 5,
            "gateways": URLS,
            "max_connections": 900,
            "ramp_seconds": 2,
        }
    )
    assert (config.max_connections, config.ramp_seconds, config.progress) == (900, 2, False)
    with pytest.raises(ValueError, match="unknown simulation fields \\['max_conections'\\]"):
        crowd_config({"job": "j", "devices": 1, "gateways": URLS, "max_conections": 5})


def test_the_enrolment_gate_keeps_at_most_max_enrolling_in_flight() -> None:
    class SlowEnrol:
        """A device whose enrolment takes a moment; counts how many enrol at once."""

        device_id = "phone"
        inside = 0
        most = 0

        async def enrol(self) -> None:
            SlowEnrol.inside += 1
            SlowEnrol.most = max(SlowEnrol.most, SlowEnrol.inside)
            await asyncio.sleep(0.01)
            SlowEnrol.inside -= 1

    async def main() -> None:
        fleet = Fleet(
            crowd_config({"job": "j", "devices": 40, "gateways": URLS, "max_enrolling": 3}), None
        )  # type: ignore[arg-type]
        await asyncio.gather(*(fleet.enrol(SlowEnrol()) for _ in range(40)))  # type: ignore[arg-type]

    asyncio.run(main())
    assert SlowEnrol.most == 3


def test_with_poll_after_enrolment_no_device_goes_on_before_the_last_has_enrolled() -> None:
    class Instant:
        def __init__(self, device_id: str) -> None:
            self.device_id = device_id

        async def enrol(self) -> None:
            await asyncio.sleep(0)

    order: list[str] = []

    async def main() -> None:
        config = crowd_config(
            {"job": "j", "devices": 3, "gateways": URLS, "poll_after_enrolment": True}
        )
        fleet = Fleet(config, None)  # type: ignore[arg-type]

        async def device(name: str, delay: float) -> None:
            await asyncio.sleep(delay)
            await fleet.enrol(Instant(name))  # type: ignore[arg-type]
            order.append(f"{name} polls")

        await asyncio.gather(device("a", 0), device("b", 0.02), device("c", 0.05))

    asyncio.run(main())
    assert order[0] == "c polls" and sorted(order) == ["a polls", "b polls", "c polls"]
