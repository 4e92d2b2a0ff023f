"""Exceptions the CLI turns into one-line messages and exit codes."""

from __future__ import annotations


class ToolkitError(Exception):
    """A problem the user can fix. The CLI prints ``str(error)`` on one line and exits ``exit_code``."""

    exit_code = 1


class UsageError(ToolkitError):
    """Wrong arguments, missing or unreadable files: exit code 2."""

    exit_code = 2


class InputError(ToolkitError):
    """A file exists but its content is invalid (bad JSON, bad tensors, wrong shapes): exit code 1."""

    exit_code = 1


class PluginError(ToolkitError):
    """A plugin failed to load or registered something invalid (fatal only in strict mode)."""

    exit_code = 1


class PluginValidationError(PluginError):
    """A registered component, fragment or migration does not satisfy the host's contract."""


class ComponentNotFoundError(UsageError):
    """A component name is not registered (or is ambiguous between plugins)."""


class NewerVersionError(InputError):
    """A file was written by a newer toolkit / format / schema version than this one understands."""
