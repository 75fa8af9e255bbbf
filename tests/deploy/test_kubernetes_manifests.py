"""deploy/kubernetes: every overlay renders with kustomize, and every object it makes is valid
for Kubernetes 1.37 and for KEDA's CRDs, unknown fields included (how each is checked:
tests/deploy/kubernetes_manifests.py). A misspelt field, a wrong type or a misspelt trigger
parameter is refused, as the API server or KEDA would refuse or ignore it."""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

import pytest

from tests.deploy.kubernetes_manifests import OVERLAYS, Obj, named, problems, render

# What each overlay makes: an object dropped from a `resources:` list shows here.
KINDS = {
    "external": {"ConfigMap": 1, "Deployment": 2, "Service": 1, "HorizontalPodAutoscaler": 1,
                 "PodDisruptionBudget": 1, "Job": 1, "ScaledObject": 1,
                 "TriggerAuthentication": 2},
    "dev": {"ConfigMap": 1, "Secret": 2, "Deployment": 5, "Service": 4,
            "PersistentVolumeClaim": 3, "HorizontalPodAutoscaler": 1, "PodDisruptionBudget": 1,
            "Job": 2, "ScaledObject": 1, "TriggerAuthentication": 2},
    "gpu": {"ConfigMap": 1, "Deployment": 3, "Service": 1, "HorizontalPodAutoscaler": 1,
            "PodDisruptionBudget": 1, "Job": 1, "ScaledObject": 2, "TriggerAuthentication": 2},
}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_of_the_overlay_is_valid_for_kubernetes_and_keda(overlay: str) -> None:
    objects = render(overlay)

    assert Counter(obj["kind"] for obj in objects) == KINDS[overlay]
    assert [line for obj in objects for line in problems(obj)] == []


def gpu_worker() -> Obj:
    return copy.deepcopy(named(render("gpu"), "Deployment", "tunery-worker-gpu-x2"))


def gpu_scaler() -> Obj:
    return copy.deepcopy(named(render("gpu"), "ScaledObject", "tunery-worker-gpu-x2"))


def pod_spec(deployment: Obj) -> dict[str, Any]:
    spec: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return spec


def test_a_misspelt_pod_field_is_refused() -> None:
    worker = gpu_worker()
    pod_spec(worker)["terminationGracePeriodSecond"] = pod_spec(worker).pop(
        "terminationGracePeriodSeconds")

    assert problems(worker) == [
        "Deployment/tunery-worker-gpu-x2: spec.template.spec: Additional properties are not "
        "allowed ('terminationGracePeriodSecond' was unexpected)"
    ]


def test_a_wrong_type_in_a_container_is_refused() -> None:
    worker = gpu_worker()
    pod_spec(worker)["containers"][0]["ports"][0]["containerPort"] = "9101"

    assert problems(worker) == [
        "Deployment/tunery-worker-gpu-x2: spec.template.spec.containers.0.ports.0."
        "containerPort: '9101' is not of type 'integer'"
    ]


def test_an_unknown_kind_is_refused() -> None:
    worker = gpu_worker()
    worker["kind"] = "Deploymnet"

    assert problems(worker) == [
        "Deploymnet/tunery-worker-gpu-x2: Couldn't find schema for kind Deploymnet with api "
        "version apps/v1 for kubernetes version 1.37"
    ]


def test_a_misspelt_scaled_object_field_is_refused() -> None:
    scaler = gpu_scaler()
    scaler["spec"]["minReplicas"] = scaler["spec"].pop("minReplicaCount")

    assert problems(scaler) == [
        "ScaledObject/tunery-worker-gpu-x2: spec: Additional properties are not allowed "
        "('minReplicas' was unexpected)"
    ]


def test_a_number_where_keda_wants_a_string_is_refused() -> None:
    scaler = gpu_scaler()
    scaler["spec"]["triggers"][0]["metadata"]["listLength"] = 1

    assert problems(scaler) == [
        "ScaledObject/tunery-worker-gpu-x2: spec.triggers.0.metadata.listLength: 1 is not of "
        "type 'string'"
    ]


def test_a_bound_of_the_keda_schema_is_enforced() -> None:
    scaler = gpu_scaler()
    behavior = scaler["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    behavior["scaleDown"]["stabilizationWindowSeconds"] = 7200

    assert problems(scaler) == [
        "ScaledObject/tunery-worker-gpu-x2: spec.advanced.horizontalPodAutoscalerConfig."
        "behavior.scaleDown.stabilizationWindowSeconds: 7200 is greater than the maximum of 3600"
    ]


def test_a_misspelt_trigger_parameter_is_refused() -> None:
    scaler = gpu_scaler()
    metadata = scaler["spec"]["triggers"][0]["metadata"]
    metadata["listname"] = metadata.pop("listName")

    assert problems(scaler) == [
        "ScaledObject/tunery-worker-gpu-x2: trigger redis: KEDA's redis scaler reads no "
        "'listname'",
        "ScaledObject/tunery-worker-gpu-x2: trigger redis: 'listName' is required",
    ]


def test_a_misspelt_trigger_authentication_field_is_refused() -> None:
    auth = copy.deepcopy(named(render("external"), "TriggerAuthentication", "tunery-redis"))
    auth["spec"]["secretTargetRef"][0]["secretName"] = auth["spec"]["secretTargetRef"][0].pop(
        "name")

    assert problems(auth) == [
        "TriggerAuthentication/tunery-redis: spec.secretTargetRef.0: 'name' is a required "
        "property",
    ]
