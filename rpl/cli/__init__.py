"""Command-line entry points: ``rpl-train``, ``rpl-eval``, ``rpl-data``."""
