"""Search for the agent: BM25 over a local corpus (bm25s), or a remote retrieval server, behind
one tool that turns `<search>query</search>` into the top documents.

The local index is built once, in memory, and is read-only afterwards, so one index can serve every
concurrent episode. A query returns at most `topk` documents that share at least one term with it;
a query with no known term returns nothing rather than arbitrary documents. `RemoteSearchIndex`
speaks GEM's retrieval protocol (msgpack over HTTP, as gem/tools/search_engine/retrieval_server.py
serves it for Search-R1's e5 index), so a dense retriever on a GPU box plugs in unchanged.
"""

import logging
import re
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import msgspec
import numpy as np
from tidal.envs.answers import clip
from tidal.envs.tools.counters import TOOL_COUNTS
from tidal.envs.tools.tags import first_tagged
from tidal.protocol.errors import TidalError

__all__ = ["Document", "Index", "SearchIndex", "RemoteSearchIndex", "SearchError", "SearchTool", "load_corpus"]

_TOKEN = re.compile(r"(?u)\b\w\w+\b")

MAX_REQUEST_BYTES = 64 << 10
"""Largest query a RemoteSearchIndex sends (the msgpack body): a query is a line of text, so more is
a runaway action, refused before it reaches the server."""
MAX_RESPONSE_BYTES = 8 << 20
"""Largest reply a RemoteSearchIndex reads: top-k passages are kilobytes; a server that sends more
(broken, or hostile) is refused before its reply fills the engine's memory."""


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
    """A BM25 index over documents (title and text together), English stopwords removed.

    Tokens are bm25s's defaults (lower case, runs of two or more word characters, its English
    stopword list), produced here so a query costs one regex and a score lookup rather than
    bm25s's batch machinery (three progress bars per call even when hidden).
    """

    def __init__(self, docs: Iterable[Document]):
        try:
            import bm25s
            from bm25s.stopwords import STOPWORDS_EN
        except ImportError:
            raise ImportError("the search tool needs bm25s: pip install 'tidal[envs]'") from None
        self.docs = list(docs)
        if not self.docs:
            raise ValueError("SearchIndex needs at least one document")
        logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets it to DEBUG at import: one line per index
        self._stopwords = frozenset(STOPWORDS_EN)
        self._retriever = bm25s.BM25()
        self._retriever.index([self._tokens(f"{d.title}\n{d.text}") for d in self.docs], show_progress=False)

    def _tokens(self, text: str) -> list[str]:
        return [t for t in _TOKEN.findall(text.lower()) if t not in self._stopwords]

    def search(self, query: str, topk: int = 3) -> list[tuple[Document, float]]:
        """The best `topk` documents for `query` with their scores, best first; only real matches."""
        ids = self._retriever.get_tokens_ids(self._tokens(query))
        if not ids:
            return []
        scores = self._retriever.get_scores_from_ids(ids)
        best = np.argsort(-scores, kind="stable")[: max(topk, 1)]
        return [(self.docs[int(i)], float(scores[i])) for i in best if scores[i] > 0]


class SearchError(TidalError, ConnectionError):
    """A remote retrieval server could not be reached or answered something that is not a result."""


class _Contents(msgspec.Struct):
    contents: str


class _Hit(msgspec.Struct):
    document: _Contents
    score: float = 0.0


class _Reply(msgspec.Struct):
    result: list[_Hit]


class RemoteSearchIndex:
    """A retrieval server with GEM's protocol: POST msgpack `{"query", "topk", "return_scores"}`,
    answer msgpack `{"result": [{"document": {"contents": "Title\ntext"}, "score"}, ...]}`.

    A request over `max_request_bytes` is not sent, and a reply over `max_response_bytes` is refused
    (by its Content-Length before reading, else after reading one byte past the cap): a SearchError
    naming the cap, counted in `TOOL_COUNTS["search_too_large"]` besides `search_errors`.

    A search waits on the network, so the tool that uses it is `blocking` and runs off the loop.
    """

    blocking = True

    def __init__(self, url: str, timeout_s: float = 5.0, max_request_bytes: int = MAX_REQUEST_BYTES,
                 max_response_bytes: int = MAX_RESPONSE_BYTES):
        if max_request_bytes < 1 or max_response_bytes < 1:
            raise ValueError(f"RemoteSearchIndex caps must be >= 1 byte, got max_request_bytes = "
                             f"{max_request_bytes}, max_response_bytes = {max_response_bytes}")
        self.url, self.timeout_s = url, timeout_s
        self.max_request_bytes, self.max_response_bytes = max_request_bytes, max_response_bytes
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder(_Reply).decode

    def _too_large(self, what: str) -> SearchError:
        TOOL_COUNTS["search_too_large"] += 1
        return SearchError(f"retrieval server {self.url}: {what}")

    def search(self, query: str, topk: int = 3) -> list[tuple[Document, float]]:
        body = self._encode({"query": query, "topk": topk, "return_scores": True})
        if len(body) > self.max_request_bytes:
            raise self._too_large(f"a request of {len(body)} bytes is over max_request_bytes "
                                  f"({self.max_request_bytes}): not sent")
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/msgpack"})
        cap = self.max_response_bytes
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as resp:
                declared = resp.headers.get("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > cap:
                    raise self._too_large(f"a reply of {declared} bytes (Content-Length) is over "
                                          f"max_response_bytes ({cap}): refused unread")
                raw = resp.read(cap + 1)
        except SearchError:
            raise
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise SearchError(f"retrieval server {self.url}: {exc}") from exc
        if len(raw) > cap:
            raise self._too_large(f"a reply of more than max_response_bytes ({cap}) bytes: refused after "
                                  f"{cap + 1} bytes")
        try:
            reply = self._decode(raw)
        except msgspec.DecodeError as exc:
            raise SearchError(f"retrieval server {self.url}: not a result: {exc}") from exc
        hits = []
        for i, hit in enumerate(reply.result[:topk]):
            title, _, text = hit.document.contents.partition("\n")
            hits.append((Document(str(i), title.strip().strip('"'), text.strip()), hit.score))
        return hits


class Index(Protocol):
    """What SearchTool needs: `search(query, topk)`; `blocking` if a search waits on I/O."""

    def search(self, query: str, topk: int = 3) -> list[tuple[Document, float]]: ...


class SearchTool:
    """Offers an index to the agent: `<search>query</search>` in, the top documents out.

    The observation follows GEM's search tool and AgentGym SearchQA: `Doc i(Title: t) text` lines
    inside `<information>` tags; a failed remote search is an observation saying so.
    """

    name = "search"

    def __init__(self, index: Index, topk: int = 3, max_chars_per_doc: int = 600):
        self.index = index
        self.topk = topk
        self.max_chars_per_doc = max_chars_per_doc

    @property
    def blocking(self) -> bool:
        return bool(getattr(self.index, "blocking", False))

    def instruction(self) -> str:
        return (
            "search: look up documents in a document collection. Write a query between <search> and "
            f"</search>; the top {self.topk} matching documents are returned."
        )

    def parse(self, action: str) -> tuple[str, str] | None:
        tagged = first_tagged(action, "search")
        if tagged is None:
            return None
        return tagged[0].strip(), action[: tagged[2]]

    def run(self, query: str) -> str:
        if not query:
            return "<information>[empty query: write search terms between <search> and </search>]</information>"
        TOOL_COUNTS["search_queries"] += 1
        try:
            hits = self.index.search(query, self.topk)
        except SearchError as exc:
            TOOL_COUNTS["search_errors"] += 1
            return f"<information>[search failed: {exc}]</information>"
        if not hits:
            return f"<information>No documents match {clip(query)!r}.</information>"
        lines = [f"Doc {i}(Title: {d.title}) {d.text[: self.max_chars_per_doc]}" for i, (d, _) in enumerate(hits, 1)]
        return "<information>" + "\n".join(lines) + "</information>"
