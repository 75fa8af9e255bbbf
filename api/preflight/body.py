"""A submission's body, validated section by section so that one answer names every problem.

pydantic stops at the first section that fails: with `training_config` missing it never runs
the checks that need `data_config`, and a client learns of a wrong column only after fixing
the missing section. `read_body` validates the whole body as `FinetuneRequest` and, when that
fails, each section on its own, so the source checks can still run on the sections that passed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from api.errors import validation_fields
from shared.schema import (
    DataConfig,
    FinetuneRequest,
    HuggingfaceConfig,
    LoggingConfig,
    PretrainedModelConfig,
    TrainingConfig,
)

Problem = dict[str, str]
SectionT = TypeVar("SectionT", PretrainedModelConfig, DataConfig, TrainingConfig,
                   HuggingfaceConfig)


@dataclass(frozen=True)
class Sections:
    """The sections the checks read; None for one that did not pass the schema."""

    model: PretrainedModelConfig | None
    data: DataConfig | None
    training: TrainingConfig | None
    hf: HuggingfaceConfig | None

    @classmethod
    def of(cls, request: FinetuneRequest) -> Sections:
        return cls(request.pretrainedmodel_config, request.data_config,
                   request.training_config, request.hf_config)


@dataclass(frozen=True)
class ReadBody:
    """A valid `request`, or the schema's `problems` and the `sections` that passed."""

    request: FinetuneRequest | None
    sections: Sections
    problems: list[Problem]


def read_body(body: Any) -> ReadBody:
    try:
        request = FinetuneRequest.model_validate(body)
    except ValidationError as exc:
        problems = [_with_hint(p) for p in validation_fields(exc.errors())]
    else:
        return ReadBody(request, Sections.of(request), [])
    raw = body if isinstance(body, dict) else {}
    sections = Sections(
        model=_section(PretrainedModelConfig, raw, "pretrainedmodel_config"),
        data=_section(DataConfig, raw, "data_config"),
        # Missing, it is reported as such; its defaults (supervised training) are what the
        # column check assumes meanwhile, as a client adding it back would most often send.
        training=_section(TrainingConfig, raw, "training_config", missing_as_default=True),
        hf=_section(HuggingfaceConfig, raw, "hf_config", missing_as_default=True),
    )
    if "data_config" in raw and "training_config" in raw:
        problems += _cross_section_problems(sections)
    return ReadBody(None, sections, problems)


def _with_hint(problem: Problem) -> Problem:
    """A missing section whose every field has a default: say that `{}` is enough."""
    section = FinetuneRequest.model_fields.get(problem["path"])
    if problem["message"] != "Field required" or section is None:
        return problem
    model = section.annotation
    if isinstance(model, type) and issubclass(model, BaseModel) and all(
            not field.is_required() for field in model.model_fields.values()):
        return {**problem, "message": (
            f"Field required; every field inside has a default, so "
            f'"{problem["path"]}": {{}} is enough')}
    return problem


def _section(
    model: type[SectionT], raw: dict[str, Any], name: str, *, missing_as_default: bool = False,
) -> SectionT | None:
    if name not in raw:
        return model() if missing_as_default else None
    try:
        return model.model_validate(raw[name])
    except ValidationError:
        return None  # its errors are among the whole body's already


def _cross_section_problems(sections: Sections) -> list[Problem]:
    """The schema's rules across data_config and training_config, which pydantic runs only
    once every section passed: checked on those two, with defaults for the rest."""
    if sections.data is None or sections.training is None:
        return []
    try:
        FinetuneRequest(pretrainedmodel_config=PretrainedModelConfig(),
                        data_config=sections.data, training_config=sections.training,
                        logging_config=LoggingConfig())
    except ValidationError as exc:
        return validation_fields(exc.errors())
    return []
