"""The QA environment: answer a question about a small corpus, searching it over several turns.

Each turn the agent either searches (`<search>query</search>`: the top documents come back, reward
0) or answers (`<answer>text</answer>`: reward 1 on an exact match with any reference answer after
SQuAD normalisation, else 0, and the episode ends). Many questions are two-hop: the first search
names the thing the second must look up. An action with neither tag gets `FORMAT_PENALTY` and a
reminder; after `max_turns` turns without an answer the episode is truncated.

The shipped corpus describes a made-up kingdom, so a model cannot answer from memory and has to
search. The BM25 index and the question list are built once per file and shared by every env.
"""

import functools
import random
import re
import string
from pathlib import Path
from typing import Any

import msgspec
from tidal.envs.core import Env, EnvError, Solver, StepResult
from tidal.envs.tools.search import SearchIndex, SearchTool, load_corpus
from tidal.envs.tools.tags import first_tagged

__all__ = ["QAEnv", "Question", "load_questions", "normalize_answer", "FORMAT_PENALTY", "DATA"]

FORMAT_PENALTY = -0.1
"""Reward for a turn that neither searches nor answers (GEM's format-error reward)."""

DATA = Path(__file__).with_name("data")

INSTRUCTIONS = (
    "Answer the question using a search engine over a document collection; do not rely on memory. "
    "Each turn, do exactly one of:\n"
    "- search: <search>your query</search>  (the top documents are returned)\n"
    "- answer: <answer>short answer</answer>  (ends the episode)\n"
    "Questions may need several searches, one fact at a time."
)



class Question(msgspec.Struct, frozen=True):
    """A question, its accepted answers, and the searches (with supporting doc ids) that solve it."""

    id: str
    question: str
    answers: list[str]
    queries: list[str] = []
    support: list[str] = []


def load_questions(path: str | Path) -> list[Question]:
    decoder = msgspec.json.Decoder(Question)
    out = []
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if line.strip():
            try:
                out.append(decoder.decode(line))
            except msgspec.DecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a question: {exc}") from exc
    if not out:
        raise ValueError(f"{path}: no questions")
    return out


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(c for c in text.lower() if c not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


@functools.lru_cache(maxsize=8)
def _index(corpus: Path, mtime_ns: int) -> SearchIndex:
    return SearchIndex(load_corpus(corpus))


@functools.lru_cache(maxsize=8)
def _questions_once(path: Path, mtime_ns: int) -> tuple[Question, ...]:
    return tuple(load_questions(path))


class QAEnv(Env):
    """Multi-turn search-and-answer over a local corpus.

    >>> env = QAEnv()
    >>> obs, _ = env.reset(seed=0)
    >>> solve = env.solver()
    >>> while True:
    ...     obs, reward, terminated, truncated, _ = env.step(solve(obs))
    ...     if terminated or truncated:
    ...         break
    >>> reward
    1.0
    """

    blocking = False
    instructions = INSTRUCTIONS

    def __init__(self, corpus: str | Path = DATA / "corpus.jsonl", questions: str | Path = DATA / "questions.jsonl",
                 max_turns: int = 6, topk: int = 3):
        if max_turns < 1:
            raise ValueError(f"QAEnv max_turns: expected >= 1, got {max_turns}")
        corpus = Path(corpus).resolve()
        self.tool = SearchTool(_index(corpus, corpus.stat().st_mtime_ns), topk=topk)
        resolved = Path(questions).resolve()
        self.questions = _questions_once(resolved, resolved.stat().st_mtime_ns)
        self.max_turns = max_turns
        self.item: Question | None = None
        self.turns = self.searches = 0
        self.done = False

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        super().reset(seed)
        self.item = self.questions[self.rng.randrange(len(self.questions))]
        self.turns = self.searches = 0
        self.done = False
        return f"Question: {self.item.question}", {"question_id": self.item.id}

    def step(self, action: str) -> StepResult:
        if self.item is None:
            raise EnvError("QAEnv.step called before reset")
        if self.done:
            return "The episode is over; call reset.", 0.0, True, False, {}
        self.turns += 1
        out_of_turns = self.turns >= self.max_turns
        found = [(t[1], kind, t[0]) for kind in ("search", "answer") if (t := first_tagged(action, kind)) is not None]
        if not found:
            self.done = out_of_turns
            obs = "No action found: write <search>query</search> to search or <answer>text</answer> to answer."
            return obs, FORMAT_PENALTY, False, out_of_turns, {"format_error": True, "searches": self.searches}
        _, kind, text = min(found)
        text = text.strip()
        if kind == "search":
            self.searches += 1
            self.done = out_of_turns
            obs = self.tool.run(text)
            if out_of_turns:
                obs += "\nNo turns left."
            return obs, 0.0, False, out_of_turns, {"searches": self.searches}
        self.done = True
        correct = normalize_answer(text) in {normalize_answer(a) for a in self.item.answers}
        obs = "Correct." if correct else "Incorrect."
        return obs, float(correct), True, False, {"correct": correct, "searches": self.searches}

    def solver(self) -> Solver | None:
        """Search each stored query in turn, then answer: a multi-turn scripted policy."""
        if self.item is None:
            return None
        plan = [f"<search>{q}</search>" for q in self.item.queries] + [f"<answer>{self.item.answers[0]}</answer>"]
        steps = iter(plan)
        return lambda observation: next(steps, plan[-1])

    def sample_action(self, rng: random.Random) -> str:
        words = self.item.question.split() if self.item is not None else ["capital"]
        if rng.random() < 0.7:
            return f"<search>{' '.join(rng.sample(words, min(3, len(words))))}</search>"
        return f"<answer>{rng.choice(words)}</answer>"
