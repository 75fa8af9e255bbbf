"""The engine's thread: it owns every model, admits submitted requests, and decodes batches.

A batch holds rows (one per choice of a request) of one base model, any mix of that base's
adapters (peft's mixed-adapter forward, `adapter_names` per row) and the plain base. Prompts
are left-padded and prefilled together, then every step decodes one token per row against a
shared KV cache; a row that ends (EOS, a stop string, max_tokens, its client gone) leaves the
batch at once. Requests that arrive while a batch runs are admitted between two steps and
join it (prefilled on their own, `kv_cache.join`) when they are for its base and there is
room, unless rows of another base are waiting: those go first, in the next batch.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from inference import kv_cache, prompts
from inference.events import Accepted, Delta, Finished, Refused, Submission
from inference.kv_cache import BatchState
from inference.models import NO_ADAPTER, LoadedBase, ModelStore
from inference.protocol import FinishReason, RequestRefused, bad_value
from inference.sampling import TokenSampler
from inference.text_stream import TextStream
from shared.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class Row:
    """One sequence being generated: choice `index` of a submission."""

    submission: Submission
    index: int
    base: str
    adapter: str | None
    prompt_ids: list[int]
    max_tokens: int
    sampler: TokenSampler
    text: TextStream
    eos_ids: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    done: bool = False

    @property
    def gone(self) -> bool:
        return self.submission.channel.cancelled


class Engine:
    """Start it, `submit` requests from any thread, `stop` it. `models()` lists what is
    loaded, for `GET /v1/models`; `running_rows`, `waiting_rows` and `decoded_tokens` (since
    start) say how busy it is, for `GET /health`."""

    def __init__(self, settings: Settings, store: ModelStore | None = None) -> None:
        self._limits = settings.inference
        self.store = store if store is not None else ModelStore(settings)
        self._inbox: queue.Queue[Submission | None] = queue.Queue()
        self._waiting: deque[Row] = deque()
        # Submitted while a batch of another base ran: admitted once it ends.
        self._deferred: deque[Submission] = deque()
        # The batch being decoded: its base and rows (None between batches).
        self._running: tuple[LoadedBase, list[Row]] | None = None
        self._thread = threading.Thread(target=self._run, name="tunery-engine", daemon=True)
        self._models: list[tuple[str, str | None]] = []
        self.running_rows = 0
        self.decoded_tokens = 0

    @property
    def waiting_rows(self) -> int:
        return len(self._waiting)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._inbox.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, submission: Submission) -> None:
        self._inbox.put(submission)

    def models(self) -> list[tuple[str, str | None]]:
        """(name, its base or None) of every loaded base and adapter."""
        return list(self._models)

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                try:
                    if not self._collect(block=not self._waiting and not self._deferred):
                        break
                    if self._waiting:
                        self._run_batch(self._next_batch())
                except Exception:  # a bug: the engine must go on answering the others
                    log.exception("the engine's loop failed; going on")

    def _collect(self, block: bool) -> bool:
        """Admit what was deferred (between batches) and what is in the inbox, waiting for
        something first when `block`; False when the engine is told to stop."""
        while self._running is None and self._deferred:
            self._admit(self._deferred.popleft())
        if block:
            first = self._inbox.get()
            if first is None:
                return False
            self._admit(first)
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return True
            if item is None:
                self._inbox.put(None)  # seen again by the loop once the batch ends
                return False
            self._admit(item)

    def _admit(self, submission: Submission) -> None:
        try:
            rows = self._rows_of(submission)
        except RequestRefused as exc:
            submission.channel.send(Refused(exc))
            return
        except Exception:  # a bug or a model that fails in a way nobody foresaw
            log.exception("could not admit a request for %s", submission.model)
            submission.channel.send(Refused(RequestRefused(
                500, "the engine failed to prepare this request", type_="internal_error")))
            return
        finally:
            self._publish_models()
        if rows is None:
            self._deferred.append(submission)
            return
        prompt_tokens = sum(len(r.prompt_ids) for r in rows if r.index % submission.n == 0)
        submission.channel.send(Accepted(prompt_tokens))
        self._waiting.extend(rows)

    def _rows_of(self, submission: Submission) -> list[Row] | None:
        """The submission's rows, its adapter loaded; None when it must wait for the running
        batch to end (another base, or no room for its adapter beside the batch's)."""
        target = self.store.resolve(submission.model)
        if self._running is None:
            base, in_use = self.store.base(target.base), set[str]()
        else:
            base, running_rows = self._running
            in_use = {r.adapter for r in running_rows if r.adapter is not None}
            if target.base != base.source or (
                    target.adapter is not None and target.adapter not in in_use
                    and len(in_use) >= self._limits.max_adapters):
                return None
        if target.adapter is not None:
            self.store.prepare_adapters(base, in_use | {target.adapter})
        param = submission.prompt_param
        if submission.kind == "chat":
            conversation = submission.prompts[0]
            ids = [prompts.chat_prompt_ids(base.tokenizer, conversation, submission.tools)]
        else:
            ids = [prompts.text_prompt_ids(base.tokenizer, text) for text in submission.prompts]
        limit = min(self._limits.max_prompt_tokens, base.context_len - 1)
        rows = []
        for p, prompt_ids in enumerate(ids):
            if len(prompt_ids) > limit:
                raise prompts.context_exceeded(param, len(prompt_ids), limit)
            room = base.context_len - len(prompt_ids)
            max_tokens = submission.max_tokens
            if max_tokens is None:
                max_tokens = min(self._limits.max_tokens, room)
            elif max_tokens > room:
                name = submission.max_tokens_param
                raise bad_value(name, f"the prompt ({len(prompt_ids)} tokens) and {name} "
                                f"({max_tokens}) exceed the model's context of "
                                f"{base.context_len} tokens")
            for choice in range(submission.n):
                index = p * submission.n + choice
                rows.append(Row(
                    submission, index, base.source, target.adapter, prompt_ids, max_tokens,
                    TokenSampler(submission.sampling, choice),
                    TextStream(base.tokenizer, submission.stop), base.eos_ids,
                ))
        return rows

    def _next_batch(self) -> list[Row]:
        """The oldest waiting row's base: its waiting rows in order, up to `max_batch_size`
        and with at most `max_adapters` distinct adapters."""
        return self._take_waiting(self._waiting[0].base, [])

    def _take_waiting(self, source: str, running: list[Row]) -> list[Row]:
        """Waiting rows of base `source` that fit beside the `running` ones, in order."""
        batch: list[Row] = []
        adapters = {r.adapter for r in running if r.adapter is not None}
        left: deque[Row] = deque()
        for row in self._waiting:
            if row.gone:
                continue
            fits = len(running) + len(batch) < self._limits.max_batch_size and \
                row.base == source and (row.adapter is None or row.adapter in adapters
                                        or len(adapters) < self._limits.max_adapters)
            if not fits:
                left.append(row)
                continue
            batch.append(row)
            if row.adapter is not None:
                adapters.add(row.adapter)
        self._waiting = left
        return batch

    def _run_batch(self, rows: list[Row]) -> None:
        if not rows:
            return
        try:
            base = self.store.base(rows[0].base)
            adapters = {r.adapter for r in rows if r.adapter is not None}
            self.store.prepare_adapters(base, adapters)
            self._publish_models()
            self._decode(base, rows)
        except RequestRefused as exc:
            self._refuse_unfinished(rows, exc)
        except Exception:  # out of memory, a bug: these rows fail, the engine goes on
            log.exception("a batch of %d rows on %s failed", len(rows), rows[0].base)
            self._refuse_unfinished(rows, RequestRefused(
                500, "the engine failed while generating", type_="internal_error"))
        finally:
            self._publish_models()

    @staticmethod
    def _refuse_unfinished(rows: list[Row], error: RequestRefused) -> None:
        for row in rows:
            if not row.done:
                row.done = True
                row.submission.channel.send(Refused(error))

    def _decode(self, base: LoadedBase, rows: list[Row]) -> None:
        """Prefill the rows together, then one token per row and step until all ended;
        between steps, rows admitted meanwhile join."""
        state = self._prefill(base, rows)
        # `rows` grows as requests join: the caller's list, so a failure reaches them all.
        self._running = (base, rows)
        self.running_rows = len(rows)
        try:
            while True:
                # One copy to the CPU per step, where every row's sampler draws.
                logits = state.logits.float().cpu()
                tokens = [self._step(row, logits[i]) for i, row in enumerate(rows)]
                keep = [i for i, row in enumerate(rows) if not row.done]
                if not keep:
                    return
                if len(keep) < len(rows):
                    state.keep(torch.tensor(keep, device=base.device))
                    rows[:] = [rows[i] for i in keep]
                    tokens = [tokens[i] for i in keep]
                state.mask = torch.cat([state.mask, state.mask.new_ones(len(rows), 1)], dim=1)
                state.positions = state.positions + 1
                step_ids = torch.tensor(tokens, device=base.device).unsqueeze(1)
                state.logits = self._forward(base, rows, step_ids, state.mask,
                                             state.positions, state.cache)
                self._join_arrivals(base, rows, state)
                self.running_rows = len(rows)
        finally:
            self._running = None
            self.running_rows = 0

    def _join_arrivals(self, base: LoadedBase, rows: list[Row], state: BatchState) -> None:
        """Admit what was submitted since the last step and let the rows that fit join."""
        if not self._collect(block=False) or not kv_cache.can_join(state.cache):
            return
        if any(row.base != base.source for row in self._waiting) or self._deferred:
            return  # another base waits: this batch takes no one more, and ends
        joining = self._take_waiting(base.source, rows)
        if not joining:
            return
        try:
            self.store.prepare_adapters(base, {r.adapter for r in rows + joining
                                               if r.adapter is not None})
        except RequestRefused as exc:
            for row in joining:
                row.submission.channel.send(Refused(exc))
                row.done = True
            return
        rows.extend(joining)  # before the prefill: should it fail, they are refused too
        kv_cache.join(state, self._prefill(base, joining))

    def _prefill(self, base: LoadedBase, rows: list[Row]) -> BatchState:
        """The prompts left-padded into one forward: the state decoding goes on from."""
        from transformers import DynamicCache

        device = base.device
        pad_id = base.tokenizer.pad_token_id
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.tensor([[pad_id] * (width - len(r.prompt_ids)) + r.prompt_ids
                                  for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids)
                             for r in rows], device=device)
        # As `generate` numbers left-padded rows: each row's first real token is position 0.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=base.model.config)
        logits = self._forward(base, rows, input_ids, mask, positions, cache)
        return BatchState(mask, positions[:, -1:], cache, logits)

    @staticmethod
    def _forward(base: LoadedBase, rows: list[Row], input_ids: torch.Tensor,
                 mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        """The rows' next-token logits. Rows of several adapters (or adapters and the plain
        base) go through peft's mixed-batch forward, which runs each LoRA layer once per
        adapter on its rows; rows of one adapter, or of the base alone, take peft's plain
        path, the one `generate` takes, which costs less per step."""
        model = base.model
        inputs = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions,
                  "cache": cache, "use_cache": True, "logits_to_keep": 1}
        adapters = {r.adapter for r in rows}
        if not base.has_peft:
            out = model(**inputs)
        elif adapters == {None}:
            with model.disable_adapter():
                out = model(**inputs)
        elif len(adapters) == 1:
            [adapter] = adapters
            if model.active_adapter != adapter:
                model.set_adapter(adapter)
            out = model(**inputs)
        else:
            out = model(**inputs, adapter_names=[r.adapter or NO_ADAPTER for r in rows])
        return out.logits[:, -1, :]

    def _step(self, row: Row, logits: torch.Tensor) -> int:
        """Choose the row's next token and send what it adds; marks the row done when it
        ends. Returns the token (fed back to the model only if the row goes on)."""
        channel = row.submission.channel
        if row.gone:
            row.done = True
            return 0
        token = row.sampler.next_token(logits)
        row.tokens.append(token)
        self.decoded_tokens += 1
        reason: FinishReason | None = None
        if token in row.eos_ids:
            reason = "stop"
            text = row.text.finish()
        else:
            text = row.text.push(token)
            if row.text.stopped:
                reason = "stop"
            elif len(row.tokens) >= row.max_tokens:
                reason = "length"
                text += row.text.finish()
        if text:
            channel.send(Delta(row.index, text))
        if reason is not None:
            row.done = True
            channel.send(Finished(row.index, reason, row.tokens))
        return token

    def _publish_models(self) -> None:
        adapters = self.store.loaded_adapters()
        self._models = [(b, None) for b in self.store.loaded_bases()] + [
            (name, self.store.adapter_base(name)) for name in adapters]
