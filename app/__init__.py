"""vtp: the web process and what every process shares (messages, settings, storage, errors)."""

__version__ = "0.1.0"
