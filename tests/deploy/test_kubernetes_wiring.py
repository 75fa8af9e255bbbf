"""deploy/kubernetes keeps the promises of deploy/README.md: the images, commands and settings
that compose runs, every secret from the Secret the operator creates, each device class a
worker Deployment and a ScaledObject that watch the class's queue and jobs, and time for a
worker to hand its job back."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from api.routes.health import router as health_router
from shared.settings import GROUPS, LEGACY_NAMES, PROJECT_ROOT, Settings
from tests.deploy.kubernetes_manifests import OVERLAYS, Obj, named, of_kind, render
from tests.test_readme import readme_problems

COMPOSE = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
CPU_COMPOSE = yaml.safe_load((PROJECT_ROOT / "deploy" / "compose.cpu-worker.yml").read_text())
DEPLOY_README = (PROJECT_ROOT / "deploy" / "README.md").read_text()
SECRET = "tunery"
# Named by the routing contract (device classes); the code that reads them lands apart.
ROUTING_SETTINGS = {"TUNERY_DEVICE_CLASSES", "TUNERY_WORKER_DEVICE_CLASS"}
# compose settings these manifests leave out on purpose (deploy/README.md, "Kubernetes").
NOT_IN_KUBERNETES = {
    # compose shares a `models` volume between the API and the worker; a cluster needs a
    # ReadWriteMany volume for that, which the README shows how to add.
    "TUNERY_ALLOWED_LOCAL_DIRS",
    # The vLLM profile of compose; these manifests run no inference engine.
    "TUNERY_INFERENCE_ENGINE_URL",
    "TUNERY_INFERENCE_ENGINE_TOKEN",
}


def tunery_containers(objects: tuple[Obj, ...]) -> dict[str, dict[str, Any]]:
    """The containers of Tunery's own images, by workload name."""
    found = {}
    for obj in of_kind(objects, "Deployment") + of_kind(objects, "Job"):
        for container in obj["spec"]["template"]["spec"]["containers"]:
            if container["image"].startswith("tunery-"):
                found[obj["metadata"]["name"]] = container
    return found


def dockerfile_command(name: str) -> list[str]:
    text = (PROJECT_ROOT / name).read_text()
    command: list[str] = json.loads(re.findall(r"^CMD (\[.*\])$", text, re.M)[-1])
    return command


def config_map_data(objects: tuple[Obj, ...]) -> dict[str, str]:
    (config,) = of_kind(objects, "ConfigMap")
    data: dict[str, str] = config["data"]
    return data


def dev_secret() -> dict[str, str]:
    secret = named(render("dev"), "Secret", SECRET)
    return {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}


def readme_secret_keys() -> list[str]:
    """The keys of the `kubectl create secret generic tunery` command in deploy/README.md."""
    command = re.search(r"create secret generic tunery \\\n(.*?)\n\s*```", DEPLOY_README, re.S)
    assert command, "deploy/README.md shows no `kubectl create secret generic tunery` command"
    return re.findall(r"--from-literal=(\w+)=", command.group(1))


def tunery_setting_names() -> set[str]:
    """Every environment variable Settings reads: flat names, nested ones, top-level ones."""
    names = {f"TUNERY_{flat.upper()}" for flat in LEGACY_NAMES}
    names |= {f"TUNERY_{group}__{field}".upper()
              for group, model in GROUPS.items() for field in model.model_fields}
    names |= {f"TUNERY_{field.upper()}" for field, info in Settings.model_fields.items()
              if field not in GROUPS}
    return names


def env_values(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def test_the_workloads_run_the_images_and_commands_of_compose() -> None:
    containers = tunery_containers(render("gpu"))
    api_image, worker_image = COMPOSE["services"]["api"]["image"], \
        COMPOSE["services"]["worker"]["image"]
    api_cmd = dockerfile_command("Dockerfile.api")
    # `sh -c "tunery db upgrade && exec uvicorn ..."`: the Job runs the first, the pods the
    # second.
    migrate, serve = api_cmd[-1].split(" && ")

    assert containers["tunery-migrate"]["image"] == api_image
    assert containers["tunery-migrate"]["command"] == shlex.split(migrate)
    assert containers["tunery-api"]["image"] == api_image
    assert containers["tunery-api"]["command"] == shlex.split(serve.removeprefix("exec "))
    assert containers["tunery-worker-train"]["image"] == \
        CPU_COMPOSE["services"]["worker-cpu"]["image"]
    assert containers["tunery-worker-gpu-x2"]["image"] == worker_image
    for worker in ("tunery-worker-train", "tunery-worker-gpu-x2"):
        assert containers[worker]["command"] == dockerfile_command("Dockerfile.worker")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_tunery_container_reads_the_settings_and_the_secret(overlay: str) -> None:
    objects = render(overlay)
    config_name = of_kind(objects, "ConfigMap")[0]["metadata"]["name"]

    for name, container in tunery_containers(objects).items():
        assert container["envFrom"] == [{"configMapRef": {"name": config_name}},
                                        {"secretRef": {"name": SECRET}}], name


@pytest.mark.parametrize("overlay", ["external", "gpu"])
def test_no_secret_value_is_written_outside_the_dev_overlay(overlay: str) -> None:
    objects = render(overlay)

    assert of_kind(objects, "Secret") == []
    assert set(config_map_data(objects)).isdisjoint(readme_secret_keys())


def test_the_readme_secret_command_names_what_the_pods_and_keda_read() -> None:
    keys = readme_secret_keys()
    keda_keys = {ref["key"] for auth in of_kind(render("gpu"), "TriggerAuthentication")
                 for ref in auth["spec"]["secretTargetRef"]}
    keda_secrets = {ref["name"] for auth in of_kind(render("gpu"), "TriggerAuthentication")
                    for ref in auth["spec"]["secretTargetRef"]}

    assert sorted(keys) == sorted(dev_secret())
    assert keda_keys <= set(keys)
    assert keda_secrets == {SECRET}


def test_every_tunery_setting_named_is_one_tunery_reads() -> None:
    known = tunery_setting_names() | ROUTING_SETTINGS
    named_here = set(config_map_data(render("gpu"))) | set(dev_secret())
    named_here |= {key for container in tunery_containers(render("gpu")).values()
                   for key in env_values(container)}

    assert {key for key in named_here if key.startswith("TUNERY_")} - known == set()


def test_every_setting_compose_gives_the_api_and_workers_is_given_here() -> None:
    compose_env = set(COMPOSE["x-tunery-env"]) | set(COMPOSE["services"]["api"]["environment"])
    compose_env |= set(COMPOSE["services"]["worker"]["environment"])
    objects = render("dev")
    here = set(config_map_data(objects)) | set(dev_secret())
    here |= {key for container in tunery_containers(objects).values()
             for key in env_values(container)}

    assert compose_env - here == NOT_IN_KUBERNETES


def dev_environment() -> dict[str, str]:
    return {**config_map_data(render("dev")), **dev_secret()}


def test_the_dev_settings_are_valid_and_their_secrets_refused_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("TUNERY_")]:
        monkeypatch.delenv(name)
    for name, value in dev_environment().items():
        monkeypatch.setenv(name, value)

    settings = Settings()
    assert settings.dev_secrets is True
    assert settings.database.auto_migrate is False
    assert settings.storage.s3_endpoint_url == "http://minio:9000"

    monkeypatch.setenv("TUNERY_DEV_SECRETS", "0")
    with pytest.raises(ValidationError, match="TUNERY_SECRET_KEY"):
        Settings()


def device_classes(objects: tuple[Obj, ...]) -> list[dict[str, Any]]:
    classes: list[dict[str, Any]] = json.loads(config_map_data(objects)["TUNERY_DEVICE_CLASSES"])
    return classes


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_device_class_has_workers_that_keda_scales_on_its_queue_and_jobs(
        overlay: str) -> None:
    objects = render(overlay)
    auths = {auth["metadata"]["name"] for auth in of_kind(objects, "TriggerAuthentication")}
    classes = device_classes(objects)

    assert len(of_kind(objects, "ScaledObject")) == len(classes)
    for device_class in classes:
        name = device_class["name"]
        worker = named(objects, "Deployment", f"tunery-worker-{name}")
        container = worker["spec"]["template"]["spec"]["containers"][0]
        env = env_values(container)
        assert env["TUNERY_WORKER_DEVICE_CLASS"] == name
        assert env["TUNERY_WORKER_DEVICES"] == str(device_class["devices"])
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus in (None, device_class["devices"])
        # KEDA owns the count: an apply must not reset it.
        assert "replicas" not in worker["spec"]

        scaler = named(objects, "ScaledObject", f"tunery-worker-{name}")
        assert scaler["spec"]["scaleTargetRef"] == {"name": worker["metadata"]["name"]}
        assert scaler["spec"]["minReplicaCount"] == 0
        triggers = {trigger["type"]: trigger for trigger in scaler["spec"]["triggers"]}
        assert set(triggers) == {"redis", "postgresql"}
        assert triggers["redis"]["metadata"]["listName"] == name
        assert triggers["redis"]["metadata"]["listLength"] == "1"
        query = triggers["postgresql"]["metadata"]["query"]
        assert f"device_class = '{name}' AND status IN ('QUEUED', 'RUNNING')" in query
        for trigger in triggers.values():
            assert trigger["authenticationRef"]["name"] in auths


def grace_period_s(compose_value: str) -> int:
    match = re.fullmatch(r"(\d+)([sm])", compose_value)
    assert match, f"stop_grace_period {compose_value!r}: expected seconds or minutes, e.g. 2m"
    return int(match.group(1)) * (60 if match.group(2) == "m" else 1)


def test_workers_have_at_least_compose_s_time_to_hand_their_job_back() -> None:
    compose_grace = grace_period_s(COMPOSE["services"]["worker"]["stop_grace_period"])
    workers = [obj for obj in of_kind(render("gpu"), "Deployment")
               if obj["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]

    assert len(workers) == 2
    for worker in workers:
        assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= \
            compose_grace


def flatten(node: Any, path: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in flatten(value,
                                                                         f"{path}/{key}").items()}
    if isinstance(node, list):
        return {k: v for i, value in enumerate(node) for k, v in flatten(value,
                                                                         f"{path}/{i}").items()}
    return {path: node}


# Where one class may differ from another; anything else (a probe, the security context, the
# volumes, the Secret) a new class keeps as base/worker-train.yaml has it.
CLASS_SPECIFIC = re.compile(
    r"/metadata/(name|labels/tunery~device-class)$|/tunery~device-class$|/scaleTargetRef/name$"
    r"|/env/[01]/value$|/image$|/resources/|/nodeSelector/|/tolerations/"
    r"|/terminationGracePeriodSeconds$|/volumes/\d+/emptyDir/sizeLimit$|/maxReplicaCount$"
    r"|/triggers/0/metadata/listName$|/triggers/1/metadata/query$"
)


def test_a_gpu_class_differs_from_train_only_where_a_class_should() -> None:
    objects = render("gpu")
    for kind in ("Deployment", "ScaledObject"):
        train = flatten(named(objects, kind, "tunery-worker-train"))
        gpu = flatten(named(objects, kind, "tunery-worker-gpu-x2"))
        differing = {path for path in train.keys() | gpu.keys()
                     if train.get(path) != gpu.get(path)}
        # Label keys hold "/": "~" stands for it, as in a JSON pointer.
        differing = {path.replace("tunery/", "tunery~") for path in differing}

        assert {path for path in differing if not CLASS_SPECIFIC.search(path)} == set(), kind


def test_the_api_probes_and_autoscaler_use_the_api_s_routes_and_deployment() -> None:
    objects = render("external")
    api = named(objects, "Deployment", "tunery-api")
    container = api["spec"]["template"]["spec"]["containers"][0]
    routes = {route.path for route in health_router.routes}  # type: ignore[attr-defined]
    hpa = named(objects, "HorizontalPodAutoscaler", "tunery-api")

    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"/readyz", "/healthz"} <= routes
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "tunery-api"}
    assert "replicas" not in api["spec"]
    assert config_map_data(objects)["TUNERY_AUTO_MIGRATE"] == "false"


def test_the_migrations_and_their_settings_are_what_apply_first_selects() -> None:
    selected = [obj for obj in render("external")
                if obj["metadata"].get("labels", {}).get("tunery/apply-first") == "true"]

    assert sorted(obj["kind"] for obj in selected) == ["ConfigMap", "Job"]
    assert "-l tunery/apply-first=true" in DEPLOY_README


NAMESPACES = {"external": "tunery", "dev": "tunery-dev", "gpu": "tunery"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_lands_in_the_overlay_s_namespace(overlay: str) -> None:
    # An object without one would go to whatever namespace kubectl's context names, and its
    # references to the hashed ConfigMap would not be rewritten.
    namespaces = {(obj["kind"], obj["metadata"]["name"]): obj["metadata"].get("namespace")
                  for obj in render(overlay)}

    assert {key for key, namespace in namespaces.items()
            if namespace != NAMESPACES[overlay]} == set()


@pytest.mark.parametrize("document", ["deploy/README.md", "deploy/multi-node.md"])
def test_the_deploy_documents_render_their_code_blocks_and_links(document: str) -> None:
    path = PROJECT_ROOT / document

    assert readme_problems(path.read_text(), path.parent) == []
