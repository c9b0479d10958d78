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


def test_unknown_id_and_bad_kwargs_are_clear_errors():
    out = run("check", "games:Mastermnd-v0")
    assert out.returncode == 2 and "did you mean games:Mastermind-v0" in out.stdout
    out = run("play", "games:Mastermind-v0", "-k", "difficulty=impossible")
    assert out.returncode == 2 and "difficulty must be one of" in out.stdout
