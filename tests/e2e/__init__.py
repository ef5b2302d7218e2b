"""Whole-stack tests through a real Envoy: authz end to end, faults under load, hostile input, traces in Jaeger."""
