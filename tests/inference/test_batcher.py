"""The batcher's correctness: a request decoded in a batch with other adapters, the plain
base and other prompt lengths gives the very tokens `generate` gives it alone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from inference.batcher import Engine
from inference.events import Accepted, Delta, Finished
from inference.sampling import SamplingParams
from shared.settings import get_settings
from tests.inference.conftest import arrive_mid_batch, run_submissions

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, seed=None)
PROMPTS = [
    "### Instruction: Name three colors.\n### Response:",
    "Hello",
    "Below is an instruction that describes a task. Write a response that completes it.",
    "### Input: 12 apples and 7 pears",
    "Answer:",
    "The capital of France is",
]


def _completion(model: str, prompt: str, max_tokens: int = 16) -> dict:
    return {"kind": "completion", "model": model, "prompts": [prompt], "tools": None, "n": 1,
            "max_tokens": max_tokens, "sampling": GREEDY, "stop": []}


def _generate_alone(peft_model, tokenizer, adapter: str | None, prompt: str,
                    max_tokens: int, eos_ids: list[int]) -> list[int]:
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    kwargs = dict(max_new_tokens=max_tokens, do_sample=False, eos_token_id=eos_ids,
                  pad_token_id=tokenizer.pad_token_id)
    with torch.inference_mode():
        if adapter is None:
            with peft_model.disable_adapter():
                out = peft_model.generate(input_ids=ids, **kwargs)
        else:
            peft_model.set_adapter(adapter)
            out = peft_model.generate(input_ids=ids, **kwargs)
    return out[0, ids.shape[1]:].tolist()


def test_mixed_adapter_batch_gives_the_tokens_generate_gives_each_request_alone(
        engine_env: Path, tiny_model_dir: Path, stored_adapter: Callable[..., str]) -> None:
    adapters = [stored_adapter(seed) for seed in (1, 2, 3)]
    # Base rows, every adapter, prompts of different lengths (left padding), all in one batch.
    models = [str(tiny_model_dir), adapters[0], adapters[1], adapters[2], str(tiny_model_dir),
              adapters[0]]
    engine = Engine(get_settings())
    try:
        specs = [_completion(m, p) for m, p in zip(models, PROMPTS, strict=True)]
        results = run_submissions(engine, specs)
    finally:
        engine.stop()
    base = engine.store.base(engine.store.resolve(str(tiny_model_dir)).base)
    assert set(base.adapters) == set(adapters)
    eos_ids = sorted(base.eos_ids)
    outputs = []
    for model, prompt, events in zip(models, PROMPTS, results, strict=True):
        assert isinstance(events[0], Accepted), events
        finished = [e for e in events if isinstance(e, Finished)]
        assert len(finished) == 1
        adapter = None if model == str(tiny_model_dir) else model
        expected = _generate_alone(base.model, base.tokenizer, adapter, prompt, 16, eos_ids)
        assert finished[0].token_ids == expected, (model, prompt)
        text = "".join(e.text for e in events if isinstance(e, Delta))
        assert text == base.tokenizer.decode(
            [t for t in expected if t not in eos_ids], skip_special_tokens=True)
        outputs.append(tuple(expected))
    # The adapters do change the output: the same prompt differs between base and adapter.
    assert len(set(outputs)) == len(outputs)


def test_a_batch_holds_at_most_max_batch_size_rows_and_still_answers_everyone(
        engine_env: Path, tiny_model_dir: Path, stored_adapter: Callable[..., str],
        monkeypatch) -> None:
    monkeypatch.setenv("TUNERY_INFERENCE_MAX_BATCH_SIZE", "2")
    get_settings.cache_clear()
    adapter = stored_adapter(4)
    engine = Engine(get_settings())
    sizes: list[int] = []
    decode = engine._decode

    def counting(base, rows):
        sizes.append(len(rows))
        return decode(base, rows)

    engine._decode = counting  # type: ignore[method-assign]
    try:
        results = run_submissions(engine, [_completion(adapter if i % 2 else str(tiny_model_dir),
                                                       PROMPTS[i], 4) for i in range(5)])
    finally:
        engine.stop()
    assert sizes == [2, 2, 1]
    assert all(isinstance(e[-1], Finished) for e in results)


def test_a_cancelled_request_leaves_the_batch_and_the_others_go_on(
        engine_env: Path, tiny_model_dir: Path) -> None:
    import asyncio

    from inference.events import Channel, Submission

    long_request = _completion(str(tiny_model_dir), PROMPTS[0], max_tokens=400)
    engine = Engine(get_settings())
    try:
        # Greedy on this prompt, the tiny model never says EOS within 400 tokens: alone, the
        # request decodes all of them.
        [alone] = run_submissions(engine, [long_request])
        assert alone[-1].completion_tokens == 400 and alone[-1].reason == "length"
        decoded_alone = engine.decoded_tokens

        async def cancel_one() -> list:
            loop = asyncio.get_running_loop()
            cancelled = Submission(channel=Channel(loop), **long_request)
            other = Submission(channel=Channel(loop), **{**long_request, "max_tokens": 300})
            engine.submit(cancelled)
            engine.submit(other)
            while not isinstance(await cancelled.channel.receive(), Delta):
                pass
            cancelled.channel.cancel()
            events = []
            while not events or not isinstance(events[-1], Finished):
                events.append(await asyncio.wait_for(other.channel.receive(), 120))
            return events

        other_events = asyncio.run(cancel_one())
    finally:
        engine.stop()
    assert other_events[-1].completion_tokens == 300
    # The cancelled row stopped long before its 400 tokens; the other decoded its 300.
    assert engine.decoded_tokens - decoded_alone < 300 + 400
    assert engine.running_rows == 0 and engine.waiting_rows == 0


def test_a_request_that_arrives_mid_batch_joins_it_and_both_match_generate(
        engine_env: Path, tiny_model_dir: Path, stored_adapter: Callable[..., str]) -> None:


    adapter = stored_adapter(5)
    first = _completion(str(tiny_model_dir), PROMPTS[2], max_tokens=200)
    second = _completion(adapter, PROMPTS[1], max_tokens=16)
    engine = Engine(get_settings())
    batches: list[int] = []
    decode = engine._decode

    def counting(base, rows):
        batches.append(len(rows))
        return decode(base, rows)

    engine._decode = counting  # type: ignore[method-assign]

    try:
        early_events, late_events = arrive_mid_batch(engine, first, second)
    finally:
        engine.stop()
    assert batches == [1], "the late request joined the running batch"
    base = engine.store.base(engine.store.resolve(str(tiny_model_dir)).base)
    eos_ids = sorted(base.eos_ids)
    for events, spec, name in ((early_events, first, None), (late_events, second, adapter)):
        expected = _generate_alone(base.model, base.tokenizer, name, spec["prompts"][0],
                                   spec["max_tokens"], eos_ids)
        assert events[-1].token_ids == expected, name


def test_a_batch_that_fails_refuses_its_rows_and_the_engine_goes_on(
        engine_env: Path, tiny_model_dir: Path) -> None:
    from inference.events import Refused

    engine = Engine(get_settings())
    forward = engine._forward
    calls = 0

    def fails_once(*args):
        nonlocal calls
        calls += 1
        if calls == 2:  # the first decode step of the first batch
            raise RuntimeError("out of memory (injected)")
        return forward(*args)

    engine._forward = fails_once  # type: ignore[method-assign]
    try:
        [failed] = run_submissions(engine, [_completion(str(tiny_model_dir), PROMPTS[0])])
        assert isinstance(failed[-1], Refused) and failed[-1].error.status == 500
        assert "out of memory" not in failed[-1].error.message  # no internals to the client
        engine._forward = forward  # type: ignore[method-assign]
        [answered] = run_submissions(engine, [_completion(str(tiny_model_dir), PROMPTS[1])])
    finally:
        engine.stop()
    assert isinstance(answered[-1], Finished)


def test_an_adapter_a_running_batch_uses_is_never_evicted_for_a_newcomer(
        engine_env: Path, tiny_model_dir: Path, stored_adapter: Callable[..., str],
        monkeypatch) -> None:


    monkeypatch.setenv("TUNERY_INFERENCE_MAX_ADAPTERS", "1")
    get_settings.cache_clear()
    running, newcomer = stored_adapter(8), stored_adapter(9)
    first = _completion(running, PROMPTS[2], max_tokens=200)
    second = _completion(newcomer, PROMPTS[1], max_tokens=16)
    engine = Engine(get_settings())
    batches: list[set] = []
    decode = engine._decode

    def recording(base, rows):
        batches.append({r.adapter for r in rows})
        return decode(base, rows)

    engine._decode = recording  # type: ignore[method-assign]

    try:
        early_events, late_events = arrive_mid_batch(engine, first, second)
    finally:
        engine.stop()
    # The newcomer waited for the batch (one adapter at most), then the old one made room.
    assert batches == [{running}, {newcomer}]
    assert engine.store.loaded_adapters() == [newcomer]
    base = engine.store.base(engine.store.resolve(str(tiny_model_dir)).base)
    expected = _generate_alone(base.model, base.tokenizer, newcomer, PROMPTS[1], 16,
                               sorted(base.eos_ids))
    assert late_events[-1].token_ids == expected
    assert early_events[-1].completion_tokens == 200
