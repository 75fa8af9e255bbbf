"""The blocked causal attention CPU workers train with equals SDPA's, in values and gradients."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from worker.pipeline import cpu_attention
from worker.pipeline.cpu_attention import causal_attention


class _Attention(torch.nn.Module):
    """What transformers' attention functions read from the calling layer."""

    is_causal = True

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = groups


def _qkv(length: int, *, heads: int = 6, kv_heads: int = 2, dtype: torch.dtype = torch.float32,
         seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, heads, length, 16), (3, kv_heads, length, 16), (3, kv_heads, length, 16)]
    # Scores of a few units, as trained attention has: a softmax far from uniform.
    return [(2 * torch.randn(s, generator=generator)).to(dtype).requires_grad_() for s in shapes]


def _padding_mask(lengths: list[int], width: int) -> torch.Tensor:
    """transformers' SDPA mask (causal and padding, True = attend) for right-padded rows."""
    attention = torch.zeros(len(lengths), width, dtype=torch.bool)
    for row, n in enumerate(lengths):
        attention[row, :n] = True
    mask = sdpa_mask(
        batch_size=len(lengths), q_length=width, kv_length=width,
        cache_position=torch.arange(width), attention_mask=attention, allow_is_causal_skip=False,
    )
    assert mask is not None and mask.dtype == torch.bool
    return mask


def _outputs_and_grads(function: Any, tensors: list[torch.Tensor], mask: torch.Tensor | None,
                       groups: int, real: torch.Tensor | None = None) -> list[torch.Tensor]:
    for t in tensors:
        t.grad = None
    out, _ = function(_Attention(groups), *tensors, mask, dropout=0.0, scaling=None)
    # Only real (unpadded) query rows count, as only they carry labels.
    kept = out if real is None else out[real]
    weights = torch.linspace(-1, 1, kept.numel()).view_as(kept)
    (kept.float() * weights).sum().backward()
    return [kept.detach(), *(t.grad.detach() for t in tensors)]  # type: ignore[union-attr]


@pytest.mark.parametrize("length", [1 + 1, 7, 16, 17, 50])
@pytest.mark.parametrize("padded", [False, True])
def test_blocked_attention_equals_sdpa_in_values_and_gradients(
    monkeypatch: pytest.MonkeyPatch, length: int, padded: bool
) -> None:
    # Blocks of 16 query positions: lengths below, at and across block edges.
    monkeypatch.setattr(cpu_attention, "QUERY_BLOCK", 16)
    lengths = [length, max(1, length - 5), max(1, length // 2)] if padded else [length] * 3
    mask = _padding_mask(lengths, length) if padded else None
    real = torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]
    tensors = _qkv(length)

    expected = _outputs_and_grads(sdpa_attention_forward, tensors, mask, 3, real)
    got = _outputs_and_grads(causal_attention, tensors, mask, 3, real)

    for name, e, g in zip(("output", "dq", "dk", "dv"), expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5, msg=name)


def test_key_value_heads_are_shared_by_their_query_group_as_repeat_kv_does() -> None:
    # 6 query heads on 2 key/value heads: heads 0-2 read kv head 0, heads 3-5 kv head 1.
    query, key, value = _qkv(20)
    repeated = [t.repeat_interleave(3, dim=1) for t in (key, value)]

    grouped, _ = causal_attention(_Attention(3), query, key, value, None)
    plain, _ = causal_attention(_Attention(1), query, *repeated, None)

    torch.testing.assert_close(grouped, plain, atol=1e-6, rtol=0)


def test_in_bf16_its_error_stays_near_sdpa_own() -> None:
    """Scores are rounded to bf16 before the softmax (as transformers' eager attention does);
    SDPA's fused kernel keeps them in fp32. The price, against an fp64 reference."""
    tensors = _qkv(200, dtype=torch.float64)
    exact, _ = sdpa_attention_forward(_Attention(3), *tensors, None)
    half = [t.detach().to(torch.bfloat16) for t in tensors]

    ours, _ = causal_attention(_Attention(3), *half, None)
    sdpa, _ = sdpa_attention_forward(_Attention(3), *half, None)

    ours_error = (ours.double() - exact).abs().mean()
    sdpa_error = (sdpa.double() - exact).abs().mean()
    assert ours_error < 2.5 * sdpa_error, (float(ours_error), float(sdpa_error))


@pytest.mark.parametrize(
    "call",
    [
        pytest.param({"softcap": 30.0}, id="softcap"),
        pytest.param({"sliding_window": 8}, id="sliding-window"),
        pytest.param({"is_causal": False}, id="bidirectional"),
        pytest.param({"float_mask": True}, id="float-mask"),
        pytest.param({"cached": True}, id="queries-after-cached-keys"),
    ],
)
def test_anything_but_training_shaped_causal_attention_goes_to_sdpa(
    monkeypatch: pytest.MonkeyPatch, call: dict[str, Any]
) -> None:
    seen: list[str] = []
    real_sdpa = sdpa_attention_forward

    def recording_sdpa(*args: Any, **kwargs: Any) -> Any:
        seen.append("sdpa")
        kwargs.pop("softcap", None)
        kwargs.pop("sliding_window", None)
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(
        "transformers.integrations.sdpa_attention.sdpa_attention_forward", recording_sdpa
    )
    query, key, value = (t.detach() for t in _qkv(12))
    mask: torch.Tensor | None = None
    kwargs = {k: v for k, v in call.items() if k not in ("float_mask", "cached")}
    if call.get("float_mask"):
        mask = torch.zeros(3, 1, 12, 12)
    if call.get("cached"):
        query = query[:, :, -4:]

    causal_attention(_Attention(3), query, key, value, mask, **kwargs)

    assert seen == ["sdpa"]


def _tiny_llama(model_dir: Path, implementation: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=implementation
    )


def test_a_model_on_it_gives_sdpa_logits_and_lora_gradients_on_a_padded_batch(
    tiny_model_dir: Path,
) -> None:
    from peft import LoraConfig, get_peft_model

    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, 900, (3, 40), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 31:] = 0
    attention_mask[2, 9:] = 0
    results = []
    for implementation in ("sdpa", cpu_attention.register()):
        torch.manual_seed(0)
        model = get_peft_model(
            _tiny_llama(tiny_model_dir, implementation),
            LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
        )
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        (logits[attention_mask.bool()].float() ** 2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach()[attention_mask.bool()], grads))

    (sdpa_logits, sdpa_grads), (our_logits, our_grads) = results
    torch.testing.assert_close(our_logits, sdpa_logits, atol=1e-5, rtol=1e-5)
    assert our_grads.keys() == sdpa_grads.keys() and len(our_grads) > 0
    for name, grad in sdpa_grads.items():
        torch.testing.assert_close(our_grads[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_generation_with_a_cache_gives_the_tokens_sdpa_gives(tiny_model_dir: Path) -> None:
    prompt = torch.tensor([[5, 17, 300, 42, 8, 99]])
    tokens = []
    for implementation in ("sdpa", cpu_attention.register()):
        model = _tiny_llama(tiny_model_dir, implementation).eval()
        tokens.append(model.generate(prompt, max_new_tokens=8, do_sample=False))
    assert torch.equal(tokens[0], tokens[1])
