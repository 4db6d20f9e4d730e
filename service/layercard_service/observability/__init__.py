"""Prometheus: the /metrics endpoint and the ``Telemetry`` implementation that feeds it.

The domain reports through the ``telemetry.Telemetry`` seam and never imports prometheus_client; this package is
the only place besides the gRPC metrics interceptor (api/grpc_metrics.py) that does.
"""
