"""`pretrainedmodel_config.model_path`: a local folder that holds a model, or a hub model.

A local folder needs what the worker loads: config.json, weights as safetensors (it refuses
pickled .bin files, and reads no .gguf) and a tokenizer. A hub id must exist on the hub
(asked only in a dry run).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from api.preflight.body import Problem
from api.preflight.hub import HubClient
from api.schemas import PreflightModel
from shared.device_classes import (
    WEIGHTS_SUFFIX,
    ModelSize,
    size_from_name,
    size_of_weights_folder,
)
from shared.schema import PretrainedModelConfig
from shared.settings import Settings
from shared.sources import SourceError, classify_source
from shared.url_guard import UrlPolicy

FIELD = "pretrainedmodel_config.model_path"
CONFIG_FILE = "config.json"
UNREADABLE_WEIGHTS = (".bin", ".gguf")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


@dataclass
class ModelFindings:
    report: PreflightModel | None = None
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    size: ModelSize | None = None
    """What the device class routing reads: a local folder's weights, a hub id's name; None
    when unknown."""


def check_model(config: PretrainedModelConfig, settings: Settings, *, hub: HubClient | None,
                token: str | None) -> ModelFindings:
    """What is wrong with the base model `config` names, and what was checked. `hub` None:
    a hub id is not looked up."""
    value = config.model_path
    try:
        # transformers resolves a bare name such as `gpt2` on the hub; a model is never a URL.
        source = classify_source(value, settings.sources.allowed_local_dirs, allow_urls=False,
                                 url_policy=UrlPolicy.from_settings(settings.sources),
                                 bare_hub_names=True)
    except SourceError as exc:
        return _refused(str(exc))
    if source.kind == "dataset":
        return _refused(f"{value!r} is a dataset id, not a model")
    if source.kind == "local":
        assert source.path is not None  # classify_source resolves local paths
        return _local(value, source.path)
    size = size_from_name(value)
    if hub is None:
        return ModelFindings(PreflightModel(kind="hub", model_path=value,
                                            checked="not checked at submit"), size=size)
    answer = hub.lookup("models", value, token)
    if answer.status == "missing":
        detail = f" ({answer.detail})" if answer.detail else ""
        return _refused(f"no model {value!r} on the hub{detail}; check its spelling")
    if answer.status == "unchecked":
        checked = f"not checked: {answer.detail}"
        return ModelFindings(PreflightModel(kind="hub", model_path=value, checked=checked),
                             warnings=[f"{FIELD}: {checked}"], size=size)
    return ModelFindings(PreflightModel(kind="hub", model_path=value, checked="found on the hub"),
                         size=size)


def _local(value: str, path: Path) -> ModelFindings:
    if not path.exists():
        # The worker may run on another host, where the folder may exist.
        checked = f"not checked: {value!r} does not exist on the API's host"
        return ModelFindings(PreflightModel(kind="local", model_path=value, checked=checked),
                             warnings=[f"{FIELD}: {checked}; the worker looks for it on its own"])
    if not path.is_dir():
        return _refused(f"{value!r} is a file; model_path names the folder that holds the "
                        f"model's {CONFIG_FILE}, weights and tokenizer")
    try:
        names = {entry.name for entry in os.scandir(path)}
    except OSError as exc:
        return _refused(f"{value!r} cannot be listed: {exc.strerror}")
    missing = model_folder_gaps(names)
    if missing:
        return _refused(f"{value!r} holds no model the worker can load: {'; '.join(missing)}")
    return ModelFindings(PreflightModel(
        kind="local", model_path=value,
        checked=f"the folder holds {CONFIG_FILE}, safetensors weights and a tokenizer",
    ), size=size_of_weights_folder(path))


def model_folder_gaps(names: set[str]) -> list[str]:
    """What a folder holding the files `names` lacks to be a model the worker loads."""
    gaps = []
    if CONFIG_FILE not in names:
        gaps.append(f"no {CONFIG_FILE}")
    if not any(name.endswith(WEIGHTS_SUFFIX) for name in names):
        other = sorted(n for n in names if n.endswith(UNREADABLE_WEIGHTS))
        gaps.append(f"no weights as *{WEIGHTS_SUFFIX}" + (
            f" (it has {other[:3]}: the worker loads only safetensors; convert them)"
            if other else ""))
    if not names.intersection(TOKENIZER_FILES):
        gaps.append(f"no tokenizer (one of {', '.join(TOKENIZER_FILES)})")
    return gaps


def _refused(message: str) -> ModelFindings:
    return ModelFindings(problems=[{"path": FIELD, "message": message}])
