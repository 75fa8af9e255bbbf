"""The loss at labelled positions only equals the model's own loss, and so do its gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from shared.schema import PretrainedModelConfig
from worker.pipeline import labelled_loss
from worker.pipeline.labelled_loss import causal_lm_parts, decoder_inputs, labelled_causal_lm_loss
from worker.pipeline.labels import IGNORE_INDEX
from worker.pipeline.model import CpuBf16, load_model
from worker.pipeline.token_accuracy import TokenAccuracy
from worker.pipeline.trainer import TuneryTrainer

LOSS_TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}
GRAD_TOLERANCE = {"atol": 1e-5, "rtol": 0.0}


def _load(model_dir: Path, cpu_bf16: CpuBf16 = "off", **config: Any) -> Any:
    # fp32 unless asked: these equalities hold to float32 rounding.
    model = load_model(
        str(model_dir),
        PretrainedModelConfig(model_path=str(model_dir), lora_dropout=0.0, **config),
        allowed_local_dirs=[model_dir.parent],
        cpu_bf16=cpu_bf16,
    )
    # lora_B starts at zero, which makes every lora_A gradient zero.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.train()
    return model


def _batch() -> dict[str, torch.Tensor]:
    """Three right-padded rows: prompt then response, a shorter one, one without labels."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 900, (3, 20), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[0, :8] = IGNORE_INDEX
    labels[1, :5] = IGNORE_INDEX
    labels[1, 14:] = IGNORE_INDEX
    attention_mask[1, 14:] = 0
    input_ids[1, 14:] = 0
    labels[2, :] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _loss_and_grads(model: Any, compute: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss = compute()
    loss.backward()
    grads = {
        name: param.grad.detach().clone()
        for name, param in model.named_parameters()
        if param.requires_grad
    }
    return loss.detach(), grads


def _assert_same(model: Any, full: Any, labelled: Any) -> None:
    expected_loss, expected_grads = _loss_and_grads(model, full)
    loss, grads = _loss_and_grads(model, labelled)
    torch.testing.assert_close(loss, expected_loss, **LOSS_TOLERANCE)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        assert expected_grads[name].norm() > 0, name
        torch.testing.assert_close(grad, expected_grads[name], **GRAD_TOLERANCE)


def _labelled(model: Any, batch: dict[str, torch.Tensor], num_items: Any) -> torch.Tensor:
    parts = causal_lm_parts(model)
    assert parts is not None
    hidden = parts.decoder(**decoder_inputs(batch), use_cache=False).last_hidden_state
    return labelled_causal_lm_loss(
        hidden, batch["labels"], parts.lm_head, num_items_in_batch=num_items
    )


def _full(model: Any, batch: dict[str, torch.Tensor], num_items: Any) -> torch.Tensor:
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    return model(**batch, **extra).loss


# 31 labelled positions in the batch; 40 stands for the count over gradient-accumulation batches.
@pytest.mark.parametrize("num_items", [None, torch.tensor(40)], ids=["mean", "num_items"])
@pytest.mark.parametrize("chunk", [None, 7], ids=["one_chunk", "recomputed_chunks"])
def test_labelled_loss_and_lora_gradients_equal_the_full_computation(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, num_items: Any, chunk: int | None
) -> None:
    if chunk is not None:
        monkeypatch.setattr(labelled_loss, "chunk_positions", lambda vocab_size: chunk)
    model = _load(tiny_model_dir)
    batch = _batch()

    _assert_same(model, lambda: _full(model, batch, num_items),
                 lambda: _labelled(model, batch, num_items))


def test_labelled_loss_equals_the_full_computation_with_qlora(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir, use_quantization=True)
    batch = _batch()
    num_items = torch.tensor(31)

    _assert_same(model, lambda: _full(model, batch, num_items),
                 lambda: _labelled(model, batch, num_items))


def test_labelled_loss_equals_the_full_computation_with_gradient_checkpointing(
    tiny_model_dir: Path,
) -> None:
    model = _load(tiny_model_dir, use_gradient_checkpointing=True)
    batch = _batch()

    _assert_same(model, lambda: _full(model, batch, None), lambda: _labelled(model, batch, None))


def test_lora_on_the_lm_head_is_applied_and_trained(tiny_model_dir: Path) -> None:
    model = _load(tiny_model_dir, lora_target_modules=["q_proj", "lm_head"])
    batch = _batch()

    assert any("lm_head.lora_A" in name for name, _ in model.named_parameters())
    _assert_same(model, lambda: _full(model, batch, None), lambda: _labelled(model, batch, None))


def _trainers(model: Any, tmp_path: Path) -> tuple[Any, Any]:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return TuneryTrainer(model=model, args=args), Trainer(model=model, args=args)


def test_tunery_trainer_loss_equals_the_trainers_own(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = _load(tiny_model_dir)
    tunery, plain = _trainers(model, tmp_path)
    batch, num_items = _batch(), torch.tensor(40)

    assert tunery._labelled_loss_parts(model, batch, return_outputs=False) is not None
    _assert_same(
        model,
        lambda: plain.compute_loss(model, dict(batch), num_items_in_batch=num_items),
        lambda: tunery.compute_loss(model, dict(batch), num_items_in_batch=num_items),
    )
    # Evaluation: the same value under no_grad, with outputs that hold no logits.
    with torch.no_grad():
        expected = plain.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(31))
        loss, outputs = tunery.compute_loss(
            model, dict(batch), return_outputs=True, num_items_in_batch=torch.tensor(31)
        )
    torch.testing.assert_close(loss, expected, **LOSS_TOLERANCE)
    assert set(outputs) == {"loss"}


def test_tunery_trainer_computes_under_the_trainers_mixed_precision(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """accelerate applies bf16 autocast by wrapping the model's forward, which the labelled
    loss does not call: without its own autocast the LoRA layers would multiply in fp32."""
    from transformers import TrainingArguments

    model = _load(tiny_model_dir, cpu_bf16="on")
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True,
                             report_to="none")
    tunery = TuneryTrainer(model=model, args=args)
    lora_outputs: list[torch.dtype] = []
    lora_a = next(m for n, m in model.named_modules() if n.endswith("q_proj.lora_A.default"))
    lora_a.register_forward_hook(lambda module, args, output: lora_outputs.append(output.dtype))

    loss = tunery.compute_loss(model, _batch())

    assert lora_outputs == [torch.bfloat16]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_models_whose_logits_are_more_than_the_head_keep_their_own_loss() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 64,
             "head_dim": 8}
    # Gemma 2 caps its logits with tanh after the head.
    assert causal_lm_parts(Gemma2ForCausalLM(Gemma2Config(**small))) is None
    assert causal_lm_parts(LlamaForCausalLM(LlamaConfig(**small))) is not None


def _half_predicted(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`batch` with every other labelled position's label set to the model's own argmax
    prediction for it, so that its accuracy is neither 0 nor 1 (a random model's would be 0)."""
    with torch.no_grad():
        predicted = model(**decoder_inputs(batch)).logits.argmax(dim=-1)
    labels = batch["labels"].clone()
    rows, positions = torch.nonzero(labels[:, 1:] != IGNORE_INDEX, as_tuple=True)
    for row, position in list(zip(rows.tolist(), positions.tolist(), strict=True))[::2]:
        labels[row, position + 1] = predicted[row, position]
    return {**batch, "labels": labels}


def _accuracy_by_hand(model: Any, batch: dict[str, torch.Tensor]) -> float:
    """From the full logits, position by position: logits at t predict the label at t + 1."""
    with torch.no_grad():
        logits = model(**decoder_inputs(batch)).logits
    hits = total = 0
    for row in range(logits.shape[0]):
        for position in range(logits.shape[1] - 1):
            label = int(batch["labels"][row, position + 1])
            if label != IGNORE_INDEX:
                total += 1
                hits += int(logits[row, position].argmax()) == label
    return hits / total


@pytest.mark.parametrize("chunk", [None, 7], ids=["one_chunk", "recomputed_chunks"])
def test_labelled_loss_counts_the_token_accuracy_of_the_full_logits(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, chunk: int | None
) -> None:
    if chunk is not None:
        monkeypatch.setattr(labelled_loss, "chunk_positions", lambda vocab_size: chunk)
    model = _load(tiny_model_dir)
    batch = _half_predicted(model, _batch())
    expected = _accuracy_by_hand(model, batch)
    parts = causal_lm_parts(model)
    assert parts is not None
    accuracy = TokenAccuracy()

    hidden = parts.decoder(**decoder_inputs(batch), use_cache=False).last_hidden_state
    labelled_causal_lm_loss(hidden, batch["labels"], parts.lm_head,
                            accuracy=accuracy).backward()

    assert 0.3 < expected < 0.7
    assert accuracy.take() == expected
    assert accuracy.take() is None  # counted afresh after each read


@pytest.mark.parametrize("path", ["labelled_loss", "model_loss"])
def test_tunery_trainer_logs_the_token_accuracy_of_training_and_evaluation_apart(
    tiny_model_dir: Path, tmp_path: Path, path: str
) -> None:
    """Both of the trainer's losses count it: its own and, where that cannot be used (here a
    batch with `shift_labels`), the model's, from the model's logits."""
    model = _load(tiny_model_dir)
    tunery, _ = _trainers(model, tmp_path)
    batch = _half_predicted(model, _batch())
    expected = _accuracy_by_hand(model, batch)
    if path == "model_loss":
        batch["shift_labels"] = labelled_loss.shifted_labels(batch["labels"]).contiguous()
    uses_labelled_loss = tunery._labelled_loss_parts(model, batch, return_outputs=False)
    assert (uses_labelled_loss is not None) == (path == "labelled_loss")
    logged: list[dict[str, float]] = []
    tunery.callback_handler.on_log = (  # type: ignore[method-assign]
        lambda args, state, control, logs: logged.append(dict(logs)) or control)

    tunery.compute_loss(model, dict(batch)).backward()
    tunery.compute_loss(model, dict(batch)).backward()
    model.eval()
    with torch.no_grad():
        tunery.compute_loss(model, dict(batch), return_outputs=True)
    tunery.log({"loss": 1.0})
    tunery.log({"eval_loss": 1.0})
    tunery.log({"loss": 1.0})

    assert 0.3 < expected < 0.7
    assert logged[0]["mean_token_accuracy"] == expected
    assert logged[1]["eval_mean_token_accuracy"] == expected
    assert "mean_token_accuracy" not in logged[2]  # nothing trained since the last log


def test_neftune_noise_reaches_the_labelled_loss_in_training_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """The Trainer hooks NEFTune onto the peft model's input embeddings, which the labelled
    loss reaches through the decoder it calls directly."""
    from transformers import TrainingArguments
    from transformers.integrations.neftune import activate_neftune

    model = _load(tiny_model_dir)
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none",
                             neftune_noise_alpha=5.0)
    tunery = TuneryTrainer(model=model, args=args)
    batch = _batch()
    assert tunery._labelled_loss_parts(model, batch, return_outputs=False) is not None
    with torch.no_grad():
        clean = tunery.compute_loss(model, dict(batch))
        activate_neftune(model, tunery.neftune_noise_alpha, tunery.accelerator)  # as train() does
        noisy = [tunery.compute_loss(model, dict(batch)) for _ in range(2)]
        model.eval()
        evaluated = tunery.compute_loss(model, dict(batch))

    assert noisy[0] != clean and noisy[1] != noisy[0]
    assert evaluated == clean
