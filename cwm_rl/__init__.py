"""Core of cwm-rl: the shared types, the CLI, and (later) the job driver; importing it stays light."""

__version__ = "0.1.0"
