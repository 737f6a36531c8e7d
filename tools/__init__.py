"""Command-line tools: `polyarch` and `polyarch-opt`."""
