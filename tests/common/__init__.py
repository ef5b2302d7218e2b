"""Tests of common/: ports, routes (checked against the policy, the inference app, k8s), processes, GC freeze."""
