"""A task-sized model: a word-level tokenizer over a task's few words and a tiny random Llama.

The default `tidal run` on a CPU must show learning within minutes. A byte-level model spends most
of that time learning to spell, so this builder makes the vocabulary the task itself: the chat
special tokens, the words the env speaks and the moves the agent makes (e.g. the digits 1-8 and
"guess", "-", "higher", "lower", "correct", "invalid" for terse GuessTheNumber with bare moves), plus
[UNK]. A move is then one token; every other token the model may emit is a malformed move the env
penalises, so the full-vocabulary policy the learner scores is exactly the policy that acts (no
top-k or logit mask needed, which the learner would not see).

The chat template is `<|role|> content<|end|>` per message and `<|assistant|>` as generation prompt;
`<|end|>` is also the eos. Decoding joins words with spaces, so the assistant's token decodes to its
word alone and the template extends its previous render exactly (no transcript divergences).

The width, 256, is chosen for the time it costs, not for capacity (64 learns the task as well): at
64 a forward or backward pass costs less than the HTTP, chat-template and scheduling work around it,
so the run measured Python plumbing and the engine used as much CPU as the model server. At 256 the
model's own compute is most of what the server and the trainer do, as it is with a real model on a
GPU, which is the regime asynchronous RL is for (docs/performance.md, learning).

The weights are random: RL learns the format too (a malformed move costs -0.1 and a turn), within the
first few steps. A supervised warm start that made the assistant's token uniform over the moves
first was measured and left out: on GuessTheNumber 1-8 it made learning slower and less reliable
(in 0 of 4 seeds the greedy policy was solving >= 90% by step 120, against 4 of 4 without it).

Invariant: the checkpoint is saved with `save_pretrained` (weights, config, tokenizer.json with its
chat template) and loads by path through the same code as any checkpoint: `from_pretrained` in the
server and trainer, `tidal.engine.chat.ChatTokenizer.load` in the engine.
"""

from pathlib import Path

__all__ = ["build_task_model", "build_task_tokenizer", "CHAT_TEMPLATE", "SPECIAL_TOKENS", "GUESS_WORDS",
           "GUESS_MOVES"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""One message is `<|role|> content<|end|>`; the space belongs to the message, not the generation prompt,
so the model's first token follows `<|assistant|>` directly and decodes (space-joined) to " word"."""

SPECIAL_TOKENS = ("<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
"""pad, end of turn (also the eos), and the three role markers the template writes."""

UNK = "[UNK]"

GUESS_MOVES = tuple(str(d) for d in range(1, 9))
"""The moves of terse GuessTheNumber with low=1, high=8 and moves="bare": one digit token each."""

GUESS_WORDS = (*GUESS_MOVES, "guess", "-", "higher", "lower", "correct", "invalid")
"""Every word terse GuessTheNumber 1-8 writes or reads (envs/games/guess_the_number.py)."""


def build_task_tokenizer(words: list[str] | tuple[str, ...]):
    """A word-level fast tokenizer: SPECIAL_TOKENS, [UNK], then `words` in order (ids follow that order).

    Text splits on whitespace and punctuation, and digits one by one; a word not in `words` is [UNK].
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(dict.fromkeys(words))
    bad = [w for w in words if not w or w != w.strip() or w in SPECIAL_TOKENS or w == UNK]
    if bad:
        raise ValueError(f"build_task_tokenizer: words must be non-empty, without spaces around them, and not "
                         f"{UNK} or a special token; got {bad[:5]}")
    splitter = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)])
    unsplittable = [w for w in words if [p for p, _ in splitter.pre_tokenize_str(w)] != [w]]
    if unsplittable:
        raise ValueError(f"build_task_tokenizer: each word must be one piece of text (letters, or one digit, or "
                         f"one run of punctuation); these would split: {unsplittable[:5]}")
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, UNK, *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = splitter
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", unk_token=UNK,
        additional_special_tokens=list(SPECIAL_TOKENS[2:]), clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_task_model(path: str | Path, *, words: list[str] | tuple[str, ...] = GUESS_WORDS,
                     layers: int = 2, hidden: int = 256, seed: int = 0) -> Path:
    """Write a random-init Llama (`layers` x `hidden`, seed `seed`) over `words` to `path`; return the path.

    Args:
        words: the task's words besides the special tokens (see GUESS_WORDS): what the env writes
            and what the agent may answer.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if layers < 1 or hidden < 4 or hidden % 4:
        raise ValueError(f"build_task_model: layers must be >= 1 and hidden a positive multiple of 4 "
                         f"(4 attention heads), got {layers} and {hidden}")
    path = Path(path)
    tokenizer = build_task_tokenizer(words)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
