"""Packed batches (`data_config.packing`): the examples of a batch in one row without padding,
each attending only to itself, on CPU through Tunery's attention over the cumulative
sequence lengths the padding-free collator passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from shared.schema import FinetuneRequest
from shared.settings import Settings
from tests.conftest import make_payload
from worker.pipeline import cpu_attention
from worker.pipeline.batching import choose_layout, flattening_collator
from worker.pipeline.labels import IGNORE_INDEX, TokenizedExample
from worker.pipeline.report import RecordingReporter
from worker.pipeline.run import run_job


def _examples(lengths: list[int]) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(5)
    examples = []
    for n in lengths:
        ids = torch.randint(3, 900, (n,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * (n // 3) + ids[n // 3:]
        examples.append(TokenizedExample(input_ids=ids, labels=labels))
    return examples


def _per_token_losses(model: Any, batch: dict[str, Any]) -> torch.Tensor:
    """Losses at the labelled positions of every row, in order."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs).logits
    targets = torch.nn.functional.pad(batch["labels"], (0, 1), value=IGNORE_INDEX)[:, 1:]
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return losses[targets != IGNORE_INDEX]


def _alone(example: TokenizedExample) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.tensor([example.input_ids]),
            "labels": torch.tensor([example.labels])}


def test_a_packed_row_gives_each_example_the_per_token_losses_it_has_alone(
    tiny_lora: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert tiny_lora.config._attn_implementation == cpu_attention.NAME
    seen: list[list[int] | None] = []

    def recorded(query: torch.Tensor, kwargs: dict[str, Any]) -> list[int] | None:
        seen.append(packed_starts(query, kwargs))
        return seen[-1]

    # Watched only: the sequence lengths must reach the attention through the model.
    packed_starts = cpu_attention.packed_starts
    monkeypatch.setattr(cpu_attention, "packed_starts", recorded)
    # Longer than one query block of the CPU attention, to cross its block boundaries too.
    examples = _examples([37, 9, 150, 22, 5])
    packed = flattening_collator()(
        [{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    assert packed["input_ids"].shape == (1, sum(len(e.input_ids) for e in examples))
    assert packed["cu_seq_lens_q"].tolist() == [0, 37, 46, 196, 218, 223]

    together = _per_token_losses(tiny_lora, packed)
    alone = torch.cat([_per_token_losses(tiny_lora, _alone(e)) for e in examples])
    # The collator drops each example's first label, which no position predicts anyway.
    assert together.shape == alone.shape
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=0)
    layers = tiny_lora.config.num_hidden_layers
    assert seen[:layers] == [[0, 37, 46, 196, 218, 223]] * layers


class _GroupedAttention(torch.nn.Module):
    # What SDPA, which takes a one-position example alone, reads from a Llama attention.
    num_key_value_groups = 2


def test_the_cpu_attention_keeps_each_packed_example_to_itself_without_any_mask() -> None:
    # The sequence lengths alone separate the examples: no mask is given here at all.
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(1, 4, 200, 8, generator=generator) for _ in range(3))
    key, value = key[:, :2], value[:, :2]  # two key heads shared by four query heads
    module = _GroupedAttention().eval()
    cuts = torch.tensor([0, 70, 71, 200], dtype=torch.int32)

    packed, _ = cpu_attention.causal_attention(
        module, query, key, value, None, cu_seq_lens_q=cuts, cu_seq_lens_k=cuts)

    for start, end in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
        alone, _ = cpu_attention.causal_attention(
            module, query[:, :, start:end], key[:, :, start:end], value[:, :, start:end], None)
        torch.testing.assert_close(packed[:, start:end], alone, atol=1e-6, rtol=0)
    whole, _ = cpu_attention.causal_attention(module, query, key, value, None)
    assert not torch.allclose(packed[:, 71:], whole[:, 71:], atol=1e-3)


def test_sequence_lengths_that_do_not_cut_the_row_are_refused() -> None:
    query = torch.zeros(1, 2, 10, 4)
    with pytest.raises(ValueError, match="do not cut a row of 10 positions"):
        cpu_attention.causal_attention(torch.nn.Module(), query, query, query, None,
                                       cu_seq_lens_q=torch.tensor([0, 4, 9]))


def test_packing_chooses_the_padding_free_layout_and_false_keeps_padded_batches(
    tiny_lora: Any,
) -> None:
    assert choose_layout(tiny_lora, group_by_length=None, packing=True) == "padding_free"
    assert choose_layout(tiny_lora, group_by_length=False, packing=True) == "padding_free"
    assert choose_layout(tiny_lora, group_by_length=None, packing=False) == "length_buckets"
    assert choose_layout(tiny_lora, group_by_length=False, packing=False) == "fixed_size"
    # Left out, a CPU keeps length-grouped padded batches.
    assert choose_layout(tiny_lora, group_by_length=None, packing=None) == "length_buckets"


@pytest.mark.parametrize(("training", "named"), [
    ({"group_by_length": True}, "training_config.group_by_length"),
    ({"preference_optimization": "DPO"}, "training_config.preference_optimization"),
])
def test_packing_with_what_it_cannot_go_with_is_refused_naming_both_fields(
    training: dict[str, Any], named: str,
) -> None:
    payload = make_payload(data_config={"packing": True}, training_config=training)
    with pytest.raises(ValidationError) as refused:
        FinetuneRequest.model_validate(payload)
    message = str(refused.value)
    assert "data_config.packing" in message and named in message


def test_packing_must_be_a_boolean() -> None:
    with pytest.raises(ValidationError, match="packing"):
        FinetuneRequest.model_validate(make_payload(data_config={"packing": "yes please"}))


def test_a_packed_job_trains_on_rows_without_padding_and_its_loss_falls(
    tmp_path: Path, settings: Settings, make_request: Any,
) -> None:
    request = make_request(
        data={"packing": True, "data_split_config": {"train": 0.16, "validation": 0.0}},
        training={"lr_scheduler_type": "constant", "group_by_length": None,
                  "num_train_epochs": 2},
    )
    reporter = RecordingReporter()

    result = run_job(request, tmp_path / "work", reporter, settings)

    assert any(line.startswith("batches: 4 examples in one row each, without padding")
               for line in reporter.lines), reporter.lines
    # 48 rows / 4 per row = 12 steps an epoch.
    assert result.steps == 24
    assert result.last_loss is not None and result.first_loss is not None
    assert result.last_loss < result.first_loss
