"""Greedy answers through the training prompt template, to compare base and adapted models."""

from __future__ import annotations

from typing import Any

import torch

from shared.prompt_template import render_example

ALPACA_TEMPLATE = "### Instruction: {instruction}\n### Input: {input}\n### Response: {output}"


def generate_answer(
    model: Any,
    tokenizer: Any,
    instruction: str,
    template: str = ALPACA_TEMPLATE,
    max_new_tokens: int = 32,
    *,
    input_text: str = "",
) -> str:
    """The model's greedy continuation of the template's prompt part for `instruction`.

    The prompt is the training prompt (everything before the last placeholder, special
    tokens added the same way) without trailing spaces, so an adapter sees the tokens it was
    trained on.
    """
    prompt = render_example({"instruction": instruction, "input": input_text}, template).prompt
    # In training a space before the answer merges into its first token (" Answer"); a
    # trailing space left alone would be a token the model never saw at that position.
    prompt = prompt.rstrip(" ")
    encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)
    encoded = {key: value.to(model.device) for key, value in encoded.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        model.train(was_training)
    new_tokens = output[0, encoded["input_ids"].shape[1] :]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
