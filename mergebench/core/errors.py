"""Errors a user can act on.

Every problem caused by the user's input (paths, checkpoints, parameters, configs) is raised as a
:class:`MergebenchError`; the CLI prints its message on one line and exits with code 2. Anything
else is a bug and is reported as an internal error.
"""

from __future__ import annotations


class MergebenchError(Exception):
    """A problem with the user's input, explained in one actionable line."""

    exit_code = 2


class InputError(MergebenchError):
    """A model path, checkpoint file or tensor that cannot be used."""


class ParameterError(MergebenchError):
    """An unknown, mistyped or out-of-range method parameter or option."""


class PluginError(MergebenchError):
    """A plugin that cannot be loaded, or two plugins that clash."""


class OutputError(MergebenchError):
    """An output location that cannot be written safely."""
