"""User-facing error types.

Every mistake a user can make (a wrong model name, a layer that does not exist, an empty prompt
file) raises one of these with a message that names the value, what is allowed and the fix. The
CLI prints the message as one red line and exits with code 2; anything else is an internal error
(exit code 1). They subclass ValueError/LookupError so plain Python callers can catch them the
usual way, and they are plain picklable exceptions so they survive crossing Ray processes.
"""

from __future__ import annotations


class NeuronMapError(Exception):
    """Base class of every error caused by user input or the user's environment."""


class ConfigError(NeuronMapError, ValueError):
    """A parameter or configuration value is invalid."""


class UnknownModelError(NeuronMapError, LookupError):
    """The model name is neither a local folder, a registry name, nor reachable on the hub."""


class UnknownLayerError(NeuronMapError, LookupError):
    """A layer spec matched no canonical layer of the model."""


class PromptFileError(NeuronMapError, ValueError):
    """The prompt source is missing, empty, not UTF-8, or lacks the text column."""


class RunExistsError(NeuronMapError, FileExistsError):
    """The output run already exists and is complete; pass overwrite=True / --overwrite."""


class RunFormatError(NeuronMapError, ValueError):
    """A run directory is missing, incomplete or corrupt."""


class StorageError(NeuronMapError, OSError):
    """Writing the run failed (disk full, no permission); nothing half-written was kept."""
