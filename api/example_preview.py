"""The first rows of a dataset as a job would train on them, as the API shows them: the
dataset preview's `examples` and the dry run's.

Text always (prompt and completion apart, or chat turns as `role: content` lines); with a
local model folder also tokens, through the model's own tokenizer and chat template
(`shared.token_preview`), with the tokens the loss applies to and what `cutoff_len` cuts.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from api.schemas import ExampleOut, TokensOut
from shared import datasets, token_preview
from shared.prompt_template import Example


@dataclass(frozen=True)
class RenderedExamples:
    examples: list[ExampleOut]
    # What a message adds about the tokens: where they come from, or why there are none.
    note: str


def render_examples(
    preview: datasets.Preview,
    *,
    model_path: str | None,
    prompt_template: str,
    cutoff_len: int,
    train_on_inputs: bool,
    allowed_local_dirs: Iterable[Path],
) -> RenderedExamples:
    """`preview`'s examples, token by token with a local `model_path`. Raises
    `token_preview.TokenPreviewError` for a model_path the preview cannot read (the caller
    names the field); a hub id gives the text alone and says why."""
    tokenized: list[token_preview.TokenizedRow | None] = [None] * len(preview.examples)
    if model_path is None:
        note = (" The model's chat template, its tokens and what cutoff_len cuts are shown only "
                "with model_path (a local model folder).") if preview.chat else ""
    else:
        try:
            tokenized = list(token_preview.preview_tokens(
                model_path, preview.rows, prompt_template=prompt_template,
                cutoff_len=cutoff_len, train_on_inputs=train_on_inputs,
                allowed_local_dirs=allowed_local_dirs))
            through = ", through the model's chat template" if preview.chat else ""
            note = (f" tokens: as a job on {model_path!r} with cutoff_len {cutoff_len} trains "
                    f"on them{through}.")
        except token_preview.NotLocalModel as exc:
            note = f" No tokens: {exc}."
    examples = [_example_out(e, problem, tokens, cutoff_len)
                for e, problem, tokens in zip(preview.examples, preview.problems, tokenized,
                                              strict=True)]
    return RenderedExamples(examples, note)


def _example_out(example: Example, problem: str | None,
                 tokens: token_preview.TokenizedRow | None, cutoff_len: int) -> ExampleOut:
    """The example's text preview and, with a model, its tokens; its problem is the first of
    the text's, the tokenization's, or being left out for want of a trained token."""
    if tokens is not None and problem is None:
        problem = tokens.problem
        if problem is None and tokens.dropped:
            problem = (f"no token the loss applies to within cutoff_len {cutoff_len}: a job "
                       "leaves this example out")
    return ExampleOut(
        prompt=example.prompt, completion=example.completion, prompt_cut=example.prompt_cut,
        completion_cut=example.completion_cut, problem=problem,
        tokens=TokensOut.of(tokens) if tokens is not None and tokens.problem is None else None,
    )
