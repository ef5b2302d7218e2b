"""Tests of otel/: tracing set-up, kernel capture (CPU here; CUPTI on a GPU)."""
