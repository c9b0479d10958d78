"""`agentgym:` ids: clients for AgentGym environment servers (BabyAI, TextCraft, SciWorld, SearchQA,
WebArena), so those servers plug in unchanged.

    env = envs.make("agentgym:textcraft", url="http://127.0.0.1:36001")
    obs, info = await env.areset(seed=12)          # the seed is the server's item index
    obs, reward, terminated, truncated, info = await env.astep("Thought: ...\\nAction: get 1 oak log")

The servers do not share one protocol; each family's shapes are those recorded in
docs/envs.md (AgentGym) and its client's behaviour is AgentGym's:
| family    | id field  | /create          | /reset body            | first observation          | reward  | done       |
| babyai    | `id`      | no body -> {id}  | {id, data_idx}         | reset `observation`        | `score` | `done`     |
| textcraft | `id`      | {commands, goal} | {id, data_idx}         | reset `observation`        | `reward`| `done`     |
| sciworld  | `id`      | no body -> {id}  | {id, data_idx}         | `task_description` + obs   | `score` | `done`     |
| searchqa  | `env_idx` | {id: 0} -> int   | {env_idx, id} -> str   | GET /observation (str)     | `reward`| `done`     |
| webarena  | `env_idx` | no body -> {env_idx} | {env_idx, seed, idx} | GET /observation (str)   | `reward` if `terminated` | `terminated` |

Client-side action parsing (what AgentGym's clients do before any HTTP call): BabyAI and TextCraft
take the one `Action:` line and keep `[A-Za-z0-9, ]`; SciWorld takes the text after the last
`Action:` (ReAct); WebArena needs a ```...``` block; SearchQA sends the raw text. A turn that fails
this parse is a local error turn: an observation that says what was wrong, reward 0, not done, and
no request. Departure: AgentGym sends an empty action when BabyAI/TextCraft text has no `Action:`
line; we make that a local error turn too, so a formatless answer never reaches the server, and
so is a response longer than `MAX_ACTION_CHARS` (no server needs a megabyte per step).

Errors: the servers answer HTTP 200 with `{"error": ...}` when something fails; that, a non-200
status, or a body without the expected fields raises `AgentGymError` naming the server, route and
env id, which the episode runner records as an episode error. The env is natively async (aiohttp),
so it is never offloaded. `aclose` always posts /close: the servers keep every env until told.
"""

import asyncio
import random
import re
from collections import Counter
from typing import Any, ClassVar

import aiohttp
import msgspec
from tidal.envs.answers import MAX_ACTION_CHARS
from tidal.envs.core import Env, EnvError, EnvNotFound, StepResult
from tidal.envs.registry import register_prefix

__all__ = [
    "AGENTGYM_COUNTS",
    "AgentGymEnv",
    "AgentGymError",
    "BabyAIEnv",
    "TextCraftEnv",
    "SciWorldEnv",
    "SearchQAEnv",
    "WebArenaEnv",
    "FAMILIES",
    "make_agentgym",
]

AGENTGYM_COUNTS: Counter[str] = Counter()
"""Running totals for metrics (`envs/agentgym/...`): `requests`, `server_errors` (error key, non-200,
wrong shape, timeout, connection), `local_errors` (turns the client rejected without a request)."""

OK_REPLY = "OK. I'll follow your instructions and try my best to solve the task."
_ACTION_LINE = re.compile(r"Action:\s*(.*?)(?=\n|$)", re.DOTALL)
_NOT_ACTION_CHARS = re.compile(r"[^A-Za-z0-9, ]+")
_BACKTICKS = re.compile(r"```(.*?)```", re.DOTALL)


class AgentGymError(EnvError):
    """An AgentGym server reported an error, answered non-200, or sent a body of the wrong shape."""


class _Observed(msgspec.Struct):
    """A /reset answer that carries the first observation (BabyAI, TextCraft, WebArena)."""

    observation: str


class _SciWorldReset(msgspec.Struct):
    observation: str
    task_description: str


class _ScoreStep(msgspec.Struct):
    """BabyAI and SciWorld /step: the client's reward is `score`."""

    observation: str
    score: float
    done: bool


class _RewardStep(msgspec.Struct):
    """TextCraft and SearchQA /step: the client's reward is `reward`."""

    observation: str
    reward: float
    done: bool


class _WebArenaStep(msgspec.Struct):
    observation: str
    reward: float
    terminated: bool
    truncated: bool = False


class _LocalError(Exception):
    """An action the client rejects before any request; its message is the observation."""


class AgentGymEnv(Env):
    """One env instance on an AgentGym server; subclasses give each family's shapes.

    Args:
        url: the server's base URL, e.g. http://127.0.0.1:36001.
        timeout_s: bound on each request (AgentGym allows 300 s; WebArena resets are slow).
        create_retries: attempts at /create on a connection error, `retry_delay_s` apart.
        session: an aiohttp session to share between many envs; by default each env owns one.
    """

    family: ClassVar[str] = ""
    id_field: ClassVar[str] = "id"
    instructions: str = ""
    """The human turn of AgentGym's conversation bootstrap (paraphrased, same format rules)."""
    sample_actions: ClassVar[tuple[str, ...]] = ()
    """Well-formed actions for random-policy checks and benchmarks."""
    reply: ClassVar[str] = OK_REPLY
    """The assistant turn of the bootstrap, as the family's AgentGym client has it."""

    def __init__(self, url: str, timeout_s: float = 300.0, create_retries: int = 3, retry_delay_s: float = 5.0,
                 session: aiohttp.ClientSession | None = None):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"agentgym:{self.family}: url must be http(s)://host:port, got {url!r}")
        self.url = url.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.create_retries, self.retry_delay_s = max(create_retries, 1), retry_delay_s
        self._session, self._owns_session = session, session is None
        self.env_id: int | None = None
        self.observation = ""
        self._sync_loop: asyncio.AbstractEventLoop | None = None

    @property
    def conversation_start(self) -> tuple[str, str]:
        """AgentGym's bootstrap: (human instruction, assistant acknowledgement) as the first exchange."""
        return self.instructions, self.reply

    # --- HTTP -----------------------------------------------------------------------------------

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
            self._owns_session = True
        return self._session

    async def _request(self, method: str, route: str, body: Any = None) -> Any:
        """One call; the decoded JSON body, or AgentGymError saying which server, route and id failed."""
        where = f"{self.url}/{route} (agentgym:{self.family}, env {self.env_id})"
        AGENTGYM_COUNTS["requests"] += 1
        try:
            return await self._request_once(method, route, body, where)
        except AgentGymError:
            AGENTGYM_COUNTS["server_errors"] += 1
            raise

    async def _request_once(self, method: str, route: str, body: Any, where: str) -> Any:
        params = {self.id_field: str(self.env_id)} if method == "GET" else None
        try:
            async with self._http().request(method, f"{self.url}/{route}", json=body, params=params) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError:
            raise AgentGymError(f"{where}: no answer within {self.timeout.total:g} s") from None
        except aiohttp.ClientError as exc:
            raise AgentGymError(f"{where}: {type(exc).__name__}: {exc}") from exc
        if status != 200:
            raise AgentGymError(f"{where}: HTTP {status}: {raw[:300].decode('utf-8', 'replace')}")
        try:
            data = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise AgentGymError(f"{where}: body is not JSON: {raw[:300]!r}") from None
        if isinstance(data, dict) and "error" in data:
            raise AgentGymError(f"{where}: server error: {data['error']}")
        return data

    async def _post(self, route: str, body: dict[str, Any] | None = None) -> Any:
        return await self._request("POST", route, {**(body or {}), self.id_field: self.env_id})

    def _convert(self, data: Any, shape: type, route: str) -> Any:
        try:
            return msgspec.convert(data, shape)
        except msgspec.ValidationError as exc:
            AGENTGYM_COUNTS["server_errors"] += 1
            raise AgentGymError(
                f"{self.url}/{route} (agentgym:{self.family}, env {self.env_id}): unexpected body {data!r:.200}: {exc}"
            ) from None

    async def _create(self) -> None:
        for attempt in range(1, self.create_retries + 1):
            try:
                created = await self._request("POST", "create", self.create_body())
                break
            except AgentGymError as exc:
                if not isinstance(exc.__cause__, aiohttp.ClientConnectionError):
                    raise
                if attempt == self.create_retries:
                    raise AgentGymError(f"{exc} (after {attempt} attempts)") from exc.__cause__
                await asyncio.sleep(self.retry_delay_s)
        self.env_id = self.parse_created(created)

    # --- the family hooks -----------------------------------------------------------------------

    def create_body(self) -> dict[str, Any] | None:
        return None

    def parse_created(self, data: Any) -> int:
        if isinstance(data, dict) and isinstance(data.get(self.id_field), int):
            return data[self.id_field]
        raise AgentGymError(f"{self.url}/create (agentgym:{self.family}): expected {{{self.id_field!r}: int}}, "
                            f"got {data!r:.200}")

    async def reset_item(self, index: int) -> str:
        """Reset the server env to item `index`; returns the first observation."""
        data = await self._post("reset", {"data_idx": index})
        return self._convert(data, _Observed, "reset").observation

    def parse_action(self, action: str) -> str:
        """The text to send as the action, or `_LocalError` with the reason."""
        return action

    def parse_step(self, data: Any) -> tuple[str, float, bool, bool]:
        """(observation, reward, terminated, truncated) from a /step answer."""
        step = self._convert(data, _RewardStep, "step")
        return step.observation, step.reward, step.done, False

    # --- the Env API ------------------------------------------------------------------------------

    async def areset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        self._check_usable()
        super().reset(seed)
        index = seed if seed is not None else self.rng.randrange(1 << 16)
        if self.env_id is None:
            await self._create()
        self.observation = await self.reset_item(index)
        return self.observation, {"item_id": index, "env_idx": self.env_id}

    async def astep(self, action: str) -> StepResult:
        self._check_usable()
        if self.env_id is None:
            raise EnvError(f"agentgym:{self.family}: step before reset")
        try:
            if len(action) > MAX_ACTION_CHARS:
                raise _LocalError(f"Error: the response is {len(action)} characters long; keep it under "
                                  f"{MAX_ACTION_CHARS} and end it with one action.")
            sent = self.parse_action(action)
        except _LocalError as exc:
            AGENTGYM_COUNTS["local_errors"] += 1
            return str(exc), 0.0, False, False, {"local_error": True}
        obs, reward, terminated, truncated = self.parse_step(await self._post("step", {"action": sent}))
        self.observation = obs
        return obs, reward, terminated, truncated, {"action": sent}

    async def aclose(self) -> None:
        try:
            if self.env_id is not None:
                env_id, self.env_id = self.env_id, None
                try:
                    await self._request("POST", "close", {self.id_field: env_id})
                except AgentGymError:  # a server that is gone or refuses holds nothing more of ours
                    pass
        finally:
            if self._owns_session and self._session is not None:
                await self._session.close()
                self._session = None

    def sample_action(self, rng: random.Random) -> str:
        return rng.choice(self.sample_actions)

    def _sync(self, coro: Any) -> Any:
        """Drive a coroutine from sync code on this env's own loop (scripts; not from inside a loop)."""
        if self._sync_loop is None:
            self._sync_loop = asyncio.new_event_loop()
        return self._sync_loop.run_until_complete(coro)

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        return self._sync(self.areset(seed))

    def step(self, action: str) -> StepResult:
        return self._sync(self.astep(action))

    def close(self) -> None:
        if self._sync_loop is not None:
            self._sync_loop.run_until_complete(self.aclose())
            self._sync_loop.close()
            self._sync_loop = None


def _one_action_line(action: str) -> str:
    """BabyAI/TextCraft: the single `Action:` line, reduced to letters, digits, commas and spaces."""
    found = _ACTION_LINE.findall(action)
    if len(found) > 1:
        raise _LocalError("Error: only one 'Action:' is allowed per response. Please adjust your response.")
    text = " ".join(_NOT_ACTION_CHARS.sub("", found[0] if found else "").split())
    if not text:
        raise _LocalError("Error: no action found. End your response with a line 'Action: <your action>'.")
    return text


class BabyAIEnv(AgentGymEnv):
    """BabyAI grid worlds (40 levels; item index -> level `idx % 40 + 1`, seed `idx // 40`)."""

    family = "babyai"
    sample_actions = ("Thought: look.\nAction: turn left", "Action: turn right", "Action: move forward",
                      "Action: check available actions")
    instructions = (
        "You are an explorer who must reach every goal you are given. Each round you get an observation "
        "and reply with your thought and one action. You are in a room and must accomplish the goal.\n\n"
        "Actions:\n- turn right\n- turn left\n- move forward\n- go to <obj> <id>\n- pick up <obj> <id>\n"
        "- go through <door> <id>: the door must be open\n"
        "- toggle and go through <door> <id>: a closed or locked door (a locked door needs a key of its colour)\n"
        "- toggle: open the closed or locked door right in front of you\n"
        "Reply in this format:\nThought:\n<your thought>\n\nAction:\n<your action>"
    )

    def parse_action(self, action: str) -> str:
        return _one_action_line(action)

    def parse_step(self, data: Any) -> tuple[str, float, bool, bool]:
        step = self._convert(data, _ScoreStep, "step")
        return step.observation, step.score, step.done, False


class TextCraftEnv(AgentGymEnv):
    """Minecraft-style crafting from recipes given in the first observation; reward 1 when crafted."""

    family = "textcraft"
    sample_actions = ("Action: inventory", "Thought: I need wood.\nAction: get 1 oak log", "Action: look")
    instructions = (
        "You are given a few crafting recipes for Minecraft items; commands have the form "
        "\"craft [target] using [ingredients]\". Each round you get an observation and reply with one "
        "action: \"get\" an item from the environment, look at your items with \"inventory\", or \"craft\" "
        "a target with one of the given commands.\n"
        "Always give quantities, e.g. \"get 1 lapis lazuli\", \"craft 1 blue dye using 1 lapis lazuli\". "
        "Use only the crafting commands provided (a generic ingredient such as \"planks\" may be replaced "
        "by a specific kind such as \"dark oak planks\").\n"
        "Reply in this format:\nThought:\nyour thoughts.\n\nAction:\nyour next action"
    )

    def __init__(self, url: str, commands: str | None = None, goal: str | None = None,
                 minecraft_dir: str = "agentenv_textcraft/", **kwargs: Any):
        super().__init__(url, **kwargs)
        self.commands, self.goal, self.minecraft_dir = commands, goal, minecraft_dir

    def create_body(self) -> dict[str, Any] | None:
        """AgentGym's client sends `minecraft_dir` too; the server reads only `commands` and `goal`."""
        return {"minecraft_dir": self.minecraft_dir, "commands": self.commands, "goal": self.goal}

    def parse_action(self, action: str) -> str:
        text = _one_action_line(action)
        return "inventory" if text.lower() == "look" else text


class SciWorldEnv(AgentGymEnv):
    """ScienceWorld tasks; the reward is the raw ScienceWorld score (0-100), as AgentGym passes it on."""

    family = "sciworld"
    sample_actions = ("Thought: where am I?\nAction: look around", "Action: inventory", "Action: task")
    instructions = (
        "You are an agent in a science world. Each round you get an observation and reply with one "
        "action to make progress on the task. Actions: open/close OBJ, activate/deactivate OBJ, connect "
        "OBJ to OBJ, disconnect OBJ, use OBJ [on OBJ], look around, look at OBJ, look in OBJ, read OBJ, "
        "move OBJ to OBJ, pick up OBJ, put down OBJ, pour OBJ into OBJ, dunk OBJ into OBJ, mix OBJ, go to "
        "LOC, eat OBJ, flush OBJ, focus on OBJ, wait, wait1, task, inventory.\n"
        "Reply in this format:\nThought:\nyour thoughts.\n\nAction:\nyour next action"
    )

    async def reset_item(self, index: int) -> str:
        data = self._convert(await self._post("reset", {"data_idx": index}), _SciWorldReset, "reset")
        return f"{data.task_description}\n{data.observation}"

    def parse_action(self, action: str) -> str:
        if "Action:" not in action:
            raise _LocalError(f"Invalid Action.\n\n{self.observation}")
        text = action.rsplit("Action:", 1)[1].removesuffix("</s>").strip()
        if not text:
            raise _LocalError(f"Invalid Action.\n\n{self.observation}")
        return text

    def parse_step(self, data: Any) -> tuple[str, float, bool, bool]:
        step = self._convert(data, _ScoreStep, "step")
        return step.observation, step.score, step.done, False


class SearchQAEnv(AgentGymEnv):
    """Open-domain QA with a retrieval server: `<search>q</search>` or `<answer>a</answer>` (parsed by
    the server); done only on an exact-match answer, a wrong answer lets the agent try again."""

    family = "searchqa"
    id_field = "env_idx"
    sample_actions = ("<think>I should look it up.</think><search>capital city</search>", "<answer>Paris</answer>")
    reply = "Ok."
    instructions = (
        "Reason inside <think>...</think> first. If you lack knowledge, write <search>query</search> and "
        "stop; the results come back inside <information>...</information>. Do not write <information> "
        "yourself and do not answer before you have what you need. Give the final answer as "
        "<answer>short answer</answer>."
    )

    def create_body(self) -> dict[str, Any] | None:
        return {"id": 0}

    def parse_created(self, data: Any) -> int:
        if isinstance(data, int) and not isinstance(data, bool):
            return data
        raise AgentGymError(f"{self.url}/create (agentgym:searchqa): expected a bare int env_idx, got {data!r:.200}")

    async def reset_item(self, index: int) -> str:
        await self._post("reset", {"id": index})
        prompt = await self._request("GET", "observation")
        return self._convert(prompt, str, "observation")


class WebArenaEnv(AgentGymEnv):
    """WebArena sites driven through a browser on the server; the action goes in ```...```."""

    family = "webarena"
    id_field = "env_idx"
    sample_actions = ("In summary, the next action I will perform is ```scroll [down]```",
                      "In summary, the next action I will perform is ```go_back```")
    reply = "Ok."
    instructions = (
        "You are an autonomous agent navigating a web browser to complete a task. Each round you see the "
        "objective, the page's accessibility tree, its URL and the open tabs. Actions: ```click [id]```, "
        "```type [id] [content] [0|1]```, ```hover [id]```, ```press [key_comb]```, ```scroll [down|up]```, "
        "```new_tab```, ```tab_focus [tab_index]```, ```close_tab```, ```goto [url]```, ```go_back```, "
        "```go_forward```, and ```stop [answer]``` when done (\"N/A\" if impossible). Issue one action "
        "per turn: think step by step, then end with \"In summary, the next action I will perform is "
        "```action```\"."
    )

    async def reset_item(self, index: int) -> str:
        data = self._convert(await self._post("reset", {"seed": 0, "idx": index}), _Observed, "reset")
        if data.observation == "TimeoutError":
            raise AgentGymError(f"{self.url}/reset (agentgym:webarena, env {self.env_id}): the server timed out "
                                f"loading item {index}; consider restarting the web server")
        prompt = await self._request("GET", "observation")
        return self._convert(prompt, str, "observation")

    def parse_action(self, action: str) -> str:
        if not _BACKTICKS.search(action):
            raise _LocalError("Cannot parse an action from the response: put the action inside triple "
                              "backticks (```), e.g. ```click [12]```.")
        return action

    def parse_step(self, data: Any) -> tuple[str, float, bool, bool]:
        step = self._convert(data, _WebArenaStep, "step")
        return step.observation, step.reward if step.terminated else 0.0, step.terminated, step.truncated


FAMILIES: dict[str, type[AgentGymEnv]] = {
    cls.family: cls for cls in (BabyAIEnv, TextCraftEnv, SciWorldEnv, SearchQAEnv, WebArenaEnv)
}


def make_agentgym(family: str, url: str | None = None, **kwargs: Any) -> AgentGymEnv:
    """`agentgym:<family>` -> the family's client for the server at `url`."""
    cls = FAMILIES.get(family.lower())
    if cls is None:
        raise EnvNotFound(f"agentgym:{family}: unknown server family; known: {', '.join(FAMILIES)}")
    if url is None:
        raise ValueError(f"agentgym:{family} needs the server URL: envs.make('agentgym:{family}', url='http://...')")
    return cls(url, **kwargs)


register_prefix("agentgym", make_agentgym, ids=lambda: list(FAMILIES))
