"""Tests of kernelgate/ (the entry points): config loading, envoy-config, inject, the k8s manifests and pod."""
