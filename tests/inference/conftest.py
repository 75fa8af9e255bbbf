"""The engine on the tiny Llama: an isolated Tunery (local storage) whose allowed directories
hold the model, LoRA adapters made with peft and stored as a job exports them, and a helper
that drives the engine without HTTP."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared import served_models
from shared.settings import get_settings
from shared.storage import storage_from_settings
from worker.assets.random_adapter import build_random_adapter


@pytest.fixture
def engine_env(tunery_env: Path, tiny_model_dir: Path,
               monkeypatch: pytest.MonkeyPatch) -> Path:
    """tunery_env that allows the tiny model's directory and computes in fp32 (the batcher's
    correctness is token identity, which bf16 rounding would blur). Returns the data dir."""
    monkeypatch.setenv("TUNERY_ALLOWED_LOCAL_DIRS",
                       json.dumps([str(tiny_model_dir.parent), str(tunery_env.parent)]))
    monkeypatch.setenv("TUNERY_CPU_BF16", "off")
    get_settings.cache_clear()
    return tunery_env


@pytest.fixture
def stored_adapter(engine_env: Path, tiny_model_dir: Path,
                   tmp_path: Path) -> Callable[..., str]:
    """Make an adapter (`seed`, `r`), store it as job `jobs/{id}/` does; returns its name."""
    storage = storage_from_settings(get_settings())

    def make(seed: int, r: int = 4) -> str:
        job_id = str(uuid.uuid4())
        folder = build_random_adapter(tiny_model_dir, tmp_path / f"adapter-{job_id}", seed, r)
        for file_name, key in served_models.adapter_keys(job_id).items():
            storage.put_file(key, folder / file_name)
        return served_models.adapter_name(job_id)

    return make


@pytest.fixture
def engine_client(engine_env: Path) -> Iterator[Callable[..., Any]]:
    """A factory of TestClients on a fresh engine app (settings read when called), closed at
    the end; the engine runs for the client's lifetime."""
    from fastapi.testclient import TestClient

    from inference.app import create_app

    clients: list[TestClient] = []

    def make() -> TestClient:
        get_settings.cache_clear()
        client = TestClient(create_app())
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def run_submissions(engine: Any, specs: list[dict[str, Any]]) -> list[list[Any]]:
    """Submit every spec (keyword arguments of `Submission` besides the channel) before the
    engine starts (if it has not), so they are admitted together, then start it and collect
    each one's events until its last choice finished or it was refused."""
    from inference.events import Channel, Finished, Refused, Submission

    async def main() -> list[list[Any]]:
        loop = asyncio.get_running_loop()
        submissions = [Submission(channel=Channel(loop), **spec) for spec in specs]
        for submission in submissions:
            engine.submit(submission)
        if not engine.alive:
            engine.start()
        results = []
        for submission in submissions:
            events: list[Any] = []
            choices = len(submission.prompts) * submission.n
            while True:
                event = await asyncio.wait_for(submission.channel.receive(), 120)
                events.append(event)
                if isinstance(event, Refused) or \
                        sum(isinstance(e, Finished) for e in events) == choices:
                    break
            results.append(events)
        return results

    return asyncio.run(main())


def arrive_mid_batch(engine: Any, first: dict[str, Any], second: dict[str, Any]
                     ) -> tuple[list[Any], list[Any]]:
    """Start the engine on `first` alone; once it has decoded a token, submit `second`; collect
    both until they finish. Their events, in that order."""
    from inference.events import Channel, Delta, Finished, Submission

    async def collect(submission: Any, events: list[Any]) -> list[Any]:
        while not events or not isinstance(events[-1], Finished):
            events.append(await asyncio.wait_for(submission.channel.receive(), 120))
        return events

    async def main() -> tuple[list[Any], list[Any]]:
        loop = asyncio.get_running_loop()
        early = Submission(channel=Channel(loop), **first)
        late = Submission(channel=Channel(loop), **second)
        engine.submit(early)
        engine.start()
        early_events: list[Any] = []
        while not any(isinstance(e, Delta) for e in early_events):
            early_events.append(await asyncio.wait_for(early.channel.receive(), 120))
        engine.submit(late)
        done = await asyncio.gather(collect(early, early_events), collect(late, []))
        return done[0], done[1]

    return asyncio.run(main())
