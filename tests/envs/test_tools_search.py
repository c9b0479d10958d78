"""BM25 search finds the document a query is about, and the tool formats it for the agent."""

import asyncio

import msgspec
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from tidal.envs.tools import TOOL_COUNTS, Document, RemoteSearchIndex, SearchIndex, SearchTool, load_corpus

DOCS = [
    Document("1", "Paris", "Paris is the capital and largest city of France, on the Seine."),
    Document("2", "Mount Kilimanjaro", "Kilimanjaro is a dormant volcano in Tanzania, the highest in Africa."),
    Document("3", "Python (language)", "Python is a programming language created by Guido van Rossum."),
    Document("4", "Amazon River", "The Amazon in South America is the largest river by discharge volume."),
]


@pytest.fixture(scope="module")
def index():
    return SearchIndex(DOCS)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("capital of France", "1"),
        ("highest volcano in Africa", "2"),
        ("who created the Python programming language", "3"),
        ("largest river South America", "4"),
    ],
)
def test_bm25_ranks_the_right_document_first(index, query, expected):
    hits = index.search(query, topk=2)
    assert hits[0][0].id == expected
    assert all(score > 0 for _, score in hits)


def test_query_without_known_terms_returns_nothing(index):
    assert index.search("zzzz qqqq") == []
    assert index.search("") == []


def test_topk_larger_than_corpus_is_clamped(index):
    assert len(index.search("the largest", topk=50)) <= len(DOCS)


def test_tool_parses_call_and_formats_results(index):
    tool = SearchTool(index, topk=1)
    query, cut = tool.parse("I should look it up. <search> capital of France </search> and then answer")
    assert query == "capital of France" and cut.endswith("</search>")
    assert tool.run(query) == (
        "<information>Doc 1(Title: Paris) Paris is the capital and largest city of France, on the Seine."
        "</information>"
    )
    assert "No documents match" in tool.run("zzzz")
    assert len(tool.run("zzzz " * 100_000)) < 200  # a flood is not echoed back
    assert "empty query" in tool.run("")
    assert tool.parse("no call") is None


def test_load_corpus_reads_jsonl_and_names_bad_lines(tmp_path):
    good = tmp_path / "c.jsonl"
    good.write_text('{"id": "a", "title": "T", "text": "x"}\n\n{"id": "b", "title": "U", "text": "y"}\n')
    assert [d.id for d in load_corpus(good)] == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "title": "T", "text": "x"}\n{"id": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_corpus(bad)


class RetrievalServer:
    """GEM's retrieval protocol over aiohttp, answering from a local BM25 index; `garbage` breaks it."""

    def __init__(self, index: SearchIndex):
        self.index, self.garbage, self.requests = index, False, []

    async def retrieve(self, request):
        body = msgspec.msgpack.decode(await request.read())
        self.requests.append(body)
        if self.garbage:
            return web.Response(body=b"\xc1 not msgpack")
        hits = [{"document": {"id": d.id, "contents": f'"{d.title}"\n{d.text}'}, "score": s}
                for d, s in self.index.search(body["query"], body["topk"])]
        return web.Response(body=msgspec.msgpack.encode({"result": hits}), content_type="application/msgpack")


async def test_remote_index_speaks_gems_retrieval_protocol(index):
    fake = RetrievalServer(index)
    app = web.Application()
    app.router.add_post("/retrieve", fake.retrieve)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    url = str(server.make_url("/retrieve"))
    try:
        remote = SearchTool(RemoteSearchIndex(url, timeout_s=5), topk=2)
        local = SearchTool(index, topk=2)
        assert remote.blocking and not local.blocking
        query = "highest volcano in Africa"
        assert await asyncio.to_thread(remote.run, query) == local.run(query)
        assert fake.requests == [{"query": query, "topk": 2, "return_scores": True}]
        fake.garbage = True
        errors = TOOL_COUNTS["search_errors"]
        assert "[search failed: retrieval server" in await asyncio.to_thread(remote.run, query)
        assert TOOL_COUNTS["search_errors"] == errors + 1
    finally:
        await server.close()
    down = SearchTool(RemoteSearchIndex(url, timeout_s=2))  # the server is closed now
    assert "[search failed: retrieval server" in await asyncio.to_thread(down.run, "anything")


async def test_a_remote_query_or_reply_over_its_cap_is_refused_naming_the_cap(index):
    fake = RetrievalServer(index)

    async def flood(request):  # a reply with no Content-Length: the cap is found while reading
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):
            await response.write(b"x" * 1024)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/retrieve", fake.retrieve)
    app.router.add_post("/flood", flood)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        url = str(server.make_url("/retrieve"))
        before = TOOL_COUNTS.copy()
        small = SearchTool(RemoteSearchIndex(url, timeout_s=5, max_request_bytes=64, max_response_bytes=100))
        refused = await asyncio.to_thread(small.run, "volcano " * 20)
        assert "is over max_request_bytes (64): not sent" in refused and fake.requests == []
        refused = await asyncio.to_thread(small.run, "highest volcano in Africa")
        assert "bytes (Content-Length) is over max_response_bytes (100): refused unread" in refused
        streamed = SearchTool(RemoteSearchIndex(str(server.make_url("/flood")), timeout_s=5, max_response_bytes=4096))
        refused = await asyncio.to_thread(streamed.run, "anything")
        assert "a reply of more than max_response_bytes (4096) bytes: refused after 4097 bytes" in refused
        assert TOOL_COUNTS["search_too_large"] - before["search_too_large"] == 3
        assert TOOL_COUNTS["search_errors"] - before["search_errors"] == 3
        roomy = SearchTool(RemoteSearchIndex(url, timeout_s=5), topk=2)
        assert "Kilimanjaro" in await asyncio.to_thread(roomy.run, "highest volcano in Africa")
    finally:
        await server.close()
    with pytest.raises(ValueError, match="max_request_bytes = 0"):
        RemoteSearchIndex("http://127.0.0.1:1", max_request_bytes=0)
