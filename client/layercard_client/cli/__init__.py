"""The ``layercard`` command: ``main`` parses the command line, opens a client, runs the subcommand.

``main(argv)`` returns the exit code instead of exiting, so tests call it in-process; the console script
(``layercard = layercard_client.cli:main``) hands the code to ``sys.exit``. Exit codes: ``exit_codes``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from layercard_client.channel import ClientSettings
from layercard_client.cli.commands import COMMANDS, UsageProblem
from layercard_client.cli.exit_codes import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_USAGE, exit_code_for
from layercard_client.cli.parser import build_parser
from layercard_client.cli.render import Output
from layercard_client.client import LayercardClient
from layercard_client.errors import ClientConfigError, LayercardClientError

__all__ = ["main"]


def _settings(args) -> ClientSettings:
    timeout = args.timeout  # when given, it bounds streams too: the user asked for a limit
    return ClientSettings(
        address=args.address,
        token=args.token or None,
        tls=args.tls,
        ca_file=Path(args.ca_file) if args.ca_file else None,
        client_cert_file=Path(args.client_cert) if args.client_cert else None,
        client_key_file=Path(args.client_key) if args.client_key else None,
        timeout=timeout if timeout is not None else ClientSettings.timeout,
        stream_timeout=timeout,
    )


def _quiet_broken_pipe() -> None:
    """After ``layercard ... | head`` closed the pipe: send further output to /dev/null, not a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass  # stdout is not a real file (e.g. under pytest); nothing left to protect


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): return the code, do not exit the caller
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    out = Output(as_json=args.json)
    try:
        settings = _settings(args)
        with LayercardClient(settings=settings) as client:
            return COMMANDS[args.command](client, args, out)
    except LayercardClientError as exc:
        out.error(exc)
        return exit_code_for(exc)
    except (ClientConfigError, UsageProblem, ValueError) as exc:
        # ValueError: a field or enum value the request builders rejected, before anything was sent.
        out.problem(str(exc))
        return EXIT_USAGE
    except KeyboardInterrupt:
        out.problem("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _quiet_broken_pipe()
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
