"""The HTTP routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``.

``create_app(service)`` returns the FastAPI app. A request body is read here (at most ``max_body`` bytes),
decoded as UTF-8 and validated by the strict pydantic models of ``schemas``; every mistake in it (malformed
or truncated JSON, a body that is not UTF-8, a missing or wrong-typed field, an unknown role, an
out-of-range setting, a prompt or budget beyond the context, too many choices, an unknown model) is a 4xx
with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``. FastAPI's own errors (unknown
routes, validation) get the same body; anything unexpected is a 500 with it, never a dropped connection.

A client that goes away (closes a stream, or gives up on a non-streamed request) cancels its engine
requests at once: a watcher waits for the ``http.disconnect`` message while the answer is generated (a send
to a closed connection does not fail under every ASGI server, so a stream cannot rely on that).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .responses import Answer, Formatter, sse, usage
from .schemas import APIError, ChatCompletionRequest, CompletionRequest, error_param
from .service import Piece, Service

log = logging.getLogger("jaxrl_llm.serve")
MAX_BODY = 16 * 2**20


def _error(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg', '')}", None
    param = error_param(tuple(first.get("loc", ())))
    parts = [
        f"{error_param(tuple(e.get('loc', ()))) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:3]
    ]
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more, param


async def _read(request: Request, model: type[BaseModel], max_body: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise APIError(f"the body is larger than {max_body} bytes", status=413)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_body:
            raise APIError(f"the body is larger than {max_body} bytes", status=413)
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as err:
        raise APIError(f"the body is not UTF-8 text (byte {err.start}: {err.reason})") from None
    if not text.strip():
        raise APIError("the body is empty: expected a JSON object")
    try:
        parsed = model.model_validate_json(text)
    except ValidationError as err:
        message, param = _validation_message(err.errors(include_url=False))
        raise APIError(message, param=param) from None
    try:
        parsed.model_dump_json()  # lone surrogates ("\ud800") pass JSON but not any tokenizer
    except (ValueError, UnicodeError):
        raise APIError("the body holds invalid Unicode (a lone surrogate)") from None
    return parsed


async def _until_disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _watched(pieces: AsyncIterator[Piece], request: Request) -> AsyncIterator[Piece]:
    """``pieces`` until they end or the client disconnects (then the generation is cancelled)."""
    watcher = asyncio.ensure_future(_until_disconnected(request))
    step: asyncio.Future | None = None
    try:
        while True:
            step = asyncio.ensure_future(anext(pieces))
            await asyncio.wait({step, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                log.info("client disconnected; its generation is cancelled")
                return
            try:
                piece = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield piece
    finally:
        watcher.cancel()
        if step is not None and not step.done():
            # The generator is running in ``step`` (the client left, or the server cancelled this task):
            # cancelling it ends the generator, whose ``finally`` cancels the engine requests.
            step.cancel()
        else:
            await pieces.aclose()


def create_app(service: Service, *, max_body: int = MAX_BODY) -> FastAPI:
    """The server's FastAPI app over a started ``service``."""
    app = FastAPI(title="jaxrl_llm", summary=f"OpenAI-compatible API for {service.name}")
    app.state.service = service

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return _error(err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(err.errors()) or [{"msg": "invalid request"}])
        return _error(APIError(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if err.status_code == 404 else None
        return _error(APIError(str(err.detail), status=err.status_code, code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s", request.url.path)
        return _error(APIError(f"internal error: {type(err).__name__}", status=500, type="server_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = service.engine
        return {
            "status": "ok",
            "slots": service.slots,
            "busy_slots": engine.busy_slots,
            "waiting": engine.waiting,
        }

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": service.name,
            "object": "model",
            "created": service.created,
            "owned_by": "jaxrl_llm",
            "root": service.root,
            "max_model_len": service.max_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await _complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete(request, "text")

    async def _complete(request: Request, kind: str) -> Any:
        try:
            body = await _read(
                request, ChatCompletionRequest if kind == "chat" else CompletionRequest, max_body
            )
        except ClientDisconnect:  # the body never arrived whole
            return JSONResponse(APIError("the body was cut short").body(), status_code=400)
        body.unsupported()
        if body.model not in (None, "", service.name):
            raise APIError(
                f"the model {body.model!r} does not exist; this server serves {service.name!r}",
                status=404,
                param="model",
                code="model_not_found",
            )
        if kind == "chat":
            messages, tools = body.canonical()
            prompts = [service.chat_prompt(messages, tools)]
            logprobs, top, calls = body.logprobs, body.top_logprobs or 0, body.parse_calls()
        else:
            prompts = [service.text_prompt(p) for p in body.prompts()]
            logprobs, top, calls = body.logprobs is not None, body.logprobs or 0, False
        prompt_tokens = sum(map(len, prompts))
        settings = service.settings(
            [len(p) for p in prompts],
            body.budget(),
            prompt_param="messages" if kind == "chat" else "prompt",
            sampling=body.sampling(),
            stop=body.stop_strings(),
            n=body.n,
            seed=body.seed,
            logprobs=logprobs,
            top_logprobs=top,
            ignore_eos=body.ignore_eos,
        )
        fmt = Formatter(service.tokenizer, service.name, kind)
        answers = [Answer(i, calls) for i in range(len(prompts) * body.n)]
        pieces = _watched(service.generate(prompts, settings), request)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _stream(fmt, answers, pieces, logprobs, include_usage, prompt_tokens)
            return StreamingResponse(
                events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
            )
        async with contextlib.aclosing(pieces):
            async for piece in pieces:
                answers[piece.index].add(piece)
        if any(a.finish_reason is None for a in answers):
            return JSONResponse({}, status_code=499)  # the client is gone; nobody reads this
        failed = next((a for a in answers if a.finish_reason == "error"), None)
        if failed is not None:
            raise APIError(f"the generation failed: {failed.error}", status=500, type="server_error")
        return fmt.completion(answers, usage(prompt_tokens, answers), logprobs)

    return app


async def _stream(
    fmt: Formatter,
    answers: list[Answer],
    pieces: AsyncIterator[Piece],
    logprobs: bool,
    include_usage: bool,
    prompt_tokens: int,
) -> AsyncIterator[str]:
    """Server-sent events: an opening chunk per chat answer, a chunk per piece with text or log-probs, the
    last one with its finish_reason; an error event for a failed answer; usage; ``data: [DONE]``."""
    async with contextlib.aclosing(pieces):
        if fmt.kind == "chat":
            for a in answers:
                yield sse(fmt.chunk(a, "", [], logprobs=False, role=True, usage=include_usage))
        async for piece in pieces:
            answer = answers[piece.index]
            text = answer.add(piece)
            if piece.finish_reason == "error":
                message = f"the generation failed: {piece.error}"
                yield sse(APIError(message, status=500, type="server_error").body())
            if text or piece.tokens or piece.finish_reason:
                chunk = fmt.chunk(
                    answer,
                    text,
                    piece.tokens,
                    logprobs=logprobs,
                    finish=piece.finish_reason is not None,
                    usage=include_usage,
                )
                yield sse(chunk)
        if any(a.finish_reason is None for a in answers):
            return  # the client went away
        if include_usage:
            yield sse(fmt.usage_chunk(usage(prompt_tokens, answers)))
        yield sse("[DONE]")
