"""The causal-LM loss computed only where a label is.

With the loss on the response only, most positions of instruction data carry no label (about
75% for short alpaca-style examples), yet a causal LM projects every position onto the whole
vocabulary, and for a small model that LM head is a large share of the compute (SmolLM2: vocab
49,152 x hidden 576: 28M multiply-adds per position, as many as 8 of its 30 decoder layers'
linear layers). Here the decoder runs as usual, and the LM head and the cross-entropy run only
on the hidden states of labelled positions, a chunk of positions at a time so that the logits
held at once stay small whatever the vocabulary.

The value is the one transformers' `ForCausalLMLoss` gives (transformers/loss/loss_utils.py):
labels shifted left by one, cross-entropy summed in float32 and divided by the number of
labelled positions, or by `num_items_in_batch` when the Trainer counts the labelled tokens of
all gradient-accumulation batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from worker.pipeline.labels import IGNORE_INDEX
from worker.pipeline.token_accuracy import TokenAccuracy, correct_predictions

# About 256 MiB of float32 logits per chunk (1,365 positions at SmolLM2's vocabulary); the
# backward holds that again for their gradient, and a recomputed chunk's activations once more.
LOGITS_CHUNK_BYTES = 256 * 2**20
MIN_CHUNK_POSITIONS = 256

# Causal LMs whose forward is exactly `lm_head(decoder(...).last_hidden_state)` followed by
# `ForCausalLMLoss` in transformers 5 (checked in their modeling files). Others scale or cap
# their logits after the head (Gemma 2/3 final_logit_softcapping, Cohere logit_scale, Granite
# logits_scaling), add auxiliary losses (mixture-of-experts routers) or come from remote code,
# and train with the model's own loss instead.
PLAIN_HEAD_CAUSAL_LMS = frozenset({
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Phi3ForCausalLM",
    "GemmaForCausalLM",
    "Olmo2ForCausalLM",
    "SmolLM3ForCausalLM",
    "Starcoder2ForCausalLM",
    "StableLmForCausalLM",
})


@dataclass(frozen=True)
class CausalLMParts:
    """The two halves of a causal LM the labelled loss calls separately."""

    decoder: nn.Module
    lm_head: nn.Module


def causal_lm_parts(model: nn.Module) -> CausalLMParts | None:
    """The decoder and LM head of `model` (a causal LM, or a peft model around one), or None
    when its logits are more than `lm_head(last hidden state)` and the loss must be the model's
    own.

    The LM head is the module, not its weight: tied to the input embeddings (SmolLM2, the tiny
    test Llama) it is still the plain `nn.Linear` the full forward calls, and with LoRA on it
    the wrapped module adds its adapter as in the full forward.
    """
    # A transformers or peft model: its methods are attributes Module's typing cannot see.
    wrapper: Any = model
    causal_lm: Any = wrapper.get_base_model() if hasattr(wrapper, "get_base_model") else wrapper
    if type(causal_lm).__name__ not in PLAIN_HEAD_CAUSAL_LMS:
        return None
    if getattr(causal_lm.config, "loss_type", None) not in (None, "ForCausalLM"):
        return None
    lm_head = causal_lm.get_output_embeddings()
    if lm_head is None:
        return None
    return CausalLMParts(decoder=causal_lm.get_decoder(), lm_head=lm_head)


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """The label each position predicts: the next position's label, -100 after the last."""
    return functional.pad(labels, (0, 1), value=IGNORE_INDEX)[..., 1:]


def chunk_positions(vocab_size: int) -> int:
    return max(MIN_CHUNK_POSITIONS, LOGITS_CHUNK_BYTES // (4 * vocab_size))


def _summed_cross_entropy(
    lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's summed cross-entropy, and how many of its positions the argmax predicts:
    the logits are there anyway, and their argmax costs a vocabulary's comparisons per
    position against the head's hidden x vocabulary multiply-adds."""
    # float32 as in ForCausalLMLoss: a bf16 head's logits are upcast before the softmax.
    logits = lm_head(hidden).float()
    loss = functional.cross_entropy(logits, targets, reduction="sum")
    return loss, correct_predictions(logits, targets)


def labelled_causal_lm_loss(
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    lm_head: nn.Module,
    *,
    num_items_in_batch: torch.Tensor | int | None = None,
    vocab_size: int | None = None,
    accuracy: TokenAccuracy | None = None,
) -> torch.Tensor:
    """`ForCausalLMLoss(lm_head(hidden_states), labels, num_items_in_batch)` without the
    logits of unlabelled positions.

    `hidden_states` is the decoder's last hidden state (batch, positions, hidden) and `labels`
    the unshifted labels (batch, positions), -100 where no loss is. `accuracy`, when given,
    counts the positions whose argmax is their label.
    """
    targets = shifted_labels(labels).to(hidden_states.device)
    labelled = targets != IGNORE_INDEX
    hidden, targets = hidden_states[labelled], targets[labelled]
    count = hidden.shape[0]
    vocab = vocab_size or getattr(lm_head, "out_features", None)
    if not vocab:
        head_weight: torch.Tensor = lm_head.weight  # type: ignore[assignment]
        vocab = head_weight.shape[0]
    step = chunk_positions(vocab)
    # With several chunks, each chunk's logits would stay alive for the backward; recomputing
    # them there keeps one chunk's at a time. A single chunk has nothing to gain from that.
    recompute = count > step and torch.is_grad_enabled()
    total = hidden.new_zeros((), dtype=torch.float32)
    correct = torch.zeros((), dtype=torch.int64, device=hidden.device)
    # At least one (possibly empty) chunk, so a batch without labels still has a graph.
    for start in range(0, max(count, 1), step):
        hidden_chunk, target_chunk = hidden[start : start + step], targets[start : start + step]
        if recompute:
            part, hits = torch.utils.checkpoint.checkpoint(
                _summed_cross_entropy, lm_head, hidden_chunk, target_chunk, use_reentrant=False
            )
        else:
            part, hits = _summed_cross_entropy(lm_head, hidden_chunk, target_chunk)
        total = total + part
        correct = correct + hits
    if accuracy is not None:
        accuracy.add(correct, count)
    if num_items_in_batch is None:
        # cross_entropy's "mean": NaN for a batch without labels, as in the full computation.
        return total / count
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def decoder_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The batch without the labels, which only the loss reads."""
    return {k: v for k, v in inputs.items() if k != "labels"}
