"""Sample answers and report.json: real jobs on the tiny model, one with the default three
sample prompts and one without, which must train exactly alike."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from shared.artifacts import list_artifacts
from shared.loss_mask import IGNORE_INDEX, TokenizedExample
from shared.settings import Settings
from shared.storage import LocalStorage
from worker.assets.build_dataset import DATASET_PATH
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import TrainResult, run_job
from worker.pipeline.sample_answers import (
    REPORT_FILE,
    SamplePrompt,
    greedy_answers,
    sample_prompts,
)
from worker.publish import publish_outputs

ANSWER_LINE = re.compile(r'sample answer (\d)/3 \((base model|step \d+)\): ".*"')


@dataclass
class Job:
    result: TrainResult
    reporter: RecordingReporter
    storage: LocalStorage

    def report(self) -> dict[str, Any]:
        return json.loads((self.result.output_dir / REPORT_FILE).read_text())

    def answer_lines(self) -> list[re.Match[str]]:
        return [m for line in self.reporter.lines if (m := ANSWER_LINE.fullmatch(line))]


def _run(tmp: Path, tiny_model_dir: Path, make_request: Any, name: str,
         model: dict[str, Any] | None = None, **training: Any) -> Job:
    settings = Settings(data_dir=tmp / "data",
                        allowed_local_dirs=[DATASET_PATH.parent, tiny_model_dir.parent])
    # With dropout, a random number drawn by generation would change every later step.
    request = make_request(model={"lora_dropout": 0.1, **(model or {})}, training=training)
    reporter = RecordingReporter()
    result = run_job(request, tmp / "work", reporter, settings)
    storage = LocalStorage(tmp / "storage")
    publish_outputs(name, result.output_dir, request.hf_config, storage,
                    should_stop=reporter.should_stop, log=reporter.log)
    return Job(result, reporter, storage)


@pytest.fixture(scope="module")
def with_samples(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                 make_request: Any) -> Job:
    return _run(tmp_path_factory.mktemp("samples"), tiny_model_dir, make_request, "samples",
                sample_prompts=3)


@pytest.fixture(scope="module")
def without_samples(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
                    make_request: Any) -> Job:
    return _run(tmp_path_factory.mktemp("no-samples"), tiny_model_dir, make_request,
                "no-samples", sample_prompts=0)


def test_every_evaluation_logs_three_answers_after_the_base_model_s(with_samples: Job) -> None:
    eval_steps = with_samples.reporter.steps("eval_loss")
    answered = [(m.group(2), int(m.group(1))) for m in with_samples.answer_lines()]

    assert eval_steps[0] == 0 and len(eval_steps) > 2
    assert answered == [(who, n) for who in ["base model", *(f"step {s}" for s in eval_steps)]
                        for n in (1, 2, 3)]
    prompts = [line for line in with_samples.reporter.lines
               if line.startswith("sample prompt ")]
    assert len(prompts) == 3 and all("### Response:" in line for line in prompts), prompts


def test_answer_lines_follow_the_eval_loss_line_of_their_step(with_samples: Job) -> None:
    lines = with_samples.reporter.lines
    for step in with_samples.reporter.steps("eval_loss"):
        first = next(i for i, line in enumerate(lines)
                     if line.startswith(f"sample answer 1/3 (step {step})"))
        assert re.search(rf"\| step {step}/\d+ \(\d+%\) \| eval_loss \d", lines[first - 1]), (
            lines[first - 1])


def test_report_holds_base_and_tuned_answers_losses_and_best_step(with_samples: Job) -> None:
    report = with_samples.report()
    reporter, result = with_samples.reporter, with_samples.result
    eval_losses = reporter.values("eval_loss")
    eval_steps = reporter.steps("eval_loss")

    assert report["steps"] == result.steps
    assert report["eval_loss_before"] == {"step": 0, "eval_loss": eval_losses[0]}
    assert report["eval_loss_after"] == {"step": eval_steps[-1], "eval_loss": eval_losses[-1]}
    assert report["best_step"] == result.best_step is not None
    assert report["best_eval_loss"] == result.best_eval_loss == min(eval_losses)
    samples = report["samples"]
    assert samples["source"] == "validation" and samples["none_because"] is None
    assert samples["tuned_step"] == result.best_step
    assert len(samples["answers"]) == 3
    base_lines = [m.group(0) for m in with_samples.answer_lines() if m.group(2) == "base model"]
    for answer, base_line in zip(samples["answers"], base_lines, strict=True):
        assert answer["prompt"].rstrip().endswith("### Response:"), answer["prompt"]
        assert answer["expected"]
        assert json.dumps(answer["base"], ensure_ascii=False) in base_line
        assert set(answer["by_step"]) == {str(s) for s in eval_steps}
        assert answer["tuned"] == answer["by_step"][str(result.best_step)]
    # With a learning rate this high the tiny model's answers change within a few steps.
    assert any(a["by_step"][str(eval_steps[-1])] != a["base"] for a in samples["answers"])


def test_the_adapter_freshly_initialised_answers_as_the_base_model(with_samples: Job) -> None:
    answers = with_samples.report()["samples"]["answers"]
    assert [a["by_step"]["0"] for a in answers] == [a["base"] for a in answers]


def test_report_is_listed_with_the_job_s_artifacts_and_summarised_in_one_line(
    with_samples: Job,
) -> None:
    names = {artifact.name for artifact in list_artifacts(with_samples.storage, "samples")}
    summary = [line for line in with_samples.reporter.lines if line.startswith("report: ")]

    assert REPORT_FILE in names and "adapter_model.safetensors" in names
    assert len(summary) == 1
    assert re.fullmatch(r"report: eval_loss \d\.\d{4} at step 0 -> \d\.\d{4} at step \d+, best "
                        r"\d\.\d{4} at step \d+ \(adapter kept\); base and tuned answers to 3 "
                        r"validation prompts; in report\.json", summary[0]), summary[0]


def test_sample_prompts_0_yields_no_answers(without_samples: Job) -> None:
    report = without_samples.report()

    assert without_samples.answer_lines() == []
    assert not any(line.startswith("sample ") for line in without_samples.reporter.lines)
    assert report["samples"]["answers"] == []
    assert report["samples"]["none_because"] == "training_config.sample_prompts is 0"
    assert report["eval_loss_before"]["step"] == 0


def test_sample_answers_do_not_change_training(with_samples: Job, without_samples: Job) -> None:
    on, off = with_samples.reporter, without_samples.reporter

    assert on.values("loss") == off.values("loss") and on.values("loss")
    assert on.values("eval_loss") == off.values("eval_loss")
    assert on.values("grad_norm") == off.values("grad_norm")


def test_a_job_without_validation_says_so_in_its_report(
    tmp_path: Path, settings: Settings, make_request: Any,
) -> None:
    request = make_request(data={"data_split_config": {"train": 0.08, "validation": 0.0}},
                           training={"sample_prompts": 3})
    reporter = RecordingReporter()
    result = run_job(request, tmp_path / "work", reporter, settings)
    report = json.loads((result.output_dir / REPORT_FILE).read_text())

    assert "sample answers: none, no validation split" in reporter.lines
    assert report["samples"] == {"source": None, "none_because": "no validation split",
                                 "max_new_tokens": None, "tuned_step": None, "answers": []}
    assert report["eval_loss_before"] is None and report["best_step"] is None
    assert any(line.startswith("report: no evaluation (no validation split); no sample "
                               "answers (no validation split)") for line in reporter.lines)


def _example(ids: list[int], trained_from: int) -> TokenizedExample:
    return TokenizedExample(input_ids=ids, labels=[
        IGNORE_INDEX if i < trained_from else token for i, token in enumerate(ids)])


def test_a_prompt_is_the_unlabelled_prefix_and_train_on_inputs_examples_have_none() -> None:
    examples = [_example([5, 6, 7], 0), _example([1, 2, 3, 4], 2), _example([8, 9, 10], 1)]

    prompts = sample_prompts(examples, 3)

    assert [(p.prompt_ids, p.expected_ids) for p in prompts] == [([1, 2], [3, 4]),
                                                                  ([8], [9, 10])]
    assert sample_prompts(examples, 1)[0].prompt_ids == [1, 2]



def test_batched_left_padded_answers_are_each_prompt_s_own_and_leave_the_mode(
    tiny_model_dir: Path, tiny_tokenizer: Any,
) -> None:
    from shared.schema import PretrainedModelConfig
    from worker.pipeline.model import load_model

    model = load_model(str(tiny_model_dir), PretrainedModelConfig(model_path=str(tiny_model_dir)),
                       allowed_local_dirs=[tiny_model_dir.parent], cpu_bf16="off")
    model.train()
    texts = ["### Instruction: Hi\n### Response:",
             "### Instruction: What is the capital of a rather long country name?\n### Response:"]
    prompts = [SamplePrompt(tiny_tokenizer(text)["input_ids"], []) for text in texts]
    assert len(prompts[0].prompt_ids) < len(prompts[1].prompt_ids)

    together = greedy_answers(model, tiny_tokenizer, prompts, max_new_tokens=12)
    alone = [greedy_answers(model, tiny_tokenizer, [p], max_new_tokens=12)[0] for p in prompts]

    assert together == alone and all(together)
    assert model.training


def test_a_pissa_job_s_base_answers_are_the_original_base_model_s(
    tmp_path: Path, tiny_model_dir: Path, make_request: Any, with_samples: Job,
) -> None:
    # Without the adapter a PiSSA model is the residual base; its base answers must still be
    # those of the base model the plain LoRA job saw.
    pissa = _run(tmp_path, tiny_model_dir, make_request, "pissa",
                 model={"lora_init": "pissa"}, sample_prompts=3)
    answers = pissa.report()["samples"]["answers"]

    # The same start: the residual base plus the initial adapter rounds differently in bf16,
    # which changes a random model's greedy tokens after a few, while the residual
    # base alone answers differently from the first tokens on.
    assert [a["base"][:10] for a in answers] == [
        a["base"][:10] for a in with_samples.report()["samples"]["answers"]]
