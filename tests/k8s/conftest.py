"""The session's API server (kine + kube-apiserver on loopback), started once for tests/k8s/."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.k8s.apiserver import Cluster, running_cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with running_cluster(tmp_path_factory.mktemp("apiserver")) as running:
        yield running
