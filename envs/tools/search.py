"""BM25 search over a local corpus (bm25s), and the tool that lets an agent query it.

The index is built once, in memory, and is read-only afterwards, so one index can serve every
concurrent episode. A query returns at most `topk` documents that share at least one term with it;
a query with no known term returns nothing rather than arbitrary documents.
"""

import re
from collections.abc import Iterable
from pathlib import Path

import msgspec

__all__ = ["Document", "SearchIndex", "SearchTool", "load_corpus"]

_SEARCH_TAG = re.compile(r"<search>(.*?)</search>", re.DOTALL)


class Document(msgspec.Struct, frozen=True):
    """One searchable document: a stable id, a title and its text."""

    id: str
    title: str
    text: str


def load_corpus(path: str | Path) -> list[Document]:
    """Documents from a JSONL file, one `{"id", "title", "text"}` object per line."""
    decoder = msgspec.json.Decoder(Document)
    docs = []
    for lineno, line in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            docs.append(decoder.decode(line))
        except msgspec.DecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not a corpus document: {exc}") from exc
    return docs


class SearchIndex:
    """A BM25 index over documents (title and text together), English stopwords removed."""

    def __init__(self, docs: Iterable[Document]):
        try:
            import bm25s
        except ImportError:
            raise ImportError("the search tool needs bm25s: pip install 'tidal[envs]'") from None
        self._bm25s = bm25s
        self.docs = list(docs)
        if not self.docs:
            raise ValueError("SearchIndex needs at least one document")
        texts = [f"{d.title}\n{d.text}" for d in self.docs]
        self._retriever = bm25s.BM25()
        self._retriever.index(self._tokenize(texts), show_progress=False)

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        return self._bm25s.tokenize(texts, stopwords="en", show_progress=False, return_ids=False)

    def search(self, query: str, topk: int = 3) -> list[tuple[Document, float]]:
        """The best `topk` documents for `query` with their scores, best first; only real matches."""
        k = min(max(topk, 1), len(self.docs))
        found = self._retriever.retrieve(self._tokenize([query]), k=k, show_progress=False)
        return [(self.docs[int(i)], float(s)) for i, s in zip(found.documents[0], found.scores[0], strict=True)
                if s > 0]


class SearchTool:
    """Offers a SearchIndex to the agent: `<search>query</search>` in, the top documents out.

    The observation follows GEM's search tool and AgentGym SearchQA: `Doc i(Title: t) text` lines
    inside `<information>` tags.
    """

    name = "search"
    blocking = False

    def __init__(self, index: SearchIndex, topk: int = 3, max_chars_per_doc: int = 600):
        self.index = index
        self.topk = topk
        self.max_chars_per_doc = max_chars_per_doc

    def instruction(self) -> str:
        return (
            "search: look up documents in a local corpus. Write a query between <search> and "
            f"</search>; the top {self.topk} matching documents are returned."
        )

    def parse(self, action: str) -> tuple[str, str] | None:
        m = _SEARCH_TAG.search(action)
        if m is None:
            return None
        return m.group(1).strip(), action[: m.end()]

    def run(self, query: str) -> str:
        if not query:
            return "<information>[empty query: write search terms between <search> and </search>]</information>"
        hits = self.index.search(query, self.topk)
        if not hits:
            return f"<information>No documents match {query!r}.</information>"
        lines = [f"Doc {i}(Title: {d.title}) {d.text[: self.max_chars_per_doc]}" for i, (d, _) in enumerate(hits, 1)]
        return "<information>" + "\n".join(lines) + "</information>"
