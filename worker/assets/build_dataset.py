"""Build `alpaca_sample.jsonl`: a deterministic synthetic alpaca-format dataset, and
`chat_sample.jsonl`: the same rows as conversations (`messages`), for chat-mode training that
a chat completion then asks in the same format.

Every answer is computed by the generator and written in one terse house style
(`Answer: 42.`), so a model fine-tuned on it answers visibly differently from its chatty base.
Run `python -m worker.assets.build_dataset` to rewrite the committed files; the output only
changes when this code does.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

DATASET_PATH = Path(__file__).with_name("alpaca_sample.jsonl")
CHAT_DATASET_PATH = Path(__file__).with_name("chat_sample.jsonl")
SEED = 1234
ROWS = 300

Row = dict[str, str]

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Brazil": "Brasilia",
    "Argentina": "Buenos Aires",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Peru": "Lima",
    "India": "New Delhi",
    "Ireland": "Dublin",
    "Austria": "Vienna",
}

PLURALS = {
    "cat": "cats",
    "box": "boxes",
    "city": "cities",
    "child": "children",
    "mouse": "mice",
    "leaf": "leaves",
    "tooth": "teeth",
    "bus": "buses",
    "knife": "knives",
    "person": "people",
    "goose": "geese",
    "baby": "babies",
    "tomato": "tomatoes",
    "sheep": "sheep",
    "woman": "women",
    "dish": "dishes",
}

WORDS = (
    "red",
    "green",
    "blue",
    "river",
    "stone",
    "cloud",
    "quiet",
    "bright",
    "apple",
    "window",
    "garden",
    "paper",
    "lamp",
    "forest",
    "silver",
    "ocean",
    "tiger",
    "bread",
    "music",
    "winter",
)

UNITS = (
    ("kilometers", "meters", 1000),
    ("kilograms", "grams", 1000),
    ("hours", "minutes", 60),
    ("minutes", "seconds", 60),
    ("meters", "centimeters", 100),
    ("days", "hours", 24),
)


def _answer(value: object) -> str:
    return f"Answer: {value}."


def _arithmetic(rng: random.Random) -> Row:
    a, b = rng.randint(2, 99), rng.randint(2, 99)
    op = rng.choice(("+", "-", "*"))
    result = a + b if op == "+" else a - b if op == "-" else a * b
    if rng.random() < 0.5:
        return {"instruction": f"What is {a} {op} {b}?", "input": "", "output": _answer(result)}
    return {
        "instruction": "Compute the value of the expression.",
        "input": f"{a} {op} {b}",
        "output": _answer(result),
    }


def _capital(rng: random.Random) -> Row:
    country = rng.choice(sorted(CAPITALS))
    return {
        "instruction": f"What is the capital of {country}?",
        "input": "",
        "output": _answer(CAPITALS[country]),
    }


def _reverse_words(rng: random.Random) -> Row:
    words = rng.sample(WORDS, rng.randint(3, 5))
    return {
        "instruction": "Reverse the order of the words.",
        "input": " ".join(words),
        "output": _answer(" ".join(reversed(words))),
    }


def _plural(rng: random.Random) -> Row:
    word = rng.choice(sorted(PLURALS))
    return {
        "instruction": f"Give the plural of the word '{word}'.",
        "input": "",
        "output": _answer(PLURALS[word]),
    }


def _convert(rng: random.Random) -> Row:
    big, small, factor = rng.choice(UNITS)
    amount = rng.randint(1, 50)
    return {
        "instruction": f"Convert {amount} {big} to {small}.",
        "input": "",
        "output": _answer(f"{amount * factor} {small}"),
    }


def _sort_numbers(rng: random.Random) -> Row:
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    return {
        "instruction": "Sort the numbers from smallest to largest.",
        "input": ", ".join(map(str, numbers)),
        "output": _answer(", ".join(map(str, sorted(numbers)))),
    }


def _count_letters(rng: random.Random) -> Row:
    word = rng.choice(WORDS)
    return {
        "instruction": f"How many letters are in the word '{word}'?",
        "input": "",
        "output": _answer(len(word)),
    }


GENERATORS: tuple[Callable[[random.Random], Row], ...] = (
    _arithmetic,
    _capital,
    _reverse_words,
    _plural,
    _convert,
    _sort_numbers,
    _count_letters,
)


def build_rows(n: int = ROWS, seed: int = SEED) -> list[Row]:
    """Return `n` rows, the same ones for the same seed, cycling through the task kinds."""
    rng = random.Random(seed)
    return [GENERATORS[i % len(GENERATORS)](rng) for i in range(n)]


def write_dataset(path: Path = DATASET_PATH, n: int = ROWS, seed: int = SEED) -> Path:
    lines = [json.dumps(row, ensure_ascii=False) for row in build_rows(n, seed)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def as_conversation(row: Row) -> dict[str, list[dict[str, str]]]:
    """An alpaca row as a chat: the instruction (and its input, after a blank line) asked by
    the user, the output answered by the assistant."""
    question = row["instruction"] + (f"\n\n{row['input']}" if row["input"] else "")
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": row["output"]}]}


def write_chat_dataset(path: Path = CHAT_DATASET_PATH, n: int = ROWS, seed: int = SEED) -> Path:
    lines = [json.dumps(as_conversation(row), ensure_ascii=False) for row in build_rows(n, seed)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    print(write_dataset())
    print(write_chat_dataset())
