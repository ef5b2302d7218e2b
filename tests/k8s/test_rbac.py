"""RBAC on a real API server says what docs/kubernetes.md claims: the pods' service accounts
(``kernelgate``, ``jaeger``) are bound to nothing, so they can do nothing with the API.

Asked two ways, as ``kubectl auth can-i`` does: a SubjectAccessReview about the service
account (``--as``), and, with a real token the API server issued for it (TokenRequest), a
SelfSubjectAccessReview and the request itself. A cluster admin asking the same questions
is allowed: the control that shows the reviews can say yes.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.dynamic.exceptions import ForbiddenError

from tests.k8s.apiserver import Cluster
from tests.k8s.manifests import K8S, in_namespace, kustomize_build

NAMESPACE = "kernelgate-rbac"
SERVICE_ACCOUNTS = ("kernelgate", "jaeger")
# (verb, group, resource): what a compromised sidecar would want.
QUESTIONS = [("get", "", "secrets"), ("list", "", "secrets"), ("get", "", "configmaps"),
             ("list", "", "pods"), ("create", "", "pods"), ("create", "", "pods/exec"),
             ("patch", "apps", "deployments"), ("create", "", "serviceaccounts/token"),
             ("*", "*", "*")]


@pytest.fixture(scope="module")
def namespace(cluster: Cluster) -> str:
    for doc in in_namespace(kustomize_build(K8S / "overlays" / "cpu-dev"), NAMESPACE):
        cluster.apply(doc)
    return NAMESPACE


def access_review(cluster: Cluster, attributes: dict[str, Any], user: str | None = None,
                  groups: list[str] | None = None, token: str | None = None) -> dict[str, Any]:
    """A SubjectAccessReview about ``user`` (as the admin), or a SelfSubjectAccessReview with ``token``."""
    if token:
        review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                  "metadata": {}, "spec": {"resourceAttributes": attributes}}
        return cluster.create(review, token=token)["status"]
    review = {"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview", "metadata": {},
              "spec": {"resourceAttributes": attributes, "user": user, "groups": groups or []}}
    return cluster.create(review)["status"]


def attributes(verb: str, group: str, resource: str) -> dict[str, str]:
    resource, _, subresource = resource.partition("/")
    return {"namespace": NAMESPACE, "verb": verb, "group": group, "resource": resource,
            "subresource": subresource}


def service_account_user(name: str) -> tuple[str, list[str]]:
    return (f"system:serviceaccount:{NAMESPACE}:{name}",
            ["system:serviceaccounts", f"system:serviceaccounts:{NAMESPACE}", "system:authenticated"])


def token_for(cluster: Cluster, name: str) -> str:
    """A short-lived token for the service account (``kubectl create token``)."""
    request = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
               "spec": {"expirationSeconds": 600}}
    answer = cluster.dynamic().request("post", f"/api/v1/namespaces/{NAMESPACE}/serviceaccounts/{name}/token",
                                       body=request)
    return answer.status.token


@pytest.mark.parametrize("name", SERVICE_ACCOUNTS)
@pytest.mark.parametrize("question", QUESTIONS, ids=lambda q: f"{q[0]}-{q[2]}")
def test_service_account_may_do_nothing(cluster: Cluster, namespace: str, name: str, question):
    user, groups = service_account_user(name)
    status = access_review(cluster, attributes(*question), user=user, groups=groups)
    assert status["allowed"] is False, f"{user} may {question}: {status}"


@pytest.mark.parametrize("question", QUESTIONS, ids=lambda q: f"{q[0]}-{q[2]}")
def test_an_admin_may_do_all_of_it(cluster: Cluster, namespace: str, question):
    status = access_review(cluster, attributes(*question), user="someone", groups=["system:masters"])
    assert status["allowed"] is True


@pytest.mark.parametrize("name", SERVICE_ACCOUNTS)
def test_with_its_own_token_the_service_account_is_refused(cluster: Cluster, namespace: str, name: str):
    token = token_for(cluster, name)
    whoami = cluster.create({"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview",
                             "metadata": {}}, token=token)
    assert whoami["status"]["userInfo"]["username"] == service_account_user(name)[0]
    assert access_review(cluster, attributes("get", "", "secrets"), token=token)["allowed"] is False
    with pytest.raises(ForbiddenError):
        cluster.list("v1", "Secret", NAMESPACE, token=token)
    with pytest.raises(ForbiddenError):
        cluster.get("v1", "ConfigMap", "kube-root-ca.crt", NAMESPACE, token=token)


def test_no_binding_names_the_service_accounts(cluster: Cluster, namespace: str):
    """Nothing grants them anything: no RoleBinding or ClusterRoleBinding has them as subject."""
    bindings = cluster.list("rbac.authorization.k8s.io/v1", "RoleBinding", NAMESPACE) + \
        cluster.list("rbac.authorization.k8s.io/v1", "ClusterRoleBinding")
    assert bindings, "the bootstrap ClusterRoleBindings should be listed"
    named = [b["metadata"]["name"] for b in bindings for s in b.get("subjects") or []
             if s.get("kind") == "ServiceAccount" and s.get("name") in SERVICE_ACCOUNTS
             and s.get("namespace") == NAMESPACE]
    assert named == []
