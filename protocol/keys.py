"""`tidal keys DIR`: CURVE key pairs for the trajectory and status channels across hosts.

Writes, with ZeroMQ's own certificate format (`zmq.auth.create_certificates`):

    DIR/trainer.key, DIR/trainer.key_secret        the trainer's pair
    DIR/engines/NAME.key                           each engine's public key: the trainer's allowed directory
    DIR/NAME.key, DIR/NAME.key_secret              each engine's pair (copy NAME.key_secret to that engine)

and prints the config lines that use them. Secret files are readable by their owner only (0600).
An existing secret file is never overwritten: a key pair in use would be lost with it. Add an engine
later by running again with its name: the trainer's pair is kept, the new engine's public key joins
DIR/engines/, and the trainer admits it at its next handshake without a restart.

Invariant: the trainer's allowed directory holds public keys only, and only the engines'.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

import zmq.auth

__all__ = ["make_keys", "main"]

TRAINER = "trainer"


def _pair(directory: Path, name: str) -> tuple[Path, Path]:
    """(public, secret) files of `name` in `directory`, made when the secret file does not exist yet."""
    secret = directory / f"{name}.key_secret"
    if not secret.exists():
        public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
        os.chmod(secret_file, 0o600)
    return directory / f"{name}.key", secret


def make_keys(directory: str | os.PathLike, engines: list[str]) -> dict[str, tuple[Path, Path]]:
    """Make (or keep) the trainer's pair and one per engine name; returns name -> (public, secret)."""
    root = Path(directory)
    bad = [n for n in engines if n == TRAINER or not n or "/" in n or n.startswith(".")]
    if bad:
        raise ValueError(f"engine names {bad} are not usable file names (or clash with {TRAINER!r})")
    if len(set(engines)) != len(engines):
        raise ValueError(f"engine names must differ, got {engines}")
    allowed = root / "engines"
    allowed.mkdir(parents=True, exist_ok=True)
    out = {TRAINER: _pair(root, TRAINER)}
    for name in engines:
        out[name] = _pair(root, name)
        shutil.copyfile(out[name][0], allowed / f"{name}.key")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tidal keys", description=__doc__.splitlines()[0])
    parser.add_argument("dir", help="directory for the key files (created if missing)")
    parser.add_argument("--engines", type=int, default=1, metavar="N",
                        help="make keys for engine-0 .. engine-(N-1) (default 1)")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="engine names instead of engine-0 ..")
    args = parser.parse_args(argv)
    if args.engines < 1 and not args.names:
        parser.error("--engines must be at least 1")
    names = args.names or [f"engine-{i}" for i in range(args.engines)]
    try:
        made = make_keys(args.dir, names)
    except (ValueError, OSError) as exc:
        print(f"tidal keys: {exc}", file=sys.stderr)
        return 2
    root = Path(args.dir).resolve()
    print(f"# trainer config ([intake]), on the trainer host:\ncurve_secret_key = \"{made[TRAINER][1].resolve()}\"\n"
          f"curve_allowed_dir = \"{root / 'engines'}\"")
    for name in names:
        print(f"# engine {name} ([trainer] section of its config; copy {made[name][1].name} and trainer.key "
              f"to its host):\ncurve_secret_key = \"{made[name][1].resolve()}\"\n"
              f"curve_server_key = \"{made[TRAINER][0].resolve()}\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
