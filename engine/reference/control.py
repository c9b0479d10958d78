"""Control and weight endpoints (docs/sglang.md §2-§4): pause/continue, aborts, cache flush, weight updates.

The locking is SGLang's (§2): a weight update takes the generation lock as the writer, so it waits
for in-flight `/generate` calls and new ones wait behind it, unless the server is paused, in which
case it goes straight to the model lock (a step and an update never overlap). Every failure answers
`{"success": false, "message": ...}` with 400 and leaves the served weights as they were, except the
one case the contract names: weights updated but the cache not flushed.
"""

import asyncio
import os

import msgspec
from aiohttp import web
from tidal.engine.reference.api import control_error, framework_error, json_encode, read_json
from tidal.engine.reference.config import STATE, ServerState
from tidal.protocol.sglang import (
    WEIGHT_UPDATE_GROUP,
    AbortRequest,
    BeginWeightUpdateRequest,
    ContinueRequest,
    ControlResponse,
    DestroyWeightsUpdateGroupRequest,
    EndWeightUpdateRequest,
    InitWeightsUpdateGroupRequest,
    PauseRequest,
    StatusResponse,
    UpdateWeightsFromDiskRequest,
    UpdateWeightsFromDistributedRequest,
    UpdateWeightsFromTensorRequest,
    UpdateWeightVersionRequest,
)

__all__ = ["routes"]

routes = web.RouteTableDef()


async def _body(request: web.Request, cls: type):
    """A required JSON object body (0.5.23: a bodyless POST is a 400 'Field required')."""
    raw = await read_json(request)
    if not raw.strip():
        raise framework_error(f"Field required: {request.path} needs a JSON object body, e.g. {{}}")
    try:
        return msgspec.json.decode(raw, type=cls)
    except msgspec.DecodeError as exc:
        raise framework_error(f"{request.path}: {exc}") from None


def _ok(reply: msgspec.Struct) -> web.Response:
    return web.Response(body=json_encode(reply), content_type="application/json")


def _flushable(state: ServerState) -> bool:
    """No KV held by any request: nothing running, and nothing queued unless paused (retracted
    requests wait without KV, so a retract pause may flush)."""
    s = state.scheduler
    return not s.running and (s.paused or not s.waiting)


def _flush(state: ServerState) -> None:
    if state.stepper.cache is not None:
        state.stepper.cache.clear()
    state.count("cache_flushes")


# --- pause, continue, abort, flush (§4) ---------------------------------------------------------


@routes.post("/pause_generation")
async def pause_generation(request: web.Request) -> web.Response:
    req = await _body(request, PauseRequest)
    await request.app[STATE].scheduler.pause(req.mode)
    return _ok(StatusResponse("Generation paused successfully."))


@routes.post("/continue_generation")
async def continue_generation(request: web.Request) -> web.Response:
    await _body(request, ContinueRequest)
    request.app[STATE].scheduler.resume()
    return _ok(StatusResponse("Generation continued successfully."))


@routes.post("/abort_request")
async def abort_request(request: web.Request) -> web.Response:
    req = await _body(request, AbortRequest)
    state: ServerState = request.app[STATE]
    if req.abort_all:
        state.scheduler.abort(abort_all=True)
    elif req.rid:
        state.scheduler.abort(req.rid)
    return web.Response(status=200)


@routes.route("*", "/flush_cache")
async def flush_cache(request: web.Request) -> web.Response:
    state: ServerState = request.app[STATE]
    timeout = request.query.get("timeout")
    if timeout is not None and not _flushable(state):
        try:
            async with asyncio.timeout(float(timeout)):
                while not _flushable(state):
                    await asyncio.sleep(0.02)
        except TimeoutError:
            return web.Response(status=400, text="Timed out waiting for idle state.\n")
        except ValueError:
            raise framework_error(f"timeout must be a number of seconds, got {timeout!r}") from None
    if not _flushable(state):
        return web.Response(status=400, text="Cache not flushed because there are pending requests.\n")
    _flush(state)
    return web.Response(
        text="Cache flushed.\nPlease check backend logs for more details. "
             "(When there are running or waiting requests, the operation will not be performed.)\n"
    )


# --- weight updates (§3) ------------------------------------------------------------------------


async def _locked_update(state: ServerState, abort_all: bool, load) -> int:
    """Run `load()` under SGLang's locking; returns how many requests were paused meanwhile."""
    sched = state.scheduler
    if abort_all:
        sched.abort(abort_all=True)
    if sched.paused:
        async with sched.model_lock:
            await load()
        return len(sched.seqs)
    await sched.gen_lock.acquire_write()
    try:
        async with sched.model_lock:
            await load()
    finally:
        await sched.gen_lock.release_write()
    return 0


def _finish_update(state: ServerState, version: str | None, flush: bool, message: str) -> str:
    """Set the new version; returns the success message, or raises the 'not flushed' 400."""
    if version is not None:
        state.scheduler.version = version
        message += f" Weight version updated to {version}."
    state.count("weight_updates")
    if flush and _flushable(state):
        _flush(state)
    elif flush:
        raise control_error("Weights were updated, but the cache was not flushed because there are "
                            "running or waiting requests; use flush_cache: false while paused in_place.")
    return message


@routes.post("/update_weights_from_disk")
async def update_weights_from_disk(request: web.Request) -> web.Response:
    req = await _body(request, UpdateWeightsFromDiskRequest)
    state: ServerState = request.app[STATE]

    async def load():
        if state.simulated:
            if not os.path.exists(req.model_path):
                raise FileNotFoundError(f"{req.model_path} does not exist")
        else:
            await state.stepper.run(state.stepper.load_from_disk, req.model_path)

    try:
        paused = await _locked_update(state, req.abort_all_requests, load)
    except Exception as exc:  # a bad checkpoint is the caller's error: old weights stay
        state.count("weight_update_failures")
        raise control_error(f"Failed to update weights: {exc}. Rolling back to the old weights.") from None
    state.model_path = state.served_model_name = req.model_path
    message = _finish_update(state, req.weight_version, req.flush_cache, "Succeeded to update model weights.")
    return _ok(ControlResponse(success=True, message=message, num_paused_requests=paused))


@routes.post("/update_weight_version")
async def update_weight_version(request: web.Request) -> web.Response:
    req = await _body(request, UpdateWeightVersionRequest)
    state: ServerState = request.app[STATE]
    if req.abort_all_requests:
        state.scheduler.abort(abort_all=True)
    async with state.scheduler.model_lock:
        state.scheduler.version = req.new_version
    return _ok(ControlResponse(success=True, message=f"Weight version updated to {req.new_version}",
                               new_version=req.new_version))


@routes.post("/init_weights_update_group")
async def init_weights_update_group(request: web.Request) -> web.Response:
    req = await _body(request, InitWeightsUpdateGroupRequest)
    state: ServerState = request.app[STATE]
    if state.simulated:
        raise control_error("Failed to initialize custom process group: not available with --simulate.")
    if req.group_name in state.groups:
        raise control_error(f"Failed to initialize custom process group: {req.group_name!r} already exists.")
    from tidal.engine.reference.weight_group import WeightGroup

    try:
        group = await asyncio.to_thread(
            WeightGroup, master_address=req.master_address, master_port=int(req.master_port),
            rank=req.rank_offset, world_size=req.world_size, group_name=req.group_name, backend=req.backend,
            device=state.stepper.device if state.stepper.device.type == "cuda" else "cuda",
        )
    except Exception as exc:  # rendezvous failures are reported, the server keeps serving
        raise control_error(f"Failed to initialize custom process group: {exc}") from None
    state.groups[req.group_name] = group
    return _ok(ControlResponse(success=True, message="Succeeded to initialize custom process group."))


@routes.post("/destroy_weights_update_group")
async def destroy_weights_update_group(request: web.Request) -> web.Response:
    req = await _body(request, DestroyWeightsUpdateGroupRequest)
    group = request.app[STATE].groups.pop(req.group_name, None)
    if group is None:
        raise control_error("The group to be destroyed does not exist.")
    group.close()
    return _ok(ControlResponse(success=True, message="Succeeded to destroy custom process group."))


def _check_session(state: ServerState, what: str) -> None:
    if state.cfg.server.require_weight_update_session and not state.update_session_open:
        raise control_error(f"{what} must run between begin_weight_update() and end_weight_update().")


@routes.post("/update_weights_from_distributed")
async def update_weights_from_distributed(request: web.Request) -> web.Response:
    req = await _body(request, UpdateWeightsFromDistributedRequest)
    state: ServerState = request.app[STATE]
    _check_session(state, "update_weights_from_distributed")
    group_name = req.group_name or WEIGHT_UPDATE_GROUP
    group = state.groups.get(group_name)
    if group is None:
        raise control_error(f"Failed to update parameter online: no group named {group_name!r}; "
                            "call /init_weights_update_group first.")
    runner = state.stepper

    def receive_and_load():
        runner.load_tensors(group.receive(req.names, req.dtypes, req.shapes,
                                          flattened=req.load_format == "flattened_bucket"))

    async def load():
        await runner.run(receive_and_load)

    try:
        await _locked_update(state, req.abort_all_requests, load)
    except Exception as exc:  # shape/name mismatch or a broken group: reported, server keeps running
        state.count("weight_update_failures")
        raise control_error(f"Failed to update parameter online: {exc}") from None
    message = _finish_update(state, req.weight_version, req.flush_cache, "Succeeded to update parameter online.")
    return _ok(ControlResponse(success=True, message=message))


@routes.post("/update_weights_from_tensor")
async def update_weights_from_tensor(request: web.Request) -> web.Response:
    """Colocated CUDA-IPC updates cannot reach a CPU server: accepted, payload ignored (§3.4)."""
    req = await _body(request, UpdateWeightsFromTensorRequest)
    state: ServerState = request.app[STATE]
    _check_session(state, "update_weights_from_tensor")

    async def load():
        return None

    await _locked_update(state, req.abort_all_requests, load)
    message = _finish_update(state, req.weight_version, req.flush_cache, "Succeeded to update model weights.")
    return _ok(ControlResponse(success=True, message=message))


@routes.post("/begin_weight_update")
async def begin_weight_update(request: web.Request) -> web.Response:
    await _body(request, BeginWeightUpdateRequest)
    state: ServerState = request.app[STATE]
    if state.update_session_open:
        raise control_error("a weight-update session is already open")
    state.update_session_open = True
    return _ok(ControlResponse(success=True, message="Weight update session opened."))


@routes.post("/end_weight_update")
async def end_weight_update(request: web.Request) -> web.Response:
    await _body(request, EndWeightUpdateRequest)
    state: ServerState = request.app[STATE]
    if not state.update_session_open:
        raise control_error("no weight-update session is open; call begin_weight_update() first")
    state.update_session_open = False
    return _ok(ControlResponse(success=True, message="Weight update session closed."))
