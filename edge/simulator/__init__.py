"""Device simulator: thousands of phones playing the public gateway protocol."""

from edge.simulator.profiles import DeviceProfile, make_profiles, simulated_device_id
from edge.simulator.runner import (
    SimulationConfig,
    SimulationSummary,
    print_summary,
    run_simulation,
)

__all__ = [
    "DeviceProfile",
    "SimulationConfig",
    "SimulationSummary",
    "make_profiles",
    "print_summary",
    "run_simulation",
    "simulated_device_id",
]
