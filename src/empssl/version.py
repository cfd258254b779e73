"""The package's version: a leaf, so that the modules that record it (config.json, checkpoints, shards, exports)
need not import the package itself, whose public API names them all."""

__version__ = "0.3.0"
