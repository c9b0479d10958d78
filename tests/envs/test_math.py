"""The math suite: a table of hand-written answers for the verifier, and the envs driven end to end."""

import json
import random

import pytest
from tidal.envs.math import FORMAT_PENALTY, MathEnv, extract_answer, is_correct, load_tasks, parse_number
from tidal.envs.math.tasks import arithmetic_task, word_problem_task

from tidal import envs

# (model answer after extraction, reference answer, should it count as correct)
VERDICTS = [
    ("42", "42", True),
    ("42.", "42", True),
    (" 42 ", "42", True),
    ("1,234", "1234", True),
    ("1{,}234", "1234", True),
    ("1 234", "1234", True),
    ("5,050", "5050", True),
    ("1/2", "0.5", True),
    ("0.50", "1/2", True),
    ("\\frac{1}{2}", "1/2", True),
    ("\\dfrac{1}{2}", "1/2", True),
    ("\\frac12", "0.5", True),
    ("-\\frac{3}{4}", "-3/4", True),
    ("$\\frac{1}{6}$", "\\frac{1}{6}", True),
    ("\\$750", "750", True),
    ("$750", "750", True),
    ("750 dollars", "750", True),
    ("12\\text{ apples}", "12", True),
    ("50\\%", "50", True),
    ("x = -8", "-8", True),
    ("−8", "-8", True),
    ("(1, 2)", "1, 2", True),
    ("1.5 \\times 10^{3}", "1500", True),
    ("2 \\cdot 10^-2", "1/50", True),
    ("1e999999999", "1", False),
    ("1e3", "1000", True),
    ("Paris.", "paris", True),
    ("0.333", "1/3", False),
    ("43", "42", False),
    ("-42", "42", False),
    ("4/2", "3", False),
    ("1/0", "1", False),
    ("", "1", False),
    ("forty-two", "42", False),
    ("(1, 3)", "1, 2", False),
    ("1" * 300, "1" * 300, False),
]


@pytest.mark.parametrize(("given", "expected", "verdict"), VERDICTS)
def test_verifier_table(given, expected, verdict):
    assert is_correct(given, expected) is verdict


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("Thinking... so \\boxed{12} wait no \\boxed{\\frac{3}{4}}", "\\frac{3}{4}"),
        ("The sum is 10.\nThe answer is 42.", "42."),
        ("Final answer: 7", "7"),
        ("work\n#### 1,000", "1,000"),
        ("", None),
        ("   \n  ", None),
        ("x" * 100_000, None),
    ],
)
def test_extract_answer(response, answer):
    assert extract_answer(response) == answer


def test_parse_number_is_exact():
    assert parse_number("\\frac{2}{6}") * 3 == 1
    assert parse_number("1e3") == 1000
    assert parse_number("abc") is None


def test_generated_tasks_are_deterministic_and_exact():
    a = [arithmetic_task(random.Random(7), depth=3) for _ in range(2)]
    assert a[0] == a[1]
    assert word_problem_task(random.Random(1)) == word_problem_task(random.Random(1))
    # "Compute 3 + (10 * 9)" worked by hand for seed 2, depth 2: the reference is 93.
    env = MathEnv("arithmetic")
    question, _ = env.reset(seed=2)
    assert question.startswith("Compute 3 + (10 * 9).") and env.task.answer == "93"


@pytest.mark.parametrize("env_id", ["math:Arithmetic-v0", "math:WordProblems-v0", "math:Problems-v0"])
async def test_registered_and_solver_reaches_reward_1(env_id):
    env = envs.make(env_id)
    assert env.instructions and "\\boxed" in env.instructions
    for seed in range(5):
        episode = await envs.run_episode(env, lambda obs: env.solver()(obs), seed=seed)
        assert episode.error is None
        assert episode.rewards == [1.0] and episode.terminated
    obs_a, _ = env.reset(seed=11)
    obs_b, _ = envs.make(env_id).reset(seed=11)
    assert obs_a == obs_b


@pytest.mark.parametrize("action", ["", "   ", "\\boxed{}", "\\boxed{ }", "x" * 1_000_000])
def test_bad_actions_get_the_format_penalty(action):
    env = MathEnv("word")
    env.reset(seed=0)
    obs, reward, terminated, truncated, info = env.step(action)
    assert "No answer found" in obs
    assert reward == FORMAT_PENALTY and terminated and not truncated and info["format_error"]


def test_wrong_answer_is_0_and_retries_make_it_multi_turn():
    env = MathEnv("arithmetic", max_attempts=2)
    question, _ = env.reset(seed=2)
    obs, reward, terminated, _, _ = env.step("\\boxed{92}")
    assert (reward, terminated) == (0.0, False) and "Try again" in obs
    obs, reward, terminated, _, info = env.step("so \\boxed{93}")
    assert (reward, terminated, info["correct"]) == (1.0, True, True)
    single = MathEnv("arithmetic")
    single.reset(seed=2)
    assert single.step("\\boxed{92}")[1:3] == (0.0, True)


def test_load_tasks_from_jsonl_with_custom_keys(tmp_path):
    path = tmp_path / "gsm.jsonl"
    rows = [{"problem": "1+1?", "solution": "1+1=2\n#### 2"}, {"problem": "2*3?", "solution": "6"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    tasks = load_tasks(path, question_key="problem", answer_key="solution")
    assert [(t.question, t.answer) for t in tasks] == [("1+1?", "2"), ("2*3?", "6")]
    env = envs.make("math:Problems-v0", path=path, question_key="problem", answer_key="solution")
    question, _ = env.reset(seed=0)
    assert env.step(env.solver()(question))[1] == 1.0
    with pytest.raises(ValueError, match="expected keys"):
        load_tasks(path)


def test_parquet_file_is_read(tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"question": ["3*3?", "2+5?"], "answer": ["9", "#### 7"]}), path)
    assert [(t.question, t.answer) for t in load_tasks(path)] == [("3*3?", "9"), ("2+5?", "7")]
    env = envs.make("math:Problems-v0", path=str(path))
    question, _ = env.reset(seed=1)
    assert env.step(env.solver()(question))[1] == 1.0


def test_datasets_dataset_saved_to_disk_or_loaded_by_name(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"problem": "What is 6*7?", "solution": "#### 42"}, {"problem": "What is 1/2+1/4?", "solution": "3/4"}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    saved = envs.make("math:Problems-v0", path=str(tmp_path / "saved"), question_key="problem", answer_key="solution")
    by_name = envs.make("math:Problems-v0", dataset="json", data_files=str(tmp_path / "rows.jsonl"),
                        question_key="problem", answer_key="solution")
    for env in (saved, by_name):
        assert sorted((t.question, t.answer) for t in env.tasks) == [("What is 1/2+1/4?", "3/4"), ("What is 6*7?", "42")]
        question, _ = env.reset(seed=0)
        assert env.step(env.solver()(question))[1] == 1.0
    with pytest.raises(ValueError, match="expected keys 'question' and 'answer', the columns are"):
        envs.make("math:Problems-v0", dataset="json", data_files=str(tmp_path / "rows.jsonl"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\]"):
        load_tasks(tmp_path / "splits", "problem", "solution")


def test_garbage_is_a_wrong_answer_not_an_exception():
    env = MathEnv("arithmetic")
    env.reset(seed=0)
    assert env.step("\x00\xff garbage \\boxed{")[1:3] == (0.0, True)
    assert env.step("after the end")[:3] == ("The episode is over; call reset.", 0.0, True)
