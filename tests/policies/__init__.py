"""Tests of policies/: opa test and opa check --strict."""
