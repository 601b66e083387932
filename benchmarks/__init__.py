"""Reproducible benchmarks of mlfe, measured side by side with nginx (see benchmarks/README.md)."""
