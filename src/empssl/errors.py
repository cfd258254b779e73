"""The error a user's configuration raises: a leaf, so that the config and the method registry both raise it."""


class ConfigError(ValueError):
    """A user mistake in the configuration (bad value, unknown preset, ...): reported in one line."""
