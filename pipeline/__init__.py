"""mailwarden's pipeline: sources, parsers, store, jobs and the command line."""

__version__ = "0.1.0"
