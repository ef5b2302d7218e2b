"""Tests of sidecar/: input, identity, decision, OPA (server and Wasm), rate limits, the gRPC server."""
