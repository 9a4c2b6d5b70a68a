"""User-facing errors: the CLI prints one line naming the culprit and exits non-zero."""


class RLHFError(Exception):
    """Base class for errors caused by the user's input (config, data, paths)."""


class ConfigError(RLHFError):
    """A config value, recipe, stage kind or override is wrong."""


class DataError(RLHFError):
    """A data file or row is wrong; the message names `file:line`."""


class TrainingError(RLHFError):
    """Training cannot go on (a non-finite loss, say); the message names stage and step."""
