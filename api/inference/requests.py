"""OpenAI's chat and completion request bodies, as far as Tunery's engines honour them.

A parameter an engine would silently ignore but a client relies on (tools, logprobs,
penalties, a JSON response format) is refused naming it, so nobody mistakes an answer for what
they asked; bookkeeping parameters with no effect on the answer (`user`, `store`, `metadata`)
are accepted and dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
)

# A request that names no max_tokens gets this many at most (and never more than the
# server's `inference.max_tokens`): a base model that never says EOS stops in bounded time.
DEFAULT_MAX_TOKENS = 256
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 200
MAX_MESSAGES = 1000
# Bytes of text in one request's messages or prompt: the engine counts tokens, this bounds
# what the API reads and forwards before it does.
MAX_TEXT_CHARS = 1 << 20

# Accepted so that clients which send them work unchanged; they change nothing in the answer.
IGNORED_PARAMETERS = ("user", "store", "metadata", "service_tier", "parallel_tool_calls",
                      "prompt_cache_key", "safety_identifier")
# Refused unless left at a value that means "off".
UNSUPPORTED_PARAMETERS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
    "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,), "best_of": (None, 1),
    "echo": (None, False), "suffix": (None, ""),
}
# Fields that never reach an engine: bookkeeping, and what was checked to be off.
NOT_FORWARDED = frozenset(IGNORED_PARAMETERS) | frozenset(UNSUPPORTED_PARAMETERS)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = Field(None, max_length=256, validate_default=True)
    refusal: str | None = None

    @field_validator("tool_call_id")
    @classmethod
    def _answers_a_call(cls, call_id: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("role") == "tool" and not call_id:
            raise ValueError("a message of role 'tool' needs the tool_call_id it answers")
        return call_id

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False
    include_obfuscation: bool | None = None


Stop = str | Annotated[list[str], Field(max_length=MAX_STOP_SEQUENCES)] | None


class _AcceptedUnsupported(BaseModel):
    """The OpenAI parameters this server takes without honouring: ignored ones, and ones it
    refuses unless they are off. Declared as fields so that an error names the parameter."""

    model_config = ConfigDict(extra="forbid")

    user: Any = None
    store: Any = None
    metadata: Any = None
    service_tier: Any = None
    parallel_tool_calls: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    best_of: Any = None
    echo: Any = None
    suffix: Any = None

    @field_validator(*UNSUPPORTED_PARAMETERS)
    @classmethod
    def _off(cls, value: Any, info: ValidationInfo) -> Any:
        assert info.field_name is not None
        if not is_off(value, UNSUPPORTED_PARAMETERS[info.field_name]):
            raise ValueError("not supported by this server's engines; leave it out")
        return value


def is_off(value: Any, off_values: tuple[Any, ...]) -> bool:
    # `0 == False` in Python: a bool is "off" only as a bool, a number only as a number.
    return value is None or any(
        value == off and isinstance(value, bool) == isinstance(off, bool) for off in off_values
    )


class GenerationParameters(_AcceptedUnsupported):
    """What chat and completions share: the model and how to sample."""

    model: str = Field(min_length=1, max_length=512)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int | None = Field(None, ge=1)
    stop: Stop = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: Stop) -> Stop:
        for sequence in [stop] if isinstance(stop, str) else stop or []:
            if not sequence or len(sequence) > MAX_STOP_CHARS:
                raise ValueError(f"each stop sequence must have 1 to {MAX_STOP_CHARS} characters")
        return stop

    @field_validator("stream_options")
    @classmethod
    def _options_need_a_stream(cls, options: StreamOptions | None,
                               info: ValidationInfo) -> StreamOptions | None:
        if options is not None and not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return options

    def engine_body(self, model: str, max_tokens: int) -> dict[str, Any]:
        """The body an engine gets: the engine's name for the model, max_tokens decided."""
        body = self.model_dump(exclude=set(NOT_FORWARDED) | {"max_completion_tokens"},
                               exclude_none=True)
        body.update(model=model, max_tokens=max_tokens)
        return body


class ChatCompletionCreate(GenerationParameters):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1)

    @field_validator("messages")
    @classmethod
    def _bounded_text(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if sum(len(m.text()) for m in messages) > MAX_TEXT_CHARS:
            raise ValueError(f"more than {MAX_TEXT_CHARS} characters of text")
        return messages

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_limit(cls, limit: int | None, info: ValidationInfo) -> int | None:
        if limit is not None and info.data.get("max_tokens") is not None:
            raise ValueError("send max_tokens or max_completion_tokens, not both")
        return limit

    def asked_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionCreate(GenerationParameters):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_MESSAGES)]

    @field_validator("prompt")
    @classmethod
    def _bounded_prompt(cls, prompt: str | list[str]) -> str | list[str]:
        texts = [prompt] if isinstance(prompt, str) else prompt
        if sum(len(text) for text in texts) > MAX_TEXT_CHARS:
            raise ValueError(f"more than {MAX_TEXT_CHARS} characters of text")
        return prompt

    def asked_max_tokens(self) -> int | None:
        return self.max_tokens
