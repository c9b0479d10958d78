"""`python -m tidal.engine.build_model BUILDER DIR [KWARGS_JSON]`: the model-building step of `tidal run`.
(`--download REPO_ID`: fetch a hub checkpoint into the Hugging Face cache; the last line is its path.)

Runs in a child process of `tidal run` (the builder imports torch; the parent and the engine need not),
calls BUILDER ("module:function") as function(path, **kwargs) on a temporary directory beside DIR, and
renames it to DIR once the builder returned: DIR exists only complete, so a resumed run reuses it
and a build cut short is started again. Exit code 2 with one line on stderr when it cannot build.
"""

import importlib
import json
import os
import shutil
import sys
from pathlib import Path

__all__ = ["build", "download", "main"]


def build(builder: str, path: Path, kwargs: dict) -> Path:
    """Build into `path` (atomically, see above); an existing `path` is kept as it is."""
    if path.is_dir():
        return path
    module, _, name = builder.partition(":")
    function = getattr(importlib.import_module(module), name)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    function(partial, **kwargs)
    os.replace(partial, path)
    return path


def download(repo_id: str) -> str:
    """The local snapshot of a hub checkpoint (fetched unless cached): what every child loads by path."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--download"] and len(argv) == 2:
        try:
            path = download(argv[1])
        except Exception as exc:  # the hub's errors are many; each is one line here
            print(f"tidal run: model.path {argv[1]!r} is not a directory and could not be fetched from the "
                  f"Hugging Face hub: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2
        print(f"path: {path}", flush=True)
        return 0
    if len(argv) not in (2, 3):
        print("usage: python -m tidal.engine.build_model MODULE:FUNCTION DIR [KWARGS_JSON]", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    builder, path = argv[0], Path(argv[1])
    try:
        kwargs = json.loads(argv[2]) if len(argv) == 3 else {}
        build(builder, path, kwargs)
    except (ImportError, AttributeError, TypeError, ValueError, OSError) as exc:
        print(f"tidal run: model.builder {builder!r} could not build {path}: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2
    print(f"built {path} with {builder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
