"""Edge gateway workers: stateless HTTP front doors between devices and S3."""

from edge.gateway.app import create_app
from edge.gateway.tuning import GatewayTuning

__all__ = ["GatewayTuning", "create_app"]
