"""The polyarch version: its own module, so that the compiler can record it without a cycle."""

__version__ = "0.1.0"
