"""Errors a user can act on. The CLI prints their message as one line and exits 1."""


class ExplainkitError(Exception):
    """Base class: the message says what failed and what to do next."""


class DataError(ExplainkitError):
    """A dataset could not be read or is not what it claims to be."""


class RunError(ExplainkitError):
    """A run directory is missing, in use, damaged or of an unknown version."""


class StoreError(RunError):
    """The HDF5 prediction store is missing, damaged or not ours."""


class CheckpointError(RunError):
    """A checkpoint is missing, damaged, unsafe or not an explainkit checkpoint."""


class PluginError(ExplainkitError):
    """A plugin failed to load or registered something invalid."""


class AnalyzerError(ExplainkitError):
    """An analyzer could not run on this run directory."""
