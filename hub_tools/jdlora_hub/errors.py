"""Exceptions of the command line tools, each with the exit code the CLI returns for it.

Every user-facing failure is one of these, so the CLI can print a one-line reason and exit with a code that scripts
can branch on, instead of a traceback.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """Exit codes of `jdlora` and `jdlora-convert` (documented in docs/cli.md)."""

    OK = 0
    INTERNAL = 1  # a bug: please report it (run with JDLORA_DEBUG=1 for the traceback)
    USAGE = 2  # bad command line (argparse uses 2 as well)
    INPUT = 3  # a source or bundle cannot be found, read or used (nothing was written)
    OUTPUT_EXISTS = 4  # the output folder exists and --overwrite was not given
    VERIFICATION = 5  # the bundle failed verification (error above --max-error, ...); nothing was written or pushed
    HUB = 6  # the Hub refused or failed a request (download, push); nothing was changed on the Hub
    TRAINING = 7  # `jdlora train` stopped on a NaN or infinite loss; nothing was written


class JDLoraHubError(Exception):
    """Base class: a failure with a one-line, user-facing reason."""

    exit_code: ExitCode = ExitCode.INTERNAL


class UsageError(JDLoraHubError):
    """Options that contradict each other or cannot work (e.g. --push while offline)."""

    exit_code = ExitCode.USAGE


class SourceError(JDLoraHubError):
    """A source adapter or bundle cannot be found, read or represented."""

    exit_code = ExitCode.INPUT


class OutputExistsError(JDLoraHubError):
    """The output folder exists already and --overwrite was not given."""

    exit_code = ExitCode.OUTPUT_EXISTS


class VerificationError(JDLoraHubError):
    """The bundle did not pass verification; nothing was written or pushed."""

    exit_code = ExitCode.VERIFICATION


class HubOperationError(JDLoraHubError):
    """A request to the Hub failed."""

    exit_code = ExitCode.HUB
