"""`Preflight`: every check a submission passes before anything is stored or queued."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from api.errors import ApiError
from api.limits.payload import payload_limit_problems
from api.preflight.body import Problem, Sections, read_body
from api.preflight.dataset import DatasetContext, DatasetFindings, check_dataset
from api.preflight.examples import preview_examples
from api.preflight.hub import HubClient
from api.preflight.model import ModelFindings, check_model
from api.preflight.plan import default_warnings, step_plan, template_plan, template_warning
from api.preflight.routing import route_job, routing_report
from api.schemas import PreflightOut
from shared.device_classes import Routing
from shared.resume import resume_problems
from shared.schema import FinetuneRequest
from shared.settings import Settings
from shared.storage import Storage


class Preflight:
    """The checks of one submission by `tenant_id`. The dry run also looks hub ids up on the
    hub and tokenizes the first rows; a submit waits on neither."""

    def __init__(self, session: Session, storage: Storage, settings: Settings, tenant_id: str,
                 *, dry_run: bool) -> None:
        self.session, self.storage, self.settings = session, storage, settings
        self.tenant_id = tenant_id
        self.hub = HubClient.from_settings(settings.sources) if dry_run else None
        self.dry_run = dry_run
        self.job_warnings: list[str] = []
        self.routing: Routing | None = None

    def parse(self, body: Any) -> FinetuneRequest:
        """The body as a request; a 422 otherwise, naming the schema's problems and those
        of the sections that passed it (a dataset that lacks a column, a model that does not
        exist), all in one answer."""
        read = read_body(body)
        if read.request is not None:
            return read.request
        problems = read.problems + self._inspect(read.sections)[0]
        raise _refusal(problems)

    def check(self, request: FinetuneRequest) -> PreflightOut:
        """The report of a request that passes every check; a 422 naming every problem
        otherwise. `job_warnings` then holds the warnings a job created from it keeps: those
        the worker does not restate from the run it trains (the template, the warm-up), and
        `device_class` the class it goes to."""
        problems, dataset, model, warnings = self._inspect(Sections.of(request))
        data, training = request.data_config, request.training_config
        train_rows = dataset.report.train_rows if dataset.report else None
        steps, step_problems, step_warnings = step_plan(train_rows, training)
        problems += step_problems
        if problems:
            raise _refusal(problems)
        assert dataset.report is not None and model.report is not None  # else a problem
        assert self.routing is not None  # else a problem
        examples, example_warnings = (preview_examples(dataset.uploaded, request, self.settings)
                                      if self.dry_run else ([], []))
        self.job_warnings = [*default_warnings(data), *warnings, *step_warnings]
        restated = [w for w in (template_warning(data, training), steps.warmup_warning) if w]
        return PreflightOut(
            ok=True, dataset=dataset.report, model=model.report,
            template=template_plan(data, training, dataset.report.columns), steps=steps,
            device_class=routing_report(self.routing, model.size),
            warnings=[*restated, *self.job_warnings, *example_warnings],
            examples=examples,
        )

    def _inspect(self, sections: Sections
                 ) -> tuple[list[Problem], DatasetFindings, ModelFindings, list[str]]:
        """The operator limits and the sources of the sections that passed the schema."""
        token = sections.hf.hf_token if sections.hf else None
        problems = payload_limit_problems(self.settings, model=sections.model,
                                          data=sections.data, training=sections.training)
        model, dataset = ModelFindings(), DatasetFindings()
        if sections.model is not None:
            model = check_model(sections.model, self.settings, hub=self.hub, token=token)
            problems += model.problems
        if sections.data is not None:
            dataset = check_dataset(sections.data, sections.training, DatasetContext(
                self.session, self.storage, self.settings, self.tenant_id, self.hub, token))
            problems += dataset.problems
        if sections.model is not None:
            problems += resume_problems(self.session, self.storage, self.tenant_id,
                                        sections.model)
        if sections.training is not None:
            self.routing, routing_problems = route_job(sections.training, sections.model,
                                                       model.size, self.settings)
            problems += routing_problems
        return problems, dataset, model, [*model.warnings, *dataset.warnings]

    @property
    def device_class(self) -> str:
        """The class `check` routed the request to."""
        if self.routing is None:
            raise RuntimeError("Preflight.check has not passed a request yet")
        return self.routing.device_class.name


def _refusal(problems: list[Problem]) -> ApiError:
    summary = "; ".join(f"{p['path']}: {p['message']}" for p in problems)
    return ApiError(422, "invalid_request", summary, problems)
