"""AgentGym environment servers for tests, written to the shapes each real server speaks.

Shapes are those of docs/envs.md, AgentGym (read from agentenv-*/server.py):
the id field (`id` or `env_idx`), bare-value answers (SearchQA /create and /reset, TextCraft and
WebArena /observation), HTTP 200 with an `error` key for failures (BabyAI, TextCraft, SciWorld),
FastAPI's 422 for a malformed body. Each server hosts a tiny deterministic task that a scripted
episode can solve, records every request in `calls`, and can be told to misbehave (`broken`).
"""

import asyncio
import re
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer

__all__ = ["FakeAgentGymServer", "SERVERS", "start_server"]


class FakeAgentGymServer:
    """Common plumbing: an env table keyed by an integer id, a request log, scripted faults."""

    id_field = "id"

    def __init__(self) -> None:
        self.envs: dict[int, dict[str, Any]] = {}
        self.next_id = 0
        self.calls: list[tuple[str, Any]] = []
        self.closed: list[int] = []
        self.broken: str | None = None
        """"shape": /step answers without its reward field; "status": HTTP 500; "hang": never answers."""
        self.app = web.Application()
        self.app.router.add_post("/create", self._wrap(self.create))
        self.app.router.add_post("/reset", self._wrap(self.reset))
        self.app.router.add_post("/step", self._wrap(self.step))
        self.app.router.add_get("/observation", self._wrap(self.observation))
        self.app.router.add_post("/close", self._wrap(self.close))

    def _wrap(self, handler):
        async def route(request: web.Request) -> web.StreamResponse:
            body = await request.json() if request.can_read_body else None
            if request.method == "GET":
                body = dict(request.query)
            self.calls.append((request.path, body))
            if body is not None and not isinstance(body, dict):
                return web.json_response({"detail": "body must be an object"}, status=422)
            return await handler(body or {})

        return route

    def new_id(self) -> int:
        env_id, self.next_id = self.next_id, self.next_id + 1
        return env_id

    def env(self, body: dict[str, Any]) -> dict[str, Any] | None:
        raw = body.get(self.id_field)
        try:
            return self.envs.get(int(raw))
        except (TypeError, ValueError):
            return None

    def not_valid(self, body: dict[str, Any]) -> web.Response:
        return web.json_response({"error": f"The id {body.get(self.id_field)} is not valid."})

    async def create(self, body: dict[str, Any]) -> web.Response:
        raise NotImplementedError

    async def reset(self, body: dict[str, Any]) -> web.Response:
        raise NotImplementedError

    async def step(self, body: dict[str, Any]) -> web.Response:
        raise NotImplementedError

    async def observation(self, body: dict[str, Any]) -> web.Response:
        state = self.env(body)
        if state is None:
            return self.not_valid(body)
        return web.json_response(state["observation"])

    async def close(self, body: dict[str, Any]) -> web.Response:
        state = self.env(body)
        if state is None:
            return self.not_valid(body)
        env_id = int(body[self.id_field])
        del self.envs[env_id]
        self.closed.append(env_id)
        return web.json_response(True)

    async def faulty(self) -> web.Response | None:
        if self.broken == "status":
            return web.Response(status=500, text="Internal Server Error")
        if self.broken == "hang":
            await asyncio.sleep(3600)
        return None


class BabyAIServer(FakeAgentGymServer):
    """Goal: go to the red ball. `go to red ball 1` solves it with minigrid's score 0.8875."""

    async def create(self, body):
        env_id = self.new_id()
        self.envs[env_id] = {"observation": "", "done": False}
        return web.json_response({"id": env_id})

    async def reset(self, body):
        state = self.env(body)
        if state is None:
            return self.not_valid(body)
        obs = (f"Your goal: go to the red ball\nIn front of you in this room, you can see several objects: "
               f"There is a red ball 1 2 steps in front of you (level {body.get('data_idx', 0) % 40 + 1}).\n"
               'Available actions: ["turn left", "turn right", "move forward", "go to red ball 1", "check available actions"]')
        state.update(observation=obs, done=False)
        return web.json_response({"observation": obs, "reward": 0.0, "score": 0.0, "deleted": False, "done": False})

    async def step(self, body):
        state = self.env(body)
        if state is None:
            return self.not_valid(body)
        if state["done"]:
            return web.json_response({"error": f"The task with environment {body['id']} has finished."})
        if (fault := await self.faulty()) is not None:
            return fault
        action = body.get("action", "")
        if action == "go to red ball 1":
            state.update(observation="You reached the red ball. The goal is done.", done=True)
            reward, score = 1.0, 0.8875
        elif action in ("turn left", "turn right", "move forward"):
            state["observation"] = f"You {action}. There is a red ball 1 in this room."
            reward = score = 0.0
        else:
            state["observation"] = f"The action is not recognized. Please check valid actions.\n{action}"
            reward = score = 0.0
        out = {"observation": state["observation"], "reward": reward, "score": score, "done": state["done"]}
        if self.broken == "shape":
            del out["score"]
        return web.json_response(out)

    async def observation(self, body):
        state = self.env(body)
        if state is None:
            return self.not_valid(body)
        return web.json_response({"observation": state["observation"], "reward": 0.0, "score": 0.0,
                                  "done": state["done"], "deleted": False})


class TextCraftServer(FakeAgentGymServer):
    """Goal: craft a crafting table from an oak log (get, craft planks, craft table)."""

    COMMANDS = "craft 4 oak planks using 1 oak log\ncraft 1 crafting table using 4 oak planks"

    async def create(self, body):
        env_id = self.new_id()
        goal = body.get("goal") or "crafting table"
        obs = f"Crafting commands:\n{body.get('commands') or self.COMMANDS}\n\nGoal: craft {goal}."
        self.envs[env_id] = {"observation": obs, "inventory": {}, "done": False, "goal": goal}
        return web.json_response({"id": env_id, "observation": obs, "done": False, "reward": 0})

    async def reset(self, body):
        state = self.env(body)
        if state is None:
            return self.not_valid(body)
        obs = f"Crafting commands:\n{self.COMMANDS}\n\nGoal: craft {state['goal']}."
        state.update(observation=obs, inventory={}, done=False)
        return web.json_response({"id": int(body["id"]), "observation": obs, "done": False, "reward": 0})

    async def step(self, body):
        state = self.env(body)
        if state is None:
            return self.not_valid(body)
        if (fault := await self.faulty()) is not None:
            return fault
        action, inv, reward = body.get("action", ""), state["inventory"], 0
        if action == "get 1 oak log":
            inv["oak log"] = inv.get("oak log", 0) + 1
            obs = "Got 1 oak log"
        elif action == "craft 4 oak planks using 1 oak log" and inv.get("oak log"):
            inv["oak log"] -= 1
            inv["oak planks"] = inv.get("oak planks", 0) + 4
            obs = "Crafted 4 minecraft:oak_planks"
        elif action == "craft 1 crafting table using 4 oak planks" and inv.get("oak planks", 0) >= 4:
            inv["oak planks"] -= 4
            obs, reward = "Crafted 1 minecraft:crafting_table", 1
            state["done"] = True
        elif action == "inventory":
            obs = "Inventory: " + " ".join(f"[{k}] ({v})" for k, v in inv.items() if v)
        else:
            obs = f"Could not execute {action}"
        state["observation"] = obs
        out = {"observation": obs, "reward": reward, "done": state["done"]}
        if self.broken == "shape":
            del out["reward"]
        return web.json_response(out)


class SciWorldServer(FakeAgentGymServer):
    """Task: boil water. Score 50 after `activate stove`, 100 (done) after `focus on water`."""

    async def create(self, body):
        env_id = self.new_id()
        self.envs[env_id] = {"observation": "", "score": 0, "done": False}
        return web.json_response({"id": env_id})

    async def reset(self, body):
        state = self.env(body)
        if state is None:
            return self.not_valid(body)
        obs = "This room is called the kitchen. In it, you see: a stove, which is turned off. a pot with water."
        state.update(observation=obs, score=0, done=False)
        return web.json_response({
            "task_name": "boil", "var_num": body.get("data_idx", 0), "task_description": "Your task is to boil water.",
            "observation": obs, "reward": 0, "score": 0, "deleted": False, "done": False,
        })

    async def step(self, body):
        state = self.env(body)
        if state is None:
            return self.not_valid(body)
        if (fault := await self.faulty()) is not None:
            return fault
        action, before = body.get("action", ""), state["score"]
        if action == "activate stove":
            state.update(observation="The stove is now activated.", score=50)
        elif action == "focus on water" and state["score"] >= 50:
            state.update(observation="You focus on the water. It boils.", score=100, done=True)
        else:
            state["observation"] = "No known action matches that input."
        out = {"observation": state["observation"], "reward": state["score"] - before, "score": state["score"],
               "done": state["done"]}
        if self.broken == "shape":
            out["done"] = "maybe"
        return web.json_response(out)


class SearchQAServer(FakeAgentGymServer):
    """Question: the capital of Talsa. `<search>` returns a document, `<answer>Orrin</answer>` is right."""

    id_field = "env_idx"
    PROMPT = "Answer the given question. ... Question: What is the capital of Talsa?\n"
    ACTION = re.compile(r"<(search|answer)>(.*?)</\1>", re.DOTALL)

    async def create(self, body):
        env_id = self.new_id()
        self.envs[env_id] = {"observation": "", "done": False}
        return web.json_response(env_id)

    async def reset(self, body):
        state = self.env(body)
        if state is None:
            return web.json_response({"detail": "env_idx not found"}, status=404)
        state.update(observation=self.PROMPT, done=False, item=body.get("id"))
        return web.json_response(self.PROMPT)

    async def step(self, body):
        state = self.env(body)
        if state is None:
            return web.json_response({"detail": "env_idx not found"}, status=404)
        if (fault := await self.faulty()) is not None:
            return fault
        m = self.ACTION.search(body.get("action", ""))
        reward, done = 0.0, False
        if m is None:
            obs = ("\nMy previous action is invalid. If I want to search, I should put the query between "
                   "<search> and </search>. If I want to give the final answer, I should put the answer "
                   "between <answer> and </answer>. Let me try again.\n")
        elif m.group(1) == "search":
            obs = "\n\n<information>Doc 1(Title: Orrin) Orrin is the capital of Talsa.</information>\n\n"
        elif m.group(2).strip().lower() == "orrin":
            obs, reward, done = "", 1.0, True
        else:
            obs = "Sorry, your answer is incorrect. Please try again."
        state.update(observation=obs, done=done)
        out = {"observation": obs, "reward": reward, "done": done, "info": None}
        if self.broken == "shape":
            out = [obs, reward, done]
        return web.json_response(out)

    async def close(self, body):
        env_id = int(body.get("env_idx", -1))
        self.envs.pop(env_id, None)
        self.closed.append(env_id)
        return web.json_response(None)


class WebArenaServer(FakeAgentGymServer):
    """Objective: read the order total. ```click [12]``` opens it, ```stop [$42]``` answers (reward 1)."""

    id_field = "env_idx"

    async def create(self, body):
        env_id = self.new_id()
        self.envs[env_id] = {"observation": "", "done": False}
        return web.json_response({"env_idx": env_id})

    async def reset(self, body):
        state = self.env(body)
        if state is None:
            return web.json_response({"detail": "env_idx not found"}, status=404)
        if body.get("idx") == 999:
            return web.json_response({"observation": "TimeoutError", "sites": [], "object": None})
        obs = ("OBJECTIVE: What is the total of my latest order?\nURL: http://shop.local/\n"
               "[1] RootWebArea 'Shop'\n  [12] link 'My Orders'\nPREVIOUS ACTION: None")
        state.update(observation=obs, done=False)
        return web.json_response({"observation": obs, "sites": ["shopping"], "object": {"task_id": body.get("idx")}})

    async def step(self, body):
        state = self.env(body)
        if state is None:
            return web.json_response({"detail": "env_idx not found"}, status=404)
        if (fault := await self.faulty()) is not None:
            return fault
        found = re.findall(r"```(.*?)```", body.get("action", ""), re.DOTALL)
        action = found[-1].strip() if found else ""
        reward, terminated = 0.0, False
        if action == "click [12]":
            obs = "URL: http://shop.local/orders\n[30] cell 'Order #7'\n[31] cell 'Total: $42'"
        elif action.startswith("stop ["):
            obs, terminated = "The task has ended.", True
            reward = 1.0 if action == "stop [$42]" else 0.0
        else:
            obs = f"Invalid action: {action!r}"
        state.update(observation=obs, done=terminated)
        return web.json_response({"observation": obs, "reward": reward, "terminated": terminated, "truncated": False,
                                  "info": {}})

    async def close(self, body):
        env_id = int(body.get("env_idx", -1))
        self.envs.pop(env_id, None)
        self.closed.append(env_id)
        return web.json_response({"closed": True})


SERVERS: dict[str, type[FakeAgentGymServer]] = {
    "babyai": BabyAIServer,
    "textcraft": TextCraftServer,
    "sciworld": SciWorldServer,
    "searchqa": SearchQAServer,
    "webarena": WebArenaServer,
}


async def start_server(family: str) -> tuple[FakeAgentGymServer, TestServer]:
    """Start `family`'s server on 127.0.0.1, port 0 (the OS picks; read back from the bound socket)."""
    fake = SERVERS[family]()
    server = TestServer(fake.app, host="127.0.0.1", port=0)
    await server.start_server()
    return fake, server
