"""Which device class a job goes to (`shared.device_classes.route`), or the 422 problem that
names the field to change when none fits."""

from __future__ import annotations

from api.preflight.body import Problem
from api.schemas import PreflightDeviceClass
from shared.device_classes import JobNeeds, ModelSize, NoDeviceClass, Routing, route
from shared.schema import PretrainedModelConfig, TrainingConfig
from shared.settings import Settings


def route_job(training: TrainingConfig, model: PretrainedModelConfig | None,
              size: ModelSize | None, settings: Settings) -> tuple[Routing | None, list[Problem]]:
    """The class of the job, or a problem; `size` None (or `model`, which failed the
    schema): the model's memory is not checked."""
    needs = JobNeeds(devices=training.devices, strategy=training.strategy,
                     quantized=model.use_quantization if model is not None else False,
                     size=size if model is not None else None,
                     full_finetune=model is not None and not model.use_lora)
    try:
        return route(settings.broker.device_classes, needs), []
    except NoDeviceClass as exc:
        return None, [{"path": exc.field, "message": exc.message}]


def routing_report(routing: Routing, size: ModelSize | None) -> PreflightDeviceClass:
    chosen = routing.device_class
    if routing.memory_gb is None:
        estimate = "memory not checked: the model's size is unknown (a hub id whose name " \
                   "states none, or a local folder the API cannot read)"
    else:
        assert size is not None
        estimate = (f"about {routing.memory_gb:.1f} GB per device for "
                    f"{size.parameters / 1e9:.3g}B parameters {size.basis}")
    return PreflightDeviceClass(name=chosen.name, devices=chosen.devices,
                                memory_gb=chosen.memory_gb,
                                memory_needed_gb=None if routing.memory_gb is None
                                else round(routing.memory_gb, 1),
                                estimate=estimate)
