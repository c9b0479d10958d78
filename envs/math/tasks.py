"""Where maths questions come from: a local JSONL/Parquet file, a `datasets` dataset (a hub name
or one saved to disk), or generated from a seeded RNG.

Every generator is a pure function of its `random.Random`, so a task is fixed by the episode seed.
Reference answers are exact (computed with `Fraction`) and written in their simplest form:
an integer, or `p/q` in lowest terms.
"""

import random
from fractions import Fraction
from pathlib import Path
from typing import Any

import msgspec

__all__ = ["MathTask", "load_tasks", "load_dataset_tasks", "arithmetic_task", "word_problem_task", "format_answer", "DEFAULT_PROBLEMS"]

DEFAULT_PROBLEMS = Path(__file__).with_name("data") / "problems.jsonl"
"""A small hand-written problem set shipped with the package."""


class MathTask(msgspec.Struct, frozen=True):
    """One question with its reference answer."""

    question: str
    answer: str
    source: str = ""


def format_answer(value: Fraction) -> str:
    """`7`, `-3` or `7/4`: the canonical spelling of an exact answer."""
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def _reference(raw: object) -> str:
    """A reference answer from a dataset cell; GSM8K-style solutions keep only what follows `####`."""
    text = str(raw)
    return text.rsplit("####", 1)[1].strip() if "####" in text else text.strip()


def load_tasks(path: str | Path, question_key: str = "question", answer_key: str = "answer") -> list[MathTask]:
    """Tasks from a JSONL file (one object per line), a Parquet file (needs pyarrow), or a directory
    written by `datasets.Dataset.save_to_disk` (needs datasets)."""
    path = Path(path)
    if path.is_dir():
        datasets = _import_datasets(path)
        data = datasets.load_from_disk(str(path))
        if isinstance(data, datasets.DatasetDict):
            raise ValueError(f"{path}: a DatasetDict with splits {sorted(data)}; point path at one split's directory")
        rows = data.select_columns(_present(data.column_names, path, question_key, answer_key)).to_list()
    elif path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
        rows = pq.read_table(path, columns=[question_key, answer_key]).to_pylist()
    else:
        rows = []
        for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(msgspec.json.decode(line))
                except msgspec.DecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not JSON: {exc}") from exc
    return _tasks(rows, str(path), path.name, question_key, answer_key)


def load_dataset_tasks(name: str, config: str | None = None, split: str = "train", data_files: Any = None,
                       question_key: str = "question", answer_key: str = "answer") -> list[MathTask]:
    """Tasks from `datasets.load_dataset(name, config, split=split, data_files=data_files)`: a hub
    dataset (e.g. "openai/gsm8k", config "main", where the hub or its cache is reachable) or a
    builder over local files ("json", "parquet", "csv" with `data_files`). GSM8K's "#### 42" answers
    are read as 42."""
    where = f"{name}{':' + config if config else ''}[{split}]"
    datasets = _import_datasets(where)
    data = datasets.load_dataset(name, config, split=split, data_files=data_files)
    rows = data.select_columns(_present(data.column_names, where, question_key, answer_key)).to_list()
    return _tasks(rows, where, where, question_key, answer_key)


def _import_datasets(what: object):
    try:
        import datasets
    except ImportError:
        raise ImportError(f"reading {what} needs the datasets package: pip install datasets") from None
    return datasets


def _present(columns: list[str], where: object, *keys: str) -> list[str]:
    missing = [k for k in keys if k not in columns]
    if missing:
        raise ValueError(f"{where}: expected keys {keys[0]!r} and {keys[1]!r}, the columns are {columns}")
    return list(keys)


def _tasks(rows: list, where: str, source: str, question_key: str, answer_key: str) -> list[MathTask]:
    tasks = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or question_key not in row or answer_key not in row:
            raise ValueError(f"{where}: row {i}: expected keys {question_key!r} and {answer_key!r}")
        tasks.append(MathTask(str(row[question_key]), _reference(row[answer_key]), f"{source}:{i}"))
    if not tasks:
        raise ValueError(f"{where}: no tasks")
    return tasks


def _expression(rng: random.Random, depth: int, max_value: int) -> tuple[str, Fraction]:
    if depth == 0:
        n = rng.randint(1, max_value)
        return str(n), Fraction(n)
    op = rng.choice("+-*/")
    left, a = _expression(rng, rng.randint(0, depth - 1), max_value)
    right, b = _expression(rng, depth - 1, max_value)
    if op == "/" and b == 0:
        op = "+"
    value = {"+": a + b, "-": a - b, "*": a * b, "/": a / b if b else a}[op]
    return f"({left} {op} {right})", value


def arithmetic_task(rng: random.Random, depth: int = 2, max_value: int = 20) -> MathTask:
    """An expression over +, -, *, / with `depth` levels of operators; the answer may be a fraction."""
    text, value = _expression(rng, depth, max_value)
    if text.startswith("(") and text.endswith(")"):
        text = text[1:-1]
    return MathTask(f"Compute {text}. Give the exact value (a fraction if it is not an integer).",
                    format_answer(value), "arithmetic")


_NAMES = ("Ada", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Ines", "Jonas")
_ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "shells")


def _shopping(rng: random.Random) -> MathTask:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    start, bags, per_bag, given = rng.randint(3, 30), rng.randint(2, 6), rng.randint(2, 12), rng.randint(1, 10)
    q = (f"{name} has {start} {item}. {name} buys {bags} bags with {per_bag} {item} in each bag, "
         f"then gives {given} {item} to a friend. How many {item} does {name} have now?")
    return MathTask(q, str(start + bags * per_bag - given), "word:shopping")


def _sharing(rng: random.Random) -> MathTask:
    name, friends, pizzas = rng.choice(_NAMES), rng.randint(2, 9), rng.randint(1, 15)
    q = (f"{name} shares {pizzas} pizzas equally among {friends} friends. How many pizzas does each "
         "friend get? Answer with a number or a fraction.")
    return MathTask(q, format_answer(Fraction(pizzas, friends)), "word:sharing")


def _speed(rng: random.Random) -> MathTask:
    name, speed, hours, minutes = rng.choice(_NAMES), rng.randint(3, 90), rng.randint(1, 5), rng.choice((0, 15, 30, 45))
    q = (f"{name} travels at a constant {speed} km per hour for {hours} hours and {minutes} minutes. "
         "How many kilometres does that make?")
    return MathTask(q, format_answer(speed * (hours + Fraction(minutes, 60))), "word:speed")


def _ages(rng: random.Random) -> MathTask:
    a, b = rng.sample(_NAMES, 2)
    age_b, diff, years = rng.randint(2, 40), rng.randint(1, 30), rng.randint(1, 20)
    q = (f"{a} is {diff} years older than {b}. {b} is {age_b} years old. "
         f"How old will {a} be in {years} years?")
    return MathTask(q, str(age_b + diff + years), "word:ages")


def _discount(rng: random.Random) -> MathTask:
    price, pct, qty = rng.randint(2, 200), rng.choice((10, 20, 25, 50, 75)), rng.randint(1, 6)
    q = (f"A shirt costs ${price}. It is on sale for {pct}% off. How many dollars do {qty} shirts cost "
         "at the sale price?")
    return MathTask(q, format_answer(qty * price * Fraction(100 - pct, 100)), "word:discount")


_WORD_PROBLEMS = (_shopping, _sharing, _speed, _ages, _discount)


def word_problem_task(rng: random.Random) -> MathTask:
    """A short templated word problem (shopping, sharing, speed, ages, discounts)."""
    return rng.choice(_WORD_PROBLEMS)(rng)
