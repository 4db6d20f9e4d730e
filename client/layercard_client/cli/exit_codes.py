"""Exit codes of the ``layercard`` CLI: one per error class, so scripts can branch without parsing stderr."""

from __future__ import annotations

from layercard_client import errors

__all__ = [
    "EXIT_DEPLOYMENT_FAILED",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_JOB_UNSUCCESSFUL",
    "EXIT_NOT_SERVING",
    "EXIT_OK",
    "EXIT_USAGE",
    "epilog",
    "exit_code_for",
]

EXIT_OK = 0
EXIT_FAILURE = 1  # an unexpected error inside the CLI itself
EXIT_USAGE = 2  # a bad command line or client setting (argparse uses 2 too)
EXIT_NOT_SERVING = 20  # `health`: the server answered, but not SERVING
EXIT_JOB_UNSUCCESSFUL = 21  # `jobs watch`, `demo`: the job ended FAILED or CANCELLED
EXIT_DEPLOYMENT_FAILED = 22  # `demo`: DeployAdapter answered, but with the deployment FAILED
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT

# Codes 3-18: the RPC failed with this status. Kept stable: scripts depend on them.
_BY_ERROR: dict[type[errors.LayercardClientError], int] = {
    errors.InvalidArgument: 3,
    errors.NotFound: 4,
    errors.AlreadyExists: 5,
    errors.FailedPrecondition: 6,
    errors.PermissionDenied: 7,
    errors.Unauthenticated: 8,
    errors.ResourceExhausted: 9,
    errors.Unavailable: 10,
    errors.DeadlineExceeded: 11,
    errors.Unimplemented: 12,
    errors.Internal: 13,
    errors.Cancelled: 14,
    errors.Aborted: 15,
    errors.OutOfRange: 16,
    errors.DataLoss: 17,
    errors.Unknown: 18,
}


def exit_code_for(error: errors.LayercardClientError) -> int:
    for cls in type(error).__mro__:
        if cls in _BY_ERROR:
            return _BY_ERROR[cls]
    return _BY_ERROR[errors.Unknown]


def epilog() -> str:
    """The exit-code table for ``--help``, generated from the mapping so the two cannot disagree."""
    lines = [
        "exit codes:",
        f"  {EXIT_OK:>3}  success",
        f"  {EXIT_FAILURE:>3}  unexpected error in the CLI",
        f"  {EXIT_USAGE:>3}  bad command line or client settings (e.g. unreadable --ca-file)",
    ]
    lines += [f"  {code:>3}  the RPC failed with {cls.code.name}" for cls, code in _BY_ERROR.items()]
    lines += [
        f"  {EXIT_NOT_SERVING:>3}  health: the server or service is not SERVING",
        f"  {EXIT_JOB_UNSUCCESSFUL:>3}  jobs watch / jobs create --watch / demo: the job ended FAILED or CANCELLED",
        f"  {EXIT_DEPLOYMENT_FAILED:>3}  demo: the adapter's deployment ended FAILED",
        f"  {EXIT_INTERRUPTED:>3}  interrupted (Ctrl-C)",
        "",
        "Errors go to stderr with their code, message, reason and field violations (a JSON object with --json).",
        "environment: LAYERCARD_ADDRESS, LAYERCARD_TOKEN, LAYERCARD_CA_FILE stand in for the options.",
    ]
    return "\n".join(lines)
