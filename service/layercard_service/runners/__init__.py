"""How a tuning job gets a process: local worker processes or Kubernetes Jobs, and what they report back.

``local.py`` holds the ``JobRunner`` interface and the local runner; ``kubernetes/`` the batch/v1 runner, its
manifests, API client and settings; ``worker_reports.py`` the service side of the workers' internal API (their
credentials, reports and the adapter's publication). No torch: the control plane imports this.
"""
