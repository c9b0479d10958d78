"""`tidal envs` as a subprocess: list, check, play by hand and by solver, clear errors."""

import subprocess
import sys

TIDAL = [sys.executable, "-m", "tidal", "envs"]


def run(*args, stdin=""):
    return subprocess.run([*TIDAL, *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_list_shows_the_games():
    out = run("list", "--prefix", "games")
    assert out.returncode == 0, out.stderr
    assert "games:Wordle-v0" in out.stdout and "tidal.envs.games.words:Wordle" in out.stdout


def test_check_passes_and_reports():
    out = run("check", "games:Mastermind-v0", "-k", "difficulty=hard")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK games:Mastermind-v0 passes check_env" in out.stdout


def test_play_with_solver_wins():
    out = run("play", "games:GuessTheNumber-v0", "--seed", "4", "--solver")
    assert out.returncode == 0, out.stderr
    assert "Correct!" in out.stdout and "total reward 1" in out.stdout


def test_play_by_hand_reads_stdin_until_eof():
    out = run("play", "games:GuessTheNumber-v0", "--seed", "4", stdin="\\boxed{5}\nno idea\n")
    assert out.returncode == 0, out.stderr
    assert "you guessed 5" in out.stdout or "Correct!" in out.stdout
    assert "invalid move" in out.stdout and "episode over after 2 turns: total reward" in out.stdout


def one_error_line(out: subprocess.CompletedProcess, command: str) -> str:
    """Exit 2, nothing on stdout, one line on stderr naming the command."""
    assert out.returncode == 2, (out.returncode, out.stdout, out.stderr)
    assert out.stdout == "" and len(out.stderr.splitlines()) == 1, (out.stdout, out.stderr)
    assert out.stderr.startswith(f"tidal envs {command}: ")
    return out.stderr


def test_every_error_is_one_line_on_stderr_and_exit_2():
    assert "did you mean games:Mastermind-v0" in one_error_line(run("check", "games:Mastermnd-v0"), "check")
    line = one_error_line(run("play", "games:Mastermind-v0", "-k", "difficulty=impossible"), "play")
    assert "cannot build games:Mastermind-v0: ValueError: Mastermind: difficulty must be one of" in line
    assert "-k expects KEY=VALUE, got 'difficulty'" in one_error_line(
        run("check", "games:Mastermind-v0", "-k", "difficulty"), "check")
    line = one_error_line(run("play", "gem:game:Sudoku-v0-easy", "--solver"), "play")
    assert "gem:game:Sudoku-v0-easy has no scripted solver" in line
    line = one_error_line(run("list", "--prefix", "gmes"), "list")
    assert "no environments with the prefix 'gmes'; the prefixes are: agentgym, code, games, gem, math, qa" in line


def test_list_names_the_prefixes_it_does_not_show():
    out = run("list")
    assert out.returncode == 0, out.stderr
    hint = out.stdout.strip().splitlines()[-1]
    assert "not listed above: agentgym (5), gem (" in hint and "`tidal envs list --prefix NAME`" in hint
    total = int(hint.split(" ids in all")[0])
    assert total == int(out.stdout.split(" environments")[0]) + 5 + int(hint.split("gem (")[1].split(")")[0])
    out = run("list", "--prefix", "agentgym")
    assert out.returncode == 0 and "5 environments" in out.stdout and "not listed above" not in out.stdout


def test_gem_and_bm25s_keep_quiet():
    """GEM prints its wrappers on stdout and sets up root logging at import; bm25s logs at debug."""
    out = run("check", "gem:game:GuessTheNumber-v0-easy", "-k", "wrappers=concat")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines() == ["OK gem:game:GuessTheNumber-v0-easy passes check_env"]
    assert out.stderr == ""
    line = one_error_line(run("check", "gem:game:GuessTheNumber-v0-easy", "-k", "wrappers=concatt"), "check")
    assert "unknown wrapper 'concatt'; GEM's wrappers: python_tool" in line
    code = ("import logging; logging.basicConfig(level=logging.WARNING); "
            "import tidal.envs.adapters.gem as g; g._import_gem(); "
            "assert len(logging.getLogger().handlers) == 1 and logging.getLogger().level == logging.WARNING; "
            "from tidal.envs.tools.search import Document, SearchIndex; "
            "SearchIndex([Document(id='1', title='t', text='hello world')]).search('hello')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "" and out.stdout == "", out.stderr
