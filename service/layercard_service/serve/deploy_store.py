"""Desired deployments and serving-latency measurements: re-exported from ``persistence/deployments.py``."""

from __future__ import annotations

from layercard_service.persistence.deployments import (
    CALIBRATION_WINDOW,
    DeploymentRecord,
    DeploymentStore,
    LatencyMeasurement,
    ServingCalibration,
    served_name,
)

__all__ = [
    "CALIBRATION_WINDOW",
    "DeploymentRecord",
    "DeploymentStore",
    "LatencyMeasurement",
    "ServingCalibration",
    "served_name",
]
