"""The Kubernetes runner: one batch/v1 Job (and credential Secret) per tuning job attempt."""
