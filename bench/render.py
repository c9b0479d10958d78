"""`python -m tidal.bench.render`: the event loop's CPU per turn spent on chat-template work, inline and
through the render pool (engine/render_pool.py, `model.render_workers`).

`--episodes` simulated episodes share one event loop, as in the engine. Each starts from a conversation
of ~2.2k tokens (a system prompt, a task and earlier turns: ~20 messages), then plays `--turns` turns:
a simulated generation (a wait drawn uniformly from 0.5-1.5 x `--gen-s`, so the loop sees about
episodes / gen-s turns per second), ~100 generated tokens appended, the turn closed, and a ~50-token observation added through `Transcript.add_messages_async`, so observations
land on conversations of 2.2k-2.8k tokens. The figure is the CPU time of the event loop's own thread
(`time.thread_time`; the workers are other processes) per episode start and per turn. Rows:
- floor: the same harness with the template work stubbed out (a precomputed delta), i.e. what the
  loop spends on the simulation, appending and closing turns: subtract it to get a row's render cost;
- inline: render and encode on the loop (render_workers = 0);
- pool, batch B: `--workers` workers, frames of up to B calls.
`lag_p99_ms` is the 99th percentile of how late a 10 ms sleep wakes during the turns. The cases run
`--rounds` times, interleaved in rotated order so that each meets the same background load, on the
engine's event loop (uvloop; `--loop asyncio` for the standard one); a row gives each figure's median
over rounds.

The checkpoint: `--checkpoint DIR`, or (run from a source tree) a tokenizer-only checkpoint built here
with the chat template tests/fixtures/chat_templates/`--template`.jinja and a byte-level BPE of 4096
ids trained on synthetic words (~4 characters per token, as Qwen's tokenizer on English).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tidal.bench.report import bench_parser, case, emit
from tidal.engine.chat import ChatTokenizer, Transcript
from tidal.engine.render import DeltaRequest, DeltaResult, observation_delta
from tidal.engine.render_pool import MAX_BATCH, RenderPool

__all__ = ["main"]

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "chat_templates"
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PLAIN = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>", "<think>", "</think>"]


def _words(rng: random.Random, n: int) -> list[str]:
    syllables = ["ka", "lo", "mi", "ther", "an", "ing", "es", "or", "tu", "ven", "pra", "sol", "ed", "un", "ri"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def build_checkpoint(root: Path, template: str) -> Path:
    """A tokenizer-only Qwen-style checkpoint (tokenizers only, no transformers)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    vocab = _words(rng, 3000)
    corpus = [" ".join(rng.choice(vocab) for _ in range(40)) + rng.choice([".", ",", "?", "\n"]) for _ in range(4000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=4096, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL])
    tok.add_tokens([AddedToken(s, special=False, normalized=False) for s in PLAIN])
    root.mkdir(parents=True, exist_ok=True)
    tok.save(str(root / "tokenizer.json"))
    (root / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    (root / "chat_template.jinja").write_text((FIXTURES / f"{template}.jinja").read_text())
    ids = [tok.token_to_id(t) for t in ("<|im_end|>", "<|endoftext|>")]
    (root / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return root


class _Text:
    """Synthetic text of a given token count, from the trained words."""

    def __init__(self, tok: ChatTokenizer, seed: int):
        self.tok, self.rng = tok, random.Random(seed)
        self.vocab = _words(random.Random(0), 3000)

    def tokens(self, n: int) -> str:
        words: list[str] = []
        while len(self.tok.encode(" ".join(words))) < n:
            words += [self.rng.choice(self.vocab) for _ in range(max(1, (n - len(words)) // 4))]
        return " ".join(words)


def _history(text: _Text, total: int) -> list[dict]:
    """A conversation of about `total` tokens: system, task, then assistant/user turns (~20 messages)."""
    messages = [{"role": "system", "content": text.tokens(200)}, {"role": "user", "content": text.tokens(400)}]
    while len(text.tok.encode(text.tok.render(messages, add_generation_prompt=True))) < total:
        messages += [{"role": "assistant", "content": text.tokens(100)}, {"role": "user", "content": text.tokens(50)}]
    return messages


class _Stub:
    """The floor: a pool whose every answer is precomputed (no template work at all)."""

    def __init__(self, result: DeltaResult):
        self.result = result

    async def delta(self, request: DeltaRequest) -> DeltaResult:
        return self.result


async def _lag(samples: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t0 = time.perf_counter()
        await asyncio.sleep(0.01)
        samples.append(time.perf_counter() - t0 - 0.01)


async def _run(tok: ChatTokenizer, pool, histories: list[list[dict]], turn: list[int], obs: list[str],
               turns: int, gen_s: float, seed: int) -> dict:
    rng = random.Random(seed)
    stub = isinstance(pool, _Stub)
    cpu = time.thread_time()
    transcripts = await asyncio.gather(*(Transcript.create(tok, h, pool=None if stub else pool) for h in histories))
    create_cpu = time.thread_time() - cpu
    sizes: list[int] = []
    logps = [-0.5] * len(turn)

    async def play(t: Transcript) -> None:
        for k in range(turns):
            await asyncio.sleep(gen_s * rng.uniform(0.5, 1.5))
            t.append_generation(turn, logps, 0)
            t.end_turn()
            sizes.append(len(t))
            await t.add_messages_async([{"role": "user", "content": obs[k]}], pool)

    lags: list[float] = []
    stop = asyncio.Event()
    probe = asyncio.create_task(_lag(lags, stop))
    wall, cpu = time.perf_counter(), time.thread_time()
    await asyncio.gather(*(play(t) for t in transcripts))
    turn_cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    stop.set()
    await probe
    n = len(histories) * turns
    lags.sort()
    return {"create_cpu_us": 1e6 * create_cpu / len(histories), "turn_cpu_us": 1e6 * turn_cpu / n,
            "loop_cpu_s_per_s": turn_cpu / wall, "turns_per_s": n / wall,
            "lag_p99_ms": 1e3 * lags[int(0.99 * (len(lags) - 1))], "lag_max_ms": 1e3 * lags[-1],
            "tokens_at_obs": statistics.mean(sizes)}


def _single_call_us(tok: ChatTokenizer, history: list[dict], turn: list[int], obs: str) -> tuple[float, DeltaResult]:
    """Median cost of one inline observation (render + delta + encode) on the history, and its result."""
    t = Transcript(tok, history)
    t.append_generation(turn, [-0.5] * len(turn), 0)
    t.end_turn()
    request = t._delta_request([{"role": "user", "content": obs}])
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        result = observation_delta(tok, request)
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times), result


async def _bench(args, ckpt: Path) -> tuple[list[dict], dict]:
    tok = ChatTokenizer.load(ckpt)
    text = _Text(tok, 1)
    base = _history(text, args.tokens)
    histories = [[*base[:-1], {"role": "user", "content": f"{base[-1]['content']} {i}"}] for i in range(args.episodes)]
    turn = tok.encode(text.tokens(100)) + [tok.eos_token_ids[0]]
    obs = [text.tokens(50) for _ in range(args.turns)]
    single_us, stub_result = _single_call_us(tok, base, turn, obs[0])
    cases = ["floor", "inline"] + [f"pool, batch {b}" for b in args.batch]
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    for r in range(args.rounds):
        for name in cases[r % len(cases):] + cases[:r % len(cases)]:
            with case("render", f"round {r + 1}: {name}"):
                if name.startswith("pool"):
                    batch = int(name.rsplit(" ", 1)[1])
                    async with RenderPool(str(ckpt), args.workers, max_batch=batch) as pool:
                        row = await _run(tok, pool, histories, turn, obs, args.turns, args.gen_s, r)
                        stats = pool.stats()
                    row["calls_per_frame"] = stats["calls"] / max(1, stats["frames"])
                else:
                    pool = _Stub(stub_result) if name == "floor" else None
                    row = await _run(tok, pool, histories, turn, obs, args.turns, args.gen_s, r)
            runs[name].append(row)
    rows = [{"case": name, **{k: statistics.median(row[k] for row in runs[name]) for k in runs[name][0]}}
            for name in cases]
    floor = rows[0]["turn_cpu_us"]
    for row in rows[1:]:
        row["render_cpu_us"] = row["turn_cpu_us"] - floor
    summary = {"one_inline_observation_us": single_us,
               "conversation_tokens": len(Transcript(tok, base)), "conversation_messages": len(base),
               "chars_per_token": len(tok.render(base, add_generation_prompt=True)) / len(Transcript(tok, base))}
    return rows, summary


def main(argv: list[str] | None = None) -> int:
    p = bench_parser("render", __doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a checkpoint directory (default: one built from --template)")
    p.add_argument("--template", default="qwen2_5", help="a template of tests/fixtures/chat_templates/")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--tokens", type=int, default=2200, help="tokens of each episode's starting conversation")
    p.add_argument("--gen-s", type=float, default=1.0, help="mean simulated generation time of a turn")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, nargs="+", default=[1, MAX_BATCH], help="pool rows: frames of up to B calls")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    args = p.parse_args(argv)
    if args.quick:
        args.episodes, args.turns, args.rounds = 200, 3, 1
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        elif (FIXTURES / f"{args.template}.jinja").is_file():
            ckpt = build_checkpoint(Path(tmp) / args.template, args.template)
        else:
            print(f"tidal bench render: no --checkpoint and no {FIXTURES / args.template}.jinja "
                  "(run from a source tree, or name a checkpoint)", file=sys.stderr)
            return 2
        if args.loop == "uvloop":
            import uvloop

            rows, summary = uvloop.run(_bench(args, ckpt))
        else:
            rows, summary = asyncio.run(_bench(args, ckpt))
    config = {k: v for k, v in vars(args).items() if k != "json_out"}
    emit("render", config, rows, summary, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
