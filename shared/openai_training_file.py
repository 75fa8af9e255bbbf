"""A fine-tuning training file checked by OpenAI's rules, when it arrives: which of OpenAI's
per-line formats it is, how many examples it has, and the first line that breaks a rule.

The formats, as OpenAI's API reference defines the per-line training example
(`FineTuneChatRequestInput`, `FineTuneCompletionRequestInput`,
`FineTunePreferenceRequestInput`):

- chat (supervised): `messages`, with optional `tools` and `parallel_tool_calls`. Messages are
  system, user, assistant and tool messages; an assistant message has `content` or
  `tool_calls` and may carry `weight` 0 or 1 (0: not trained).
- prompt_completion (supervised, legacy): exactly `prompt` and `completion`.
- preference (DPO): `input` (`messages`, `tools`, `parallel_tool_calls`), and one assistant
  message in each of `preferred_output` and `non_preferred_output` (also spelled
  `preferred_completion` / `non_preferred_completion`).

Where Tunery is stricter than the schema, the message says why: content parts other than
text (Tunery trains text models), and the deprecated function calling (`functions`,
`function_call`, role `function`), which open models' chat templates do not render.

The first line decides the format; the first problem stops the check. Every walk is
iterative and no message repeats a value longer than a few dozen characters, so a row nested
thousands of levels deep or holding a 100 MB string costs time in proportion to its size and
nothing more. Pure standard library.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard, cast, get_args

__all__ = [
    "INVALID_N_EXAMPLES",
    "INVALID_TRAINING_FILE",
    "INVALID_VALIDATION_FILE",
    "MIN_EXAMPLES",
    "FileProblem",
    "Kind",
    "TrainingFileCheck",
    "TrainingFileChecker",
    "check_training_file",
    "method_mismatch",
    "not_json_lines",
    "validation_file_problem",
]

Kind = Literal["chat", "prompt_completion", "preference"]
Method = Literal["supervised", "dpo"]

INVALID_TRAINING_FILE = "invalid_training_file"
INVALID_N_EXAMPLES = "invalid_n_examples"
INVALID_VALIDATION_FILE = "invalid_validation_file"
_CODES = (INVALID_TRAINING_FILE, INVALID_N_EXAMPLES)
MIN_EXAMPLES = 10
"""OpenAI's least number of examples in a training file."""

ROLES = ("system", "user", "assistant", "tool")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Characters of a value or a key a message quotes; a path longer than this is shortened.
_SHOWN_CHARS = 40
_SHOWN_PATH_CHARS = 200

# OpenAI's names for its formats, as its job errors write them. "fine-tune-chat" is quoted
# from OpenAI's error for a chat file given to a DPO job; the other two follow its pattern.
_FORMAT_NAMES: dict[str, str] = {
    "chat": "fine-tune-chat",
    "prompt_completion": "fine-tune-completion",
    "preference": "fine-tune-preference",
}
_PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output",
                    "preferred_completion", "non_preferred_completion")


@dataclass(frozen=True)
class FileProblem:
    """Why OpenAI's rules refuse the file. `code` is OpenAI's job error code
    (`invalid_training_file` or `invalid_n_examples`); `line` the 1-based line it is about,
    None for the file as a whole."""

    code: str
    message: str
    line: int | None


@dataclass(frozen=True)
class TrainingFileCheck:
    """What checking a training file found: its format (None when its first line has none),
    how many valid examples were read before the check stopped, and the problem, if any."""

    kind: Kind | None
    examples: int
    problem: FileProblem | None

    def to_json(self) -> dict[str, Any]:
        problem = self.problem
        return {
            "kind": self.kind,
            "examples": self.examples,
            "problem": None if problem is None else
            {"code": problem.code, "message": problem.message, "line": problem.line},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainingFileCheck:
        """The check `to_json` wrote; `ValueError` naming the field for anything else."""
        kind = data.get("kind")
        if kind is not None and kind not in get_args(Kind):
            raise ValueError(f"kind must be one of {', '.join(get_args(Kind))} or null, "
                             f"not {_shown(kind)}")
        examples = data.get("examples")
        if not _is_int(examples) or examples < 0:
            raise ValueError(f"examples must be a count, not {_shown(examples)}")
        raw = data.get("problem")
        problem = None
        if raw is not None:
            if not isinstance(raw, Mapping):
                raise ValueError(f"problem must be an object or null, not {_shown(raw)}")
            code, message, line = raw.get("code"), raw.get("message"), raw.get("line")
            if code not in _CODES:
                raise ValueError(f"problem.code must be one of {', '.join(_CODES)}, "
                                 f"not {_shown(code)}")
            if not isinstance(message, str):
                raise ValueError(f"problem.message must be a string, not {_shown(message)}")
            if line is not None and (not _is_int(line) or line < 1):
                raise ValueError(f"problem.line must be a line number or null, not {_shown(line)}")
            problem = FileProblem(code, message, line)
        return cls(cast(Kind | None, kind), examples, problem)


class TrainingFileChecker:
    """`check_training_file` one row at a time, for a reader that already walks the file:
    `add` each row in order, then `result`. Rows after the first problem are not looked at."""

    def __init__(self, *, min_examples: int = MIN_EXAMPLES) -> None:
        self.min_examples = min_examples
        self.kind: Kind | None = None
        self.examples = 0
        self.problem: FileProblem | None = None
        self._line = 0

    def add(self, row: Mapping[str, Any]) -> None:
        if self.problem is not None:
            return
        self._line += 1
        try:
            self._check(row)
        except _Refused as exc:
            self.problem = FileProblem(INVALID_TRAINING_FILE, f"line {self._line}: {exc}",
                                       self._line)
            return
        self.examples += 1

    def result(self) -> TrainingFileCheck:
        problem = self.problem
        if problem is None and self.examples < self.min_examples:
            # OpenAI's own wording for this job error.
            problem = FileProblem(
                INVALID_N_EXAMPLES,
                f"Training file has {self.examples} example(s), but must have at least "
                f"{self.min_examples} examples", None)
        return TrainingFileCheck(self.kind, self.examples, problem)

    def _check(self, row: Mapping[str, Any]) -> None:
        if not isinstance(row, Mapping):
            raise _Refused(f"expected a JSON object, not {_shown(row)}")
        kind = _kind_of(row)
        if self.kind is None:
            if kind is None:
                keys = ", ".join(_shown(k) for k in list(row)[:5]) or "none"
                raise _Refused(
                    "cannot tell the training format: a line has messages (chat), prompt and "
                    "completion (prompt_completion), or input, preferred_output and "
                    f"non_preferred_output (preference); this one has keys {keys}")
            self.kind = kind
        elif kind is not None and kind != self.kind:
            raise _Refused(f"a {kind} example, but line 1 made this a {self.kind} file: every "
                           "line must have the same format")
        _refuse_nul(row)
        _CHECKS[self.kind](row)


def check_training_file(rows: Iterable[Mapping[str, Any]], *,
                        min_examples: int = MIN_EXAMPLES) -> TrainingFileCheck:
    """Check a training file's rows (the parsed JSON object of each line, in order) by
    OpenAI's rules. The first problem stops the check; a file without one but with fewer
    than `min_examples` examples has an `invalid_n_examples` problem."""
    checker = TrainingFileChecker(min_examples=min_examples)
    for row in rows:
        checker.add(row)
        if checker.problem is not None:
            break
    return checker.result()


def method_mismatch(check: TrainingFileCheck, method: Method, *,
                    file_id: str | None = None) -> FileProblem | None:
    """The problem of training with `method` on a file of `check.kind`: a preference file in
    a supervised job, or a chat or prompt_completion file in a DPO job. None when they fit
    (or the file has no format: its check has its own problem). The message is OpenAI's for
    this job error, naming `file_id` when given."""
    if check.kind is None:
        return None
    needed: Method = "dpo" if check.kind == "preference" else "supervised"
    if method == needed:
        return None
    named = f" {file_id}" if file_id else ""
    return FileProblem(
        INVALID_TRAINING_FILE,
        f"Invalid file format. Input file{named} is in the {_FORMAT_NAMES[check.kind]} format, "
        f"but the specified fine-tuning job is not using '{needed}' as the training method "
        f"(provided method={method}).",
        None)


def validation_file_problem(check: TrainingFileCheck, training: TrainingFileCheck, *,
                            file_id: str) -> FileProblem | None:
    """The problem of evaluating a job on the file `check` describes, beside a training file
    that `training` describes: a line that breaks OpenAI's rules, or another format than the
    training file's, whose rendering the validation lines must share. One example is enough:
    `MIN_EXAMPLES` is a floor on what a job trains on, not on what it evaluates. The code is
    OpenAI's for this job error, `invalid_validation_file`."""
    problem = check.problem
    if problem is not None and problem.code != INVALID_N_EXAMPLES:
        return FileProblem(INVALID_VALIDATION_FILE,
                           f"Invalid validation file {file_id}: {problem.message}", problem.line)
    if check.examples == 0:
        return FileProblem(INVALID_VALIDATION_FILE,
                           f"Invalid validation file {file_id}: it has no example", None)
    if check.kind is not None and training.kind is not None and check.kind != training.kind:
        return FileProblem(
            INVALID_VALIDATION_FILE,
            f"Invalid file format. Validation file {file_id} is in the "
            f"{_FORMAT_NAMES[check.kind]} format, but the training file is in the "
            f"{_FORMAT_NAMES[training.kind]} format; both must have the same format.",
            None)
    return None


def not_json_lines(fmt: str) -> TrainingFileCheck:
    """The check of a file that parsed as another format (csv, parquet): OpenAI reads
    training files as JSON lines only."""
    return TrainingFileCheck(None, 0, FileProblem(
        INVALID_TRAINING_FILE,
        f"the training file is a {fmt} file; a fine-tuning training file is JSON lines "
        "(.jsonl): one JSON object, one example, per line", None))


class _Refused(Exception):
    """A line's problem, without the line number."""


def _kind_of(row: Mapping[str, Any]) -> Kind | None:
    if "messages" in row:
        return "chat"
    if any(key in row for key in _PREFERENCE_KEYS):
        return "preference"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    return None


def _check_chat(row: Mapping[str, Any]) -> None:
    for key in row:
        if key == "functions":
            raise _Refused(_deprecated_functions("functions"))
        if key not in ("messages", "tools", "parallel_tool_calls"):
            raise _Refused(f"unknown key {_shown(key)}")
    _check_tool_options(row, "")
    messages = _check_messages(row["messages"], "messages", weights=True)
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise _Refused("no assistant message to train on")
    if all(m.get("weight") == 0 for m in assistant):
        raise _Refused("no assistant message to train on: every assistant message has weight 0")


def _check_prompt_completion(row: Mapping[str, Any]) -> None:
    for key in row:
        if key not in ("prompt", "completion"):
            raise _Refused(f"unknown key {_shown(key)}")
    for key in ("prompt", "completion"):
        if key not in row:
            raise _Refused(f"missing key {_shown(key)}: a prompt_completion line has exactly "
                           "prompt and completion")
        if not isinstance(row[key], str):
            raise _Refused(f"{key} must be a string, not {_shown(row[key])}")


def _check_preference(row: Mapping[str, Any]) -> None:
    for key in row:
        if key not in _PREFERENCE_KEYS:
            raise _Refused(f"unknown key {_shown(key)}")
    if "input" not in row:
        raise _Refused("missing key 'input': a preference line has input, preferred_output "
                       "and non_preferred_output")
    prompt = row["input"]
    if not isinstance(prompt, Mapping):
        raise _Refused(f"input must be an object with messages, not {_shown(prompt)}")
    for key in prompt:
        if key not in ("messages", "tools", "parallel_tool_calls"):
            raise _Refused(f"unknown key {_shown(key)} in input")
    if "messages" not in prompt:
        raise _Refused("missing key 'input.messages'")
    _check_tool_options(prompt, "input.")
    _check_messages(prompt["messages"], "input.messages", weights=False)
    for output, spelled in (("preferred_output", "preferred_completion"),
                            ("non_preferred_output", "non_preferred_completion")):
        if output in row and spelled in row:
            raise _Refused(f"both {output} and {spelled}: they are one field, give one")
        key = output if output in row else spelled
        if key not in row:
            raise _Refused(f"missing key {_shown(output)}")
        value = row[key]
        if not isinstance(value, list) or len(value) != 1:
            raise _Refused(f"{key} must be a list of one assistant message, not "
                           f"{_shown(value)}")
        (message,) = _check_messages(value, key, weights=False)
        if message["role"] != "assistant":
            raise _Refused(f"{key}[0].role must be 'assistant', not {_shown(message['role'])}")


_CHECKS = {"chat": _check_chat, "prompt_completion": _check_prompt_completion,
           "preference": _check_preference}


def _check_tool_options(holder: Mapping[str, Any], where: str) -> None:
    parallel = holder.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise _Refused(f"{where}parallel_tool_calls must be true or false, not "
                       f"{_shown(parallel)}")
    tools = holder.get("tools")
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _Refused(f"{where}tools must be a list of tools, not {_shown(tools)}")
    for i, tool in enumerate(tools):
        path = f"{where}tools[{i}]"
        _only_keys(tool, path, required=("type", "function"), optional=())
        if tool["type"] != "function":
            raise _Refused(f"{path}.type must be 'function', not {_shown(tool['type'])}")
        function = tool["function"]
        _only_keys(function, f"{path}.function", required=("name",),
                   optional=("description", "parameters", "strict"))
        name = function["name"]
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise _Refused(f"{path}.function.name must be 1 to 64 letters, digits, "
                           f"underscores or dashes, not {_shown(name)}")
        _optional_type(function, "description", str, f"{path}.function", "a string")
        _optional_type(function, "parameters", Mapping, f"{path}.function",
                       "a JSON Schema object")
        _optional_type(function, "strict", bool, f"{path}.function", "true or false")


def _check_messages(value: Any, path: str, *, weights: bool) -> list[Mapping[str, Any]]:
    if not isinstance(value, list) or not value:
        raise _Refused(f"{path} must be a non-empty list of messages, not {_shown(value)}")
    for i, message in enumerate(value):
        _check_message(message, f"{path}[{i}]", weights=weights)
    return value


def _check_message(message: Any, path: str, *, weights: bool) -> None:
    if not isinstance(message, Mapping):
        raise _Refused(f"{path} must be a message object, not {_shown(message)}")
    role = message.get("role")
    if role == "function" or message.get("function_call") is not None:
        field = "role 'function'" if role == "function" else "function_call"
        raise _Refused(f"{path}: {_deprecated_functions(field)}")
    if role not in ROLES:
        shown = "missing" if role is None else _shown(role)
        raise _Refused(f"{path}.role {shown} is not one of {', '.join(ROLES)}")
    if role == "assistant":
        _check_assistant(message, path, weights=weights)
        return
    if message.get("weight") is not None:
        raise _Refused(f"{path}.weight is only allowed on assistant messages")
    optional = ("name",) if role in ("system", "user") else ()
    required = ("role", "content", "tool_call_id") if role == "tool" else ("role", "content")
    _only_keys(message, path, required=required, optional=optional)
    _check_content(message["content"], f"{path}.content")
    _optional_type(message, "name", str, path, "a string")
    if role == "tool" and not isinstance(message["tool_call_id"], str):
        raise _Refused(f"{path}.tool_call_id must be a string, not "
                       f"{_shown(message['tool_call_id'])}")


def _check_assistant(message: Mapping[str, Any], path: str, *, weights: bool) -> None:
    for key in ("refusal", "audio"):
        if message.get(key) is not None:
            raise _Refused(f"{path}.{key} is not supported: Tunery trains an assistant "
                           "message's text content and tool_calls")
    optional: tuple[str, ...] = ("content", "name", "tool_calls", "refusal", "audio",
                                 "function_call")
    if weights:
        optional += ("weight",)
    elif "weight" in message:
        raise _Refused(f"{path}.weight is only allowed in chat (supervised) files")
    _only_keys(message, path, required=("role",), optional=optional)
    _optional_type(message, "name", str, path, "a string")
    weight = message.get("weight")
    if weight is not None and not (_is_int(weight) and weight in (0, 1)):
        raise _Refused(f"{path}.weight must be 0 or 1, not {_shown(weight)}")
    calls = message.get("tool_calls")
    if calls is not None:
        _check_tool_calls(calls, f"{path}.tool_calls")
    if message.get("content") is not None:
        _check_content(message["content"], f"{path}.content")
    elif not calls:
        raise _Refused(f"{path} has neither content nor tool_calls")


def _check_tool_calls(calls: Any, path: str) -> None:
    if not isinstance(calls, list) or not calls:
        raise _Refused(f"{path} must be a non-empty list of tool calls, not {_shown(calls)}")
    for i, call in enumerate(calls):
        where = f"{path}[{i}]"
        _only_keys(call, where, required=("id", "type", "function"), optional=())
        if not isinstance(call["id"], str):
            raise _Refused(f"{where}.id must be a string, not {_shown(call['id'])}")
        if call["type"] != "function":
            raise _Refused(f"{where}.type must be 'function', not {_shown(call['type'])}")
        function = call["function"]
        _only_keys(function, f"{where}.function", required=("name", "arguments"), optional=())
        for key in ("name", "arguments"):
            if not isinstance(function[key], str):
                raise _Refused(f"{where}.function.{key} must be a string, not "
                               f"{_shown(function[key])}")


def _check_content(content: Any, path: str) -> None:
    """A string, or a non-empty list of text parts."""
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        raise _Refused(f"{path} must be a string or a list of text parts, not "
                       f"{_shown(content)}")
    for i, part in enumerate(content):
        where = f"{path}[{i}]"
        if not isinstance(part, Mapping):
            raise _Refused(f"{where} must be a content part object, not {_shown(part)}")
        if part.get("type") != "text":
            raise _Refused(f"{where}.type {_shown(part.get('type'))} is not supported: Tunery "
                           "trains text models, so content parts must be of type 'text'")
        _only_keys(part, where, required=("type", "text"), optional=())
        if not isinstance(part["text"], str):
            raise _Refused(f"{where}.text must be a string, not {_shown(part['text'])}")


def _only_keys(value: Any, path: str, *, required: tuple[str, ...],
               optional: tuple[str, ...]) -> None:
    if not isinstance(value, Mapping):
        raise _Refused(f"{path} must be an object, not {_shown(value)}")
    for key in value:
        if key not in required and key not in optional:
            raise _Refused(f"unknown key {_shown(key)} in {path}")
    for key in required:
        if key not in value:
            raise _Refused(f"{path} lacks {_shown(key)}")


def _optional_type(holder: Mapping[str, Any], key: str, kind: type | tuple[type, ...],
                   path: str, described: str) -> None:
    value = holder.get(key)
    if value is not None and not isinstance(value, kind):
        raise _Refused(f"{path}.{key} must be {described}, not {_shown(value)}")


def _deprecated_functions(field: str) -> str:
    return (f"{field} is OpenAI's deprecated function calling, which open models' chat "
            "templates do not render; use tools, tool_calls and role 'tool'")


def _refuse_nul(row: Mapping[str, Any]) -> None:
    """Refuse a NUL character in any key or string of the row, naming where. Iterative: each
    stack entry links to its parent, so the path is built only for the string that has one,
    and no depth of nesting costs more than its size."""
    stack: list[tuple[Any, Any]] = [(row, None)]
    while stack:
        value, where = stack.pop()
        if isinstance(value, str):
            if "\x00" in value:
                raise _Refused(f"{_path(where) or 'the line'} contains a NUL character "
                               "(\\u0000)")
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and "\x00" in key:
                    raise _Refused(f"a key of {_path(where) or 'the line'} contains a NUL "
                                   "character (\\u0000)")
                stack.append((item, (key, where)))
        elif isinstance(value, list | tuple):
            stack.extend((item, (i, where)) for i, item in enumerate(value))


def _path(link: Any) -> str:
    steps: list[Any] = []
    while link is not None:
        step, link = link
        steps.append(step)
    parts = [f"[{step}]" if isinstance(step, int) else f".{step}" for step in reversed(steps)]
    text = "".join(parts)[1:] if parts and not isinstance(steps[-1], int) else "".join(parts)
    if len(text) > _SHOWN_PATH_CHARS:
        half = _SHOWN_PATH_CHARS // 2
        text = f"{text[:half]}…{text[-half:]}"
    return text


def _shown(value: Any) -> str:
    """A short, bounded rendering of a value for a message: strings quoted and cut, containers
    named by kind (never rendered: they may be deep or huge)."""
    if isinstance(value, str):
        return repr(value if len(value) <= _SHOWN_CHARS else value[:_SHOWN_CHARS] + "…")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10**_SHOWN_CHARS else "a very large number"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Mapping):
        return "an object"
    if isinstance(value, list | tuple):
        return "an empty list" if not value else "a list"
    return f"a {type(value).__name__}"


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
