"""A tiny causal LM and tokenizer built in code and saved like any checkpoint.

Nothing can be downloaded here, so tests and the CPU default run build a 2-layer Llama with random
weights and a byte-level tokenizer, save both with `save_pretrained`, and load them back through the
normal `from_pretrained` path: the same code then loads a real checkpoint on a user's machine.
`tidal model tiny DIR` writes the same checkpoint from the command line (the docs' first runs
serve and train it); it generates noise, fast.
"""

import argparse
import os
import sys
from pathlib import Path

__all__ = ["build_tiny_model", "CHAT_TEMPLATE", "main"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_SPECIAL = ["<|pad|>", "<|bos|>", "<|eos|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer():
    """A byte-level BPE tokenizer with no merges: every byte is a token, plus chat special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(_SPECIAL)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>",
        additional_special_tokens=_SPECIAL[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(path: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0,
                     vocab_size: int = 0) -> Path:
    """Write a random-init Llama (`layers` x `hidden`) and its tokenizer to `path`; return the path.

    `vocab_size` above the tokenizer's pads the embeddings, as large checkpoints do: `tidal serve
    --simulate` draws ids from at least 512, and the model must be able to train on them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), vocab_size), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=4096, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def main(argv: list[str] | None = None) -> int:
    """`tidal model tiny DIR [--layers N --hidden N --seed N]`."""
    parser = argparse.ArgumentParser(prog="tidal model", description="Write model checkpoints for tests and first runs.")
    sub = parser.add_subparsers(dest="kind", required=True)
    tiny = sub.add_parser("tiny", help="a random Llama and a byte tokenizer, a few MB: serves and trains in "
                                       "seconds on a CPU, and generates noise")
    tiny.add_argument("dir", type=Path, help="where to write it (created; must be empty if it exists)")
    tiny.add_argument("--layers", type=int, default=2, help="decoder layers (default 2)")
    tiny.add_argument("--hidden", type=int, default=64, help="hidden size, a multiple of 4 (default 64)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.layers < 1 or args.hidden < 4 or args.hidden % 4:
        parser.error(f"--layers must be >= 1 and --hidden a positive multiple of 4 (4 attention heads), "
                     f"got {args.layers} and {args.hidden}")
    if args.dir.exists() and (not args.dir.is_dir() or any(args.dir.iterdir())):
        print(f"tidal model tiny: {args.dir} exists and is not an empty directory; choose a new one", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # before transformers is imported
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    path = build_tiny_model(args.dir, layers=args.layers, hidden=args.hidden, seed=args.seed)
    print(f"wrote a tiny random model to {path}; serve it with `tidal serve --model {path}`")
    return 0
