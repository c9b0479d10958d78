"""protocol/startup.py: a start-up failure is one line naming what and why, exit 2; --debug adds the traceback."""

import socket

import pytest
from tidal.protocol.errors import ConfigError
from tidal.protocol.startup import EXIT_STARTUP, StartupError, reason, run_main, starting


def test_reasons_are_one_readable_line(tmp_path):
    with socket.socket() as taken, socket.socket() as second:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(OSError) as info:
            second.bind(taken.getsockname())
    assert reason(info.value).startswith("address already in use")
    with pytest.raises(OSError) as info:
        open(tmp_path / "missing.txt")
    assert reason(info.value) == f"No such file or directory: {tmp_path / 'missing.txt'}"
    noisy = ValueError("\n\n  --\nthe first line that says something\n(3) and a long list after it\n")
    assert reason(noisy) == "ValueError: the first line that says something"
    assert reason(ConfigError("unknown key x")) == "unknown key x"  # tidal's own: no type name
    assert len(reason(RuntimeError("x" * 5000))) < 500


def test_starting_names_what_was_being_done_and_keeps_the_cause():
    with pytest.raises(StartupError, match=r"^cannot load the model /m: KeyError: 'weight'$") as info:
        with starting("cannot load the model /m"):
            raise KeyError("weight")
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ConfigError, match="^bad key$"):  # already says what went wrong: unchanged
        with starting("loading"):
            raise ConfigError("bad key")


def test_run_main_prints_one_line_and_exits_2(capsys):
    def body():
        with starting("cannot listen on 127.0.0.1:1"):
            raise PermissionError(13, "Permission denied")

    assert run_main("tidal x", body) == EXIT_STARTUP
    assert capsys.readouterr().err == "tidal x: cannot listen on 127.0.0.1:1: permission denied\n"
    assert run_main("tidal x", body, debug=True) == EXIT_STARTUP
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)") and "PermissionError" in err
    assert err.endswith("tidal x: cannot listen on 127.0.0.1:1: permission denied\n")
    assert run_main("tidal x", lambda: 0) == 0
    with pytest.raises(ZeroDivisionError):  # not a start-up error: a bug, left to show itself
        run_main("tidal x", lambda: 1 / 0)
