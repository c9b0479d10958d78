"""The qa suite: questions over a small shipped corpus, answered by searching it (BM25) over turns.

Ids (registered on import):
- `qa:Corpus-v0`: one- and two-hop questions about a made-up kingdom (`data/`); `corpus=` and
  `questions=` point it at your own JSONL files, `max_turns` and `topk` bound the search.
"""

from tidal.envs.qa.env import FORMAT_PENALTY, QAEnv, Question, load_questions, normalize_answer
from tidal.envs.registry import register

__all__ = ["FORMAT_PENALTY", "QAEnv", "Question", "load_questions", "normalize_answer"]

register("qa:Corpus-v0", "tidal.envs.qa.env:QAEnv")
