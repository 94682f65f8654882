"""The HTTP layer: `/v1/models` and `/v1/chat/completions` on FastAPI, served by uvicorn, and
the agent proxy's routes (`/v1/episodes/{episode}/chat/completions`, `.../reward`).

Errors are answered in the OpenAI shape, `{"error": {"message", "type", "param", "code"}}`:
400 for a malformed request or a context overflow (`protocol.APIError`), 429 when the
engine's queue is full, 500 for anything unexpected; the server goes on serving after each.
`start_in_thread` runs the server in a background thread (tests, benchmarks, agent programs
that embed it).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from jaxrl_async.serve.protocol import APIError, parse_chat_request
from jaxrl_async.serve.service import ChatService

log = logging.getLogger(__name__)


def make_app(service: ChatService) -> FastAPI:
    # (FastAPI reads the handlers' annotations: Request must be a module global, as it is.)
    app = FastAPI(title="jaxrl_async", docs_url=None, redoc_url=None)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):
        log.exception("request failed")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)

    @app.get("/v1/models")
    async def models():
        return service.models()

    async def json_body(request: Request):
        try:
            return await request.json()
        except ValueError:
            raise APIError(400, "the request body is not valid JSON") from None

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        episode = request.headers.get("x-episode-id") or None
        return await service.complete(parse_chat_request(await json_body(request)), episode)

    # The agent proxy (serve/episodes.py): calls tied to an episode, then its reward.
    @app.post("/v1/episodes/{episode}/chat/completions")
    async def episode_chat_completions(episode: str, request: Request):
        return await service.complete(parse_chat_request(await json_body(request)), episode)

    @app.post("/v1/episodes/{episode}/reward")
    async def episode_reward(episode: str, request: Request):
        body = await json_body(request)
        reward = body.get("reward") if isinstance(body, dict) else None
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise APIError(400, "reward: a number is required", param="reward")
        group = body.get("group")
        if group is not None and not isinstance(group, str):
            raise APIError(400, "group: must be a string", param="group")
        # Off the event loop: a complete group goes to the sink, which may block (a full trajectory queue).
        traj = await asyncio.to_thread(service.recorder.finish, episode, float(reward),
                                       bool(body.get("success", False)), group)
        return {"episode": episode, "tokens": int(traj.length), "generated_tokens": int(traj.loss_mask.sum()),
                "reward": traj.reward, "group_id": traj.group_id}

    return app


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_in_thread(service: ChatService, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0):
    """Starts uvicorn on a daemon thread; returns (server, base_url). `server.should_exit = True` stops it."""
    import uvicorn

    port = port or free_port(host)
    server = uvicorn.Server(uvicorn.Config(make_app(service), host=host, port=port, log_level="warning",
                                           access_log=False))
    thread = threading.Thread(target=server.run, name="serve-http", daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        if not thread.is_alive() or time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    server.thread = thread
    return server, f"http://{host}:{port}/v1"
