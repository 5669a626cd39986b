"""Who the simulated devices are: ids, speed, dropout and availability, from a seed.

Everything a device does differently from another is decided here, up front,
by pure functions of ``(seed, device index[, round])``. Decisions that depend
on a round (does device 17 drop out of round 4? is it offline?) are drawn from
a generator keyed by ``(seed, index, round)``, not from a shared stream, so
they do not depend on the order in which asyncio happens to run devices: two
simulations with the same seed drop the same devices in the same rounds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

SpeedClass = Literal["fast", "normal", "slow"]

# Compute-time multipliers: a slow phone takes several times longer than the
# machine actually needed to train its update (the simulator sleeps the rest).
_SPEED = {"fast": (1.0, 1.0), "normal": (1.2, 2.0), "slow": (3.0, 6.0)}

_DROPOUT_STREAM = 0xD0
_PROFILE_STREAM = 0x5EED


def simulated_device_id(seed: int, index: int) -> str:
    """Stable id of simulated device ``index``: the same across runs with the same seed."""
    return f"sim-{seed}-{index:05d}"


@dataclass(frozen=True)
class DeviceProfile:
    """One simulated phone.

    Attributes
    ----------
    index:
        Position in the fleet; the device trains data partition
        ``index % data_hint.num_devices``.
    device_id:
        ``sim-{seed}-{index:05d}``.
    speed_class, speed:
        ``speed`` >= 1 multiplies the real training time (slow phones sleep the
        difference before uploading).
    dropout:
        Chance of dropping out of a round after downloading the model (no upload).
    offline_period, offline_rounds, offline_phase:
        Availability window: the device is offline in ``offline_rounds`` of every
        ``offline_period`` rounds (0 offline rounds: always available).
    seed:
        The fleet seed, for per-round decisions.
    """

    index: int
    device_id: str
    speed_class: SpeedClass
    speed: float
    dropout: float
    offline_period: int
    offline_rounds: int
    offline_phase: int
    seed: int

    def online(self, rnd: int) -> bool:
        """Whether the device is available in round ``rnd``."""
        if self.offline_rounds == 0:
            return True
        return (rnd + self.offline_phase) % self.offline_period >= self.offline_rounds

    def drops_out(self, rnd: int) -> bool:
        """Whether the device abandons round ``rnd`` mid-way (drawn per device and round)."""
        if self.dropout <= 0.0:
            return False
        draw = np.random.default_rng([self.seed, self.index, rnd, _DROPOUT_STREAM]).random()
        return bool(draw < self.dropout)


def make_profiles(
    seed: int,
    count: int,
    *,
    dropout: float = 0.05,
    slow_fraction: float = 0.2,
    offline_fraction: float = 0.1,
) -> list[DeviceProfile]:
    """The fleet: ``count`` profiles, identical for identical arguments.

    ``dropout`` is the fleet's mean per-round dropout probability (each device
    gets between half and one and a half times it); ``slow_fraction`` of the
    devices are slow, a third of the rest fast; ``offline_fraction`` of the
    devices have an availability window.
    """
    for name, value in (
        ("dropout", dropout),
        ("slow_fraction", slow_fraction),
        ("offline_fraction", offline_fraction),
    ):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    rng = np.random.default_rng([seed, _PROFILE_STREAM])
    profiles = []
    for index in range(count):
        u_speed, u_speed_mult, u_drop, u_off, u_period, u_len, u_phase = rng.random(7)
        if u_speed < slow_fraction:
            speed_class: SpeedClass = "slow"
        elif u_speed < slow_fraction + (1 - slow_fraction) / 3:
            speed_class = "fast"
        else:
            speed_class = "normal"
        low, high = _SPEED[speed_class]
        period = 0
        rounds_off = 0
        phase = 0
        if u_off < offline_fraction:
            period = 3 + int(u_period * 6)  # 3..8 rounds
            rounds_off = 1 + int(u_len * (period // 2))  # at most half of them
            phase = int(u_phase * period)
        profiles.append(
            DeviceProfile(
                index=index,
                device_id=simulated_device_id(seed, index),
                speed_class=speed_class,
                speed=round(low + (high - low) * float(u_speed_mult), 3),
                dropout=min(1.0, dropout * (0.5 + float(u_drop))),
                offline_period=max(period, 1),
                offline_rounds=rounds_off,
                offline_phase=phase,
                seed=seed,
            )
        )
    return profiles
