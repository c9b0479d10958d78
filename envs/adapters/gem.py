"""`gem:<GEM id>`: environments of the gem-llm package, run unchanged, each with its own RNG.

    env = envs.make("gem:game:GuessTheNumber-v0-easy")
    env = envs.make("gem:rg:letter_counting", wrappers="python_tool_no_int_reward")

GEM's `Env.reset(seed)` reseeds the process-wide `random` and its games draw from it, so two GEM
episodes stepped in turn (as the engine does, 1024 at once) would consume one shared stream and
stop being reproducible. Saving and restoring RNG state around each call would cost ~100 us per
step (numpy's get_state alone is ~40 us), thirty times a GEM game step. Instead the `random` name
inside GEM's modules is bound to a proxy that forwards to the Random of the env being called, and
GEM's `set_seed` seeds that Random. The proxy holds one current env while every `gem:` env is called
inline on the loop thread, and one per thread from the first env that is blocking (offloaded to
worker threads): a store to a thread-local costs five times a plain one, twice a step. The rule
that keeps this sound: an inline env is called from one thread at a time, the engine's loop.
Outside an adapter call the proxy forwards to the real module, so GEM's own code (its vector envs)
behaves as before.

Most GEM games draw only in `reset`, so an inline env's `step` is handed out bare: GEM's own bound
method, with no swap around it (`inline_calls`; the swap's frame and two stores cost ~0.07 us of a
2.3 us game step under 1024 episodes). A draw made outside any swap then finds its env on the stack
(`_bare_step_owner`): the step frame's `self` names it, so even that first draw comes from the env's
own Random, and from then on that step code is called with the swap (Minesweeper draws its mines at
the first reveal, 2048 a tile every move).

Invariant: a `gem:` episode is a function of its seed and actions alone, and equals the episode
plain GEM gives for that seed in a fresh process.

Departure: GEM's `set_seed` also reseeds numpy's global RNG; no GEM env draws from it (Sokoban uses
its own Generator), so the adapter leaves numpy's global state alone.
"""

import contextlib
import functools
import logging
import operator
import random
import sys
import threading
import types
import weakref
from typing import Any

from tidal.envs.core import Env, StepResult
from tidal.envs.registry import register_prefix

__all__ = ["GemEnv", "gem_ids", "plain_gem_modules", "INSTALL_HINT"]

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install -e '.[gem]'  (gem-llm==0.1.0)"

CHEAP_SUITES = ("game:", "rg:")
"""GEM suites whose steps are pure Python in microseconds: called inline. Others (math-verify pools,
code sandboxes, tool wrappers) block and are offloaded."""

_GLOBAL_RNG_FUNCTIONS = frozenset(
    name for name in dir(random) if getattr(getattr(random, name), "__self__", None) is random._inst
)
"""`random.randint` & co.: the module functions that are methods of the hidden global Random."""

_patched: set[str] = set()
_original_set_seed = None
_modules_seen = 0


_bare_steps: dict[types.CodeType, bool] = {}
"""Code of the GEM `step` methods that may be handed out bare: True while they are (no draw seen
in them), False once one drew. Keyed by code, so every class sharing a `step` learns together."""
_owners: "weakref.WeakValueDictionary[int, GemEnv]" = weakref.WeakValueDictionary()
"""id(GEM env) -> its GemEnv, for every env whose step code is in `_bare_steps`."""


def _bare_step_owner() -> "GemEnv | None":
    """The GemEnv whose bare step is on this thread's stack, if a draw outside any swap comes from one.

    A draw in a bare step meets the proxy with no env set; walking up to the step's frame finds
    the GEM env as its `self`, so the draw can still use that env's Random. The step code is marked
    as drawing: its envs get the swapped step from their next episode on. Costs microseconds, and
    runs once per drawing step code (plus the draws of steps already in flight).
    """
    if not _owners:
        return None
    frame = sys._getframe(2)  # the GEM code that draws: skip this and the property that called it
    while frame is not None:
        code = frame.f_code
        if code in _bare_steps:  # a swapped step never gets here: its draws meet the proxy with its env set
            gem_env = frame.f_locals.get(code.co_varnames[0])
            owner = _owners.get(id(gem_env))
            if owner is not None and owner.gem_env is gem_env:
                if _bare_steps[code]:
                    _bare_steps[code] = False
                    for env in list(_owners.values()):
                        if env._step_code is code:
                            env._refresh_calls()
                    log.info("gem:%s draws from random in step: its steps now run with the RNG swap", owner.gem_id)
                return owner
        frame = frame.f_back
    return None


class _OutsideState:
    """The proxy's `_env` outside swaps: `rng` and `draws` are the real module, unless the draw
    comes from a bare inline step (`_bare_step_owner`), which gets its own env's."""

    @property
    def rng(self) -> Any:
        owner = _bare_step_owner()
        return random if owner is None else owner.rng

    @property
    def draws(self) -> Any:
        owner = _bare_step_owner()
        return random if owner is None else owner.draws


_Outside = _OutsideState()


class _Draws:
    """The module-level functions of one Random (`randint` & co.), each bound once on first use, so a
    proxy lookup is a dict hit instead of a bound method made per call (GEM draws in every reset)."""

    def __init__(self, rng: random.Random):
        self.__dict__["_rng"] = rng

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._rng, name)
        self.__dict__[name] = value
        return value


class _RandomProxy:
    """Stands in for `random` inside GEM modules: `random.randint` & co. come from `rng` of the env
    being called (`_env`), or from the real module outside adapter calls.

    The hot path is the swap around each step, so it stores the env, which the call has in cache
    anyway, not its Random (a 2.5 KB object whose refcount a store would touch, a cache miss per step
    at 1024 envs). Lookups stay in C: a property whose getter is `attrgetter("_env.draws.randint")`,
    and no Python `__getattr__` (it would slow every lookup), so the module's other names are
    copied onto the class. `_env` is a slot: a store is ~10 ns, a `threading.local` one ~50 ns, and
    there are two per step."""

    __slots__ = ("_env",)

    def __init__(self) -> None:
        self._env: Any = _Outside


class _ThreadRandomProxy(threading.local):
    """`_RandomProxy` with one `_env` per thread, installed once a `gem:` env may run off the loop
    thread (`_share_across_threads`): offloaded envs in worker threads then keep their own Random
    while the loop steps inline ones."""

    def __init__(self) -> None:
        self._env: Any = _Outside


for _name in dir(random):
    for _cls in (_RandomProxy, _ThreadRandomProxy):
        if _name in _GLOBAL_RNG_FUNCTIONS:
            setattr(_cls, _name, property(operator.attrgetter(f"_env.draws.{_name}")))
        elif not _name.startswith("__"):
            setattr(_cls, _name, getattr(random, _name))


_proxy: _RandomProxy | _ThreadRandomProxy = _RandomProxy()
"""What `random` is inside GEM modules. One slot while every `gem:` env is called inline on one
thread; per thread from the first env that may be offloaded (`_share_across_threads`)."""


def _share_across_threads() -> None:
    """Give each thread its own `_env` from now on: a blocking `gem:` env runs in the offload pool.

    Called when such an env is built or marked blocking, before it can run in a thread, so no call
    is in flight on another thread; the switch is one-way for the process.
    """
    global _proxy
    if isinstance(_proxy, _ThreadRandomProxy):
        return
    old, _proxy = _proxy, _ThreadRandomProxy()
    for name in _patched:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "random", None) is old:
            module.random = _proxy


def _isolated_set_seed(seed: int | None = None) -> None:
    """GEM's `seeding.set_seed`, aimed at the calling env's Random instead of the global one."""
    rng = _proxy._env.rng
    if rng is random:
        _original_set_seed(seed)
    else:
        rng.seed(seed)


def _import_gem():
    """`import gem`, leaving the process's logging as it was: gem/__init__.py calls
    `logging.basicConfig(level=INFO)`, which would give the root logger a handler and a level of
    GEM's choosing (then every library's info and debug lines print, e.g. bm25s's)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        import gem
    except ImportError:
        raise ImportError(f"gem: ids need the gem-llm package: {INSTALL_HINT}") from None
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)
    return gem


def _wrapper_fns(gem_id: str, names: str) -> list:
    """GEM's `get_wrapper_fns(names)` without its two prints on stdout, and with an unknown name
    as an error naming the known ones."""
    from gem.wrappers.wrapper_factory import WRAPPER_FACTORY

    fns = []
    for name in names.split(","):
        if name not in WRAPPER_FACTORY:
            raise ValueError(f"gem:{gem_id}: unknown wrapper {name!r}; GEM's wrappers: {', '.join(WRAPPER_FACTORY)}")
        fns.append(WRAPPER_FACTORY[name])
    return fns


def _patch_gem_modules() -> None:
    """Point `random` in every loaded GEM module at the proxy (GEM imports env modules lazily)."""
    global _original_set_seed, _modules_seen
    if len(sys.modules) == _modules_seen:
        return
    _modules_seen = len(sys.modules)
    for name, module in list(sys.modules.items()):
        if name in _patched or not (name == "gem" or name.startswith("gem.")) or module is None:
            continue
        _patched.add(name)
        if getattr(module, "random", None) is random:
            module.random = _proxy
        if name == "gem.utils.seeding" and _original_set_seed is None:
            _original_set_seed = module.set_seed
            module.set_seed = _isolated_set_seed


@contextlib.contextmanager
def plain_gem_modules():
    """GEM's modules with the real `random` for a block, the adapter's proxy again after it.

    For measuring plain GEM in a process that also runs the adapter (bench/envs.py); no `gem:` env
    may be called inside the block.
    """
    _restore_gem_modules()
    try:
        yield
    finally:
        _patch_gem_modules()


def _restore_gem_modules() -> None:
    global _original_set_seed, _modules_seen
    for name in _patched:
        module = sys.modules.get(name)
        if module is not None and getattr(module, "random", None) is _proxy:
            module.random = random
    if _original_set_seed is not None:
        sys.modules["gem.utils.seeding"].set_seed = _original_set_seed
    _patched.clear()
    _original_set_seed, _modules_seen = None, 0


class GemEnv(Env):
    """One GEM env (optionally wrapped by GEM's own wrappers), behind tidal's Env API.

    Args:
        gem_id: a GEM registry id, e.g. "game:Mastermind-v0-easy" or "rg:arc_1d".
        wrappers: GEM wrapper names, comma-separated, applied in order as GEM's
            `get_wrapper_fns` does (e.g. "python_tool,concat"); tool wrappers make the env blocking.
        blocking: override the inline/offloaded choice made from the suite and wrappers.
        **kwargs: passed to `gem.make` (GEM's constructor arguments, e.g. max_turns).
    """

    def __init__(self, gem_id: str, wrappers: str = "", blocking: bool | None = None, **kwargs: Any):
        gem = _import_gem()
        _patch_gem_modules()
        self.gem_id = gem_id
        self.rng = random.Random()
        """This env's own Random, for its whole life (GEM's `set_seed` reseeds it in place)."""
        self.draws = _Draws(self.rng)
        with self._own_rng():
            try:
                inner = gem.make(gem_id, **kwargs)
            except ValueError as exc:
                raise ValueError(f"gem:{gem_id}: {exc}") from None
            _patch_gem_modules()
            if wrappers:
                for wrap in _wrapper_fns(gem_id, wrappers):
                    inner = wrap(inner)
                _patch_gem_modules()
        self.gem_env = inner
        self._step_code = _bare_step_code(inner) if type(self).step is GemEnv.step else None
        if self._step_code is not None:
            _owners[id(inner)] = self
        cheap = gem_id.startswith(CHEAP_SUITES) and "tool" not in wrappers
        self._broken: str | None = None
        self.blocking = (not cheap) if blocking is None else blocking

    @property  # type: ignore[override]
    def blocking(self) -> bool:
        return self._blocking

    @blocking.setter
    def blocking(self, value: bool) -> None:
        if value:
            _share_across_threads()  # before the env can run in an offload thread
        self._blocking = value
        self._refresh_calls()

    @property  # type: ignore[override]
    def broken(self) -> str | None:
        return self._broken

    @broken.setter
    def broken(self, reason: str | None) -> None:
        self._broken = reason
        self._refresh_calls()

    def _refresh_calls(self) -> None:
        """Make `_inline` and the `inline_calls` pair: None unless inline; the bare GEM step while
        its code has not drawn (module docstring), else the swapped `step`. Called when `blocking`,
        `broken` or what the step code is known to do change, not per episode (the env and its
        bound methods form a cycle, which the collector frees)."""
        self._inline = not self._blocking and self._broken is None
        bare = self._inline and _bare_steps.get(self._step_code, False)
        self._calls = (self.reset, self.gem_env.step if bare else self.step) if self._inline else None

    @functools.cached_property
    def instructions(self) -> str:  # type: ignore[override]
        """GEM games' own rules text (drawn with a throwaway RNG, so episodes are untouched); GEM puts
        it in the first observation too. "" for envs without one (rg:*, math: the question is all)."""
        describe = getattr(self.gem_env.unwrapped, "_get_instructions", None)
        if describe is None:
            return ""
        with self._own_rng(random.Random(0)):
            return describe()

    def _own_rng(self, rng: random.Random | None = None) -> "_Active":
        return _Active(self.rng, self.draws) if rng is None else _Active(rng, _Draws(rng))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass that overrides `step`/`reset` gets `Env`'s `astep`/`areset`, which call them."""
        super().__init_subclass__(**kwargs)
        for sync, coro in (("step", "astep"), ("reset", "areset")):
            if sync in vars(cls) and coro not in vars(cls):
                setattr(cls, coro, getattr(Env, coro))

    def reset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        _proxy._env = self
        try:
            return self.gem_env.reset(seed=seed)
        finally:
            _proxy._env = _Outside

    def step(self, action: str) -> StepResult:
        """GEM's step as is (GEM games return float rewards and bool flags)."""
        _proxy._env = self
        try:
            return self.gem_env.step(action)
        finally:
            _proxy._env = _Outside

    async def areset(self, seed: int | None = None) -> tuple[str, dict[str, Any]]:
        """`Env.areset`, with the inline case done in this one frame (see `astep`)."""
        if not self._inline:
            return await super().areset(seed)
        _proxy._env = self
        try:
            return self.gem_env.reset(seed=seed)
        finally:
            _proxy._env = _Outside

    async def astep(self, action: str) -> StepResult:
        """`Env.astep`, with the inline case done in this one frame instead of calling `step`: the hot
        path of 1024 concurrent episodes, where each frame and attribute lookup is a visible share:
        `_inline` (not blocking, not broken) is one lookup instead of two."""
        if not self._inline:
            return await super().astep(action)
        _proxy._env = self
        try:
            return self.gem_env.step(action)
        finally:
            _proxy._env = _Outside

    def inline_calls(self):
        """`Env.inline_calls`: `reset` and `step` when inline (`astep` above is only their fast path),
        the step bare while its code has not drawn (`_refresh_calls`). A subclass that overrides
        `step`/`reset` keeps this, with its own `step`; one that makes `astep` natively async must
        not."""
        return self._calls

    def sample_action(self, rng: random.Random) -> str:
        """GEM's `sample_random_action`, drawing from `rng` so the episode's own stream is untouched."""
        with self._own_rng(rng):
            return self.gem_env.sample_random_action()

    def close(self) -> None:
        close = getattr(self.gem_env, "close", None)
        if close is not None:
            close()


def _bare_step_code(gem_env: Any) -> types.CodeType | None:
    """The code of `gem_env`'s step if it may be handed out bare: a plain Python method, whose first
    argument is the env, so `_bare_step_owner` can find the env from its frame. None for anything
    else (decorated, builtin, `*args`), which always gets the swap."""
    step = getattr(type(gem_env), "step", None)
    if type(step) is not types.FunctionType or hasattr(step, "__wrapped__") or step.__code__.co_argcount < 2:
        return None
    _bare_steps.setdefault(step.__code__, True)
    return step.__code__


class _Active:
    """Makes `rng` the Random that GEM's `random` resolves to in this thread, for a block."""

    __slots__ = ("rng", "draws", "prev")

    def __init__(self, rng: random.Random, draws: _Draws):
        self.rng, self.draws = rng, draws

    def __enter__(self) -> None:
        self.prev, _proxy._env = _proxy._env, self

    def __exit__(self, *exc: object) -> None:
        _proxy._env = self.prev


def gem_ids() -> list[str]:
    """GEM's registered ids, or none when gem-llm is not installed."""
    try:
        gem = _import_gem()
    except ImportError:
        return []
    return sorted(gem.envs.registration.ENV_REGISTRY)


register_prefix("gem", GemEnv, ids=gem_ids)
