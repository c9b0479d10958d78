"""Where `tidal serve --model X` loads from, decided before torch or transformers are imported.

X is a local checkpoint directory or a Hugging Face hub id (`Qwen/Qwen3-0.6B`). Left to itself,
`from_pretrained` treats anything that is not a directory as a hub id and retries the network for
about a minute before it fails with a long traceback. Here the answer comes at once, in one line:
- X that reads as a path (starts with `/`, `.` or `~`, has more than one `/`, or is not a valid hub
  id) and is not a directory: "no such directory";
- a directory without `config.json` or without tokenizer files: not a saved checkpoint, and what
  writes one (`tidal model tiny DIR`);
- a hub id not in the local cache while `HF_HUB_OFFLINE` is set, or while the hub does not answer
  a TCP connect within `_PROBE_TIMEOUT_S`: says so;
- a hub id in the local cache while the hub is unreachable: loaded from the cache, without the
  retries (`local_files_only`).
Everything raised is a `StartupError`.
"""

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from tidal.protocol.startup import StartupError

__all__ = ["ModelSource", "resolve_model", "TOKENIZER_FILES"]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
"""Any one of these makes a directory hold a tokenizer `AutoTokenizer` can load."""

_PROBE_TIMEOUT_S = 3.0
"""How long a TCP connect to the hub may take before the hub counts as unreachable."""

_HUB_ID = re.compile(r"(?!.*(--|\.\.))[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")
"""A hub repo id: `name` or `org/name`, letters, digits, `-_.`, no `--` or `..` (huggingface_hub's rule)."""

_BUILD_HINT = "`tidal model tiny DIR` writes a tiny test checkpoint"


@dataclass(frozen=True)
class ModelSource:
    """What `from_pretrained` gets: the path or id, and whether to stay off the network."""

    path: str
    local_files_only: bool = False


def _looks_like_path(text: str) -> bool:
    if text.startswith(("/", ".", "~")) or text.count("/") > 1 or (os.sep != "/" and os.sep in text):
        return True
    return _HUB_ID.fullmatch(text) is None


def _check_directory(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise StartupError(f"model directory {path} has no config.json: it is not a saved checkpoint ({_BUILD_HINT})")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise StartupError(f"model directory {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                           "save the tokenizer beside the model with tokenizer.save_pretrained(DIR)")


def _hub_reachable() -> tuple[bool, str]:
    """Whether a TCP connection to the hub's endpoint opens; the endpoint and, if not, why."""
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=_PROBE_TIMEOUT_S):
            return True, constants.ENDPOINT
    except OSError as exc:
        why = exc.strerror or str(exc) or type(exc).__name__
        return False, f"{constants.ENDPOINT} ({why})"


def resolve_model(text: str) -> ModelSource:
    """Decide where the model named `text` comes from, or raise `StartupError` saying why it cannot."""
    local = Path(text).expanduser()
    if local.is_dir():
        _check_directory(local)
        return ModelSource(str(local))
    if local.exists():
        raise StartupError(f"model path {text} is a file; expected a checkpoint directory ({_BUILD_HINT})")
    if _looks_like_path(text):
        raise StartupError(f"model path {text} not found: no such directory ({_BUILD_HINT})")
    from huggingface_hub import constants, try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(text, "config.json"), str)
    not_here = f"model {text!r} is not a local directory, and as a Hugging Face hub id"
    if constants.HF_HUB_OFFLINE:
        if cached:
            return ModelSource(text, local_files_only=True)
        raise StartupError(f"{not_here} it is not in the local cache and HF_HUB_OFFLINE is set")
    reachable, endpoint = _hub_reachable()
    if reachable:
        return ModelSource(text)
    if cached:
        return ModelSource(text, local_files_only=True)
    raise StartupError(f"{not_here} it cannot be downloaded: the hub is unreachable, {endpoint}; "
                       "download it where there is a network, or pass a local directory")
