"""Tools offered through the ToolUse wrapper: a tool turn runs the tool, the next turn answers."""

import sys
from pathlib import Path

from tidal.envs.code import CodeEnv
from tidal.envs.math import MathEnv
from tidal.envs.tools import MCPTool, PythonTool, SandboxLimits
from tidal.envs.wrappers import ToolUse

SERVER = Path(__file__).with_name("mcp_server.py")


async def test_math_with_python_tool():
    env = ToolUse(MathEnv("arithmetic"), [PythonTool(SandboxLimits(timeout_s=5))])
    assert env.blocking  # the sandbox blocks, so the wrapped env is offloaded
    question, _ = await env.areset(seed=0)
    assert "<python>" in question
    assert question.startswith("Compute (17 + 16) / (16 / 12).")
    code = "from fractions import Fraction as F\nprint((F(17) + 16) / (F(16) / 12))"
    obs, reward, terminated, _, info = await env.astep(f"Let me compute.\n<python>{code}</python> ignored tail")
    assert obs == "Code execution result: 99/4\n"
    assert (reward, terminated, info["use_tool"], info["tool"]) == (0.0, False, True, "python")
    assert info["parsed_action"].endswith("</python>")
    obs, reward, terminated, _, info = await env.astep("So the answer is \\boxed{99/4}")
    assert (reward, terminated, info["use_tool"]) == (1.0, True, False)


async def test_code_env_with_a_python_tool_for_experiments():
    env = ToolUse(CodeEnv(timeout_s=5), [PythonTool(fenced=False)])
    prompt, _ = await env.areset(seed=0)
    task = env.unwrapped.task
    obs, _, terminated, _, info = await env.astep("<python>print(sorted([3, 1, 2]))</python>")
    assert obs == "Code execution result: [1, 2, 3]\n" and info["use_tool"] and not terminated
    obs, reward, terminated, _, info = await env.astep(f"```python\n{task.solution}```")
    assert (reward, terminated, info["use_tool"]) == (1.0, True, False)


async def test_math_with_an_mcp_tool():
    env = ToolUse(MathEnv("arithmetic", depth=1), [MCPTool(sys.executable, [str(SERVER)])])
    try:
        question, _ = await env.areset(seed=2)
        assert question.startswith("Compute 3 + 12.") and '"name": "add"' in question
        call = '<tool_call><tool_name>add</tool_name><arguments>{"a": 3, "b": 12}</arguments></tool_call>'
        obs, _, _, _, info = await env.astep(call)
        assert obs == "15" and info["tool"] == "mcp"
        assert (await env.astep("\\boxed{15}"))[1] == 1.0
    finally:
        env.close()
