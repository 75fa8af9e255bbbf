"""The routing rule (`shared.device_classes`): which class a job goes to, each refusal naming
the field to change, and how the model's size is read; and the settings that list the
classes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from shared.device_classes import (
    DEVICES_FIELD,
    MODEL_FIELD,
    DeviceClass,
    JobNeeds,
    ModelSize,
    NoDeviceClass,
    memory_per_device_gb,
    parameters_from_name,
    route,
    size_from_name,
    size_of_weights_folder,
    worker_class_problem,
)
from shared.settings import Settings, settings_error_lines

L4 = DeviceClass(name="l4", devices=1, memory_gb=24)
A100_X4 = DeviceClass(name="a100-x4", devices=4, memory_gb=80)
README_CLASSES = [L4, A100_X4]


def needs(model: str | None = None, devices: int = 1, strategy: str = "ddp",
          quantized: bool = False) -> JobNeeds:
    return JobNeeds(devices=devices, strategy=strategy, quantized=quantized,
                    size=size_from_name(model) if model else None)


def refusal(classes: list[DeviceClass], job: JobNeeds) -> NoDeviceClass:
    with pytest.raises(NoDeviceClass) as refused:
        route(classes, job)
    return refused.value


@pytest.mark.parametrize(("name", "parameters"), [
    ("mistralai/Mistral-7B-v0.1", 7e9),
    ("Mistral-7B", 7e9),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", 135e6),
    ("Qwen/Qwen2.5-0.5B-Instruct", 0.5e9),  # the 2.5 of Qwen2.5 is a version
    ("mistralai/Mixtral-8x7B-v0.1", 56e9),
    ("meta-llama/Llama-2-7b-hf", 7e9),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1.1e9),
    ("Qwen/Qwen2.5-7B-Instruct-1M", 7e9),  # 1M is its context: the largest part counts
    ("microsoft/Phi-3-mini-4k-instruct", None),  # 4k is a context length, not a size
    ("gpt2", None),
    ("/models/tiny", None),
])
def test_a_hub_id_s_name_gives_its_parameter_count(name: str, parameters: float | None) -> None:
    assert parameters_from_name(name) == parameters


def test_the_readme_s_worked_example() -> None:
    seven_b = memory_per_device_gb(7e9, quantized=False, devices=1, strategy="ddp")
    seventy_b = memory_per_device_gb(70e9, quantized=False, devices=1, strategy="ddp")
    quantized = memory_per_device_gb(70e9, quantized=True, devices=1, strategy="ddp")
    sharded = memory_per_device_gb(70e9, quantized=False, devices=4, strategy="fsdp")
    replicated = memory_per_device_gb(70e9, quantized=False, devices=4, strategy="ddp")

    assert [round(gb, 1) for gb in (seven_b, seventy_b, quantized, sharded)] == [
        18.3, 165.0, 46.8, 42.7]
    assert replicated == seventy_b  # ddp: every device holds the whole model

    assert route(README_CLASSES, needs("Mistral-7B")).device_class == L4
    assert route(README_CLASSES, needs("Meta-Llama-3-70B", devices=4, strategy="fsdp")
                 ).device_class == A100_X4


def test_the_smallest_class_that_fits_is_chosen() -> None:
    big_first = [DeviceClass(name="x8", devices=8, memory_gb=80),
                 DeviceClass(name="cpu", devices=1, memory_gb=None),
                 DeviceClass(name="a100", devices=1, memory_gb=80),
                 DeviceClass(name="l4", devices=1, memory_gb=24),
                 DeviceClass(name="l4-twin", devices=1, memory_gb=24),
                 DeviceClass(name="x2", devices=2, memory_gb=24)]

    def chosen(job: JobNeeds) -> str:
        return route(big_first, job).device_class.name

    # Fewest devices, then least memory, then the order of the list.
    assert chosen(needs("SmolLM2-135M")) == "l4"
    # Past l4's memory: the next larger; a class stating no memory counts as the largest.
    assert chosen(needs("Qwen2.5-14B")) == "a100"
    assert chosen(needs("Meta-Llama-3-70B", quantized=True)) == "a100"
    assert chosen(needs("Meta-Llama-3-70B")) == "cpu"
    # More devices than a class has rules it out, whatever its memory.
    assert chosen(needs("SmolLM2-135M", devices=2)) == "x2"
    assert chosen(needs("SmolLM2-135M", devices=3)) == "x8"


def test_an_unknown_size_is_not_checked_against_memory() -> None:
    tiny = [DeviceClass(name="tiny", devices=1, memory_gb=0.5)]

    routed = route(tiny, needs("gpt2"))

    assert routed.device_class.name == "tiny" and routed.memory_gb is None
    assert refusal(tiny, needs("Mistral-7B")).field == MODEL_FIELD


def test_too_many_devices_is_refused_naming_training_config_devices() -> None:
    classes = [DeviceClass(name="train", devices=1), DeviceClass(name="gpu-x2", devices=2)]

    refused = refusal(classes, needs("SmolLM2-135M", devices=4))

    assert refused.field == DEVICES_FIELD == "training_config.devices"
    assert refused.message == "no device class has 4 devices; classes: train (1), gpu-x2 (2)"


def test_a_model_too_large_is_refused_naming_model_path_with_the_ways_out() -> None:
    refused = refusal(README_CLASSES, needs("meta-llama/Meta-Llama-3-70B"))

    assert refused.field == MODEL_FIELD == "pretrainedmodel_config.model_path"
    assert refused.message.startswith("about 165.0 GB per device needed (70B parameters from "
                                      "its name, 16-bit, on 1 device); the largest class with "
                                      "1 or more devices has 80 GB (a100-x4)")
    assert "pretrainedmodel_config.use_quantization true (about 46.8 GB per device)" in \
        refused.message
    assert "training_config.strategy 'fsdp' with training_config.devices 4 (about 42.7 GB " \
        "per device)" in refused.message


def test_a_sharded_job_too_large_is_told_of_4_bit_with_ddp_and_no_more_sharding() -> None:
    refused = refusal(README_CLASSES, needs("Meta-Llama-3-405B", devices=4, strategy="fsdp"))

    assert refused.field == MODEL_FIELD
    assert "on 4 devices sharded with fsdp" in refused.message
    assert "use_quantization true with training_config.strategy 'ddp'" in refused.message
    assert "'fsdp' with training_config.devices" not in refused.message  # 4 is the most


def test_a_full_finetune_needs_ten_bytes_a_parameter_and_is_told_of_lora() -> None:
    full = JobNeeds(devices=1, strategy="ddp", quantized=False,
                    size=size_from_name("Mistral-7B"), full_finetune=True)
    # fp32 weight and gradient, 8-bit AdamW moments: 7e9 x 10 B = 65.2 GB x 1.25 + 2.
    assert round(memory_per_device_gb(7e9, quantized=False, devices=1, strategy="ddp",
                                      full_finetune=True), 1) == 83.5

    refused = refusal(README_CLASSES, full)

    assert refused.field == MODEL_FIELD
    assert refused.message == (
        "about 83.5 GB per device needed (7B parameters from its name, full fine-tuning, on 1 "
        "device); the largest class with 1 or more devices has 80 GB (a100-x4); try "
        "pretrainedmodel_config.use_lora true (about 18.3 GB per device)")
    small = JobNeeds(devices=1, strategy="ddp", quantized=False,
                     size=size_from_name("Qwen2.5-0.5B"), full_finetune=True)
    assert route(README_CLASSES, small).device_class == L4


def test_a_local_folder_s_size_is_its_safetensors_read_as_16_bit(tmp_path: Path) -> None:
    for name, size in (("model-00001.safetensors", 3 * 2**30), ("model-00002.safetensors",
                                                                1 * 2**30),
                       ("optimizer.pt", 10 * 2**30), ("config.json", 600)):
        with (tmp_path / name).open("wb") as file:
            file.truncate(size)  # sparse: no disk is spent
    (tmp_path / "sub.safetensors").mkdir()

    size = size_of_weights_folder(tmp_path)

    assert size == ModelSize(2 * 2**30, "from its 4.0 GB of safetensors")
    assert size_of_weights_folder(tmp_path / "sub.safetensors") is None  # none in it
    assert size_of_weights_folder(tmp_path / "missing") is None


def test_a_worker_with_fewer_devices_than_its_class_is_refused() -> None:
    assert worker_class_problem(A100_X4, 4) is None
    assert worker_class_problem(A100_X4, 8) is None
    problem = worker_class_problem(A100_X4, 1)
    assert problem is not None
    assert "TUNERY_WORKER_DEVICE_CLASS 'a100-x4' has 4 devices" in problem
    assert "owns 1 (TUNERY_WORKER_DEVICES)" in problem


# The settings that list the classes -----------------------------------------------------

def settings_errors(env: pytest.MonkeyPatch, **variables: str) -> list[str]:
    for name, value in variables.items():
        env.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    return settings_error_lines(caught.value, dict(os.environ))


def test_unset_there_is_one_class_named_as_the_queue(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings().broker.device_classes == [DeviceClass(name="train", devices=1)]
    clean_env.setenv("TUNERY_QUEUE_NAME", "gpu")
    clean_env.setenv("TUNERY_DEVICE_CLASSES", "[]")
    broker = Settings().broker
    assert broker.device_classes == [DeviceClass(name="gpu", devices=1)]
    assert broker.worker_class().name == "gpu"


def test_the_worker_serves_the_first_class_unless_told(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("TUNERY_DEVICE_CLASSES", '[{"name": "l4", "devices": 1, "memory_gb": 24},'
                                              ' {"name": "a100-x4", "devices": 4}]')
    assert Settings().broker.worker_class() == L4.model_copy(update={"memory_gb": 24.0})
    clean_env.setenv("TUNERY_WORKER_DEVICE_CLASS", "")  # compose's empty default
    assert Settings().broker.worker_class().name == "l4"
    clean_env.setenv("TUNERY_WORKER_DEVICE_CLASS", "a100-x4")
    assert Settings().broker.worker_class().devices == 4


def test_duplicate_class_names_are_refused(clean_env: pytest.MonkeyPatch) -> None:
    assert settings_errors(clean_env, TUNERY_DEVICE_CLASSES=(
        '[{"name": "l4", "devices": 1}, {"name": "l4", "devices": 2}]')) == [
        "TUNERY_DEVICE_CLASSES: class names must be unique (each is a queue); more than one "
        "class is named 'l4', got '[{\"name\": \"l4\", \"devices\": 1}, {\"name\": \"l4\", "
        "\"devices\": 2}]'"]


@pytest.mark.parametrize(("classes", "expected"), [
    ('[{"name": "GPU_A", "devices": 1}]',
     "TUNERY_DEVICE_CLASSES: item 0 name: class name 'GPU_A' must be 1 to 40 lowercase "
     "letters, digits or '-' (it is the class's queue name)"),
    ('[{"name": "' + "a" * 41 + '", "devices": 1}]', "TUNERY_DEVICE_CLASSES: item 0 name:"),
    ('[{"name": "l4", "devices": 0}]',
     "TUNERY_DEVICE_CLASSES: item 0 devices: expected a number greater than or equal to 1"),
    ('[{"name": "l4", "devices": 1, "memory": 24}]',
     "TUNERY_DEVICE_CLASSES: item 0 memory: Extra inputs are not permitted"),
    ('[{"name": "l4"}]', "TUNERY_DEVICE_CLASSES: item 0 devices: Field required"),
    ("l4", "TUNERY_DEVICE_CLASSES: expected a JSON list such as"),
])
def test_a_class_not_in_the_grammar_is_refused_naming_the_variable(
        clean_env: pytest.MonkeyPatch, classes: str, expected: str) -> None:
    (line,) = settings_errors(clean_env, TUNERY_DEVICE_CLASSES=classes)
    assert line.startswith(expected)


def test_a_worker_class_that_is_not_listed_is_refused(clean_env: pytest.MonkeyPatch) -> None:
    assert settings_errors(clean_env, TUNERY_WORKER_DEVICE_CLASS="pair") == [
        "TUNERY_WORKER_DEVICE_CLASS: 'pair' is not one of the device classes: train (1), "
        "got 'pair'"]
