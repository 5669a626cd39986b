"""Device simulator: thousands of phones playing the public gateway protocol."""

from edge.simulator.fleet import SimulationConfig
from edge.simulator.profiles import DeviceProfile, make_profiles, simulated_device_id
from edge.simulator.runner import run_simulation, training_pool
from edge.simulator.summary import SimulationSummary, print_summary
from edge.simulator.trace import StepEvent, Tracer

__all__ = [
    "DeviceProfile",
    "SimulationConfig",
    "SimulationSummary",
    "StepEvent",
    "Tracer",
    "make_profiles",
    "print_summary",
    "run_simulation",
    "simulated_device_id",
    "training_pool",
]
