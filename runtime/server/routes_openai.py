"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from quantrt.server.formatting import StreamTracker, TokenText, chat_logprobs, completion_logprobs, finish
from quantrt.server.openai_protocol import ApiError, ChatCompletionRequest, CompletionRequest
from quantrt.server.state import (
    ServerState,
    collect,
    first_snapshot,
    new_id,
    parse_body,
    sse,
    until_disconnect,
    usage,
)

router = APIRouter()
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    s = _state(request)
    return {"object": "list", "data": [_model_card(s)]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    s = _state(request)
    s.check_model(model_id)
    return _model_card(s)


def _model_card(s: ServerState) -> dict[str, Any]:
    return {"id": s.model_name, "object": "model", "created": s.created, "owned_by": "quantrt",
            "root": s.engine.server_args.model_path, "max_model_len": s.context_len}


# --------------------------------------------------------------------- chat
@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    s = _state(request)
    body = await parse_body(request, ChatCompletionRequest)
    s.check_model(body.model)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    try:
        prompt = s.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # a template that refuses the roles/ordering
        raise ApiError(400, f"cannot apply the chat template: {e}", param="messages") from e
    ids = list(s.tokenizer.encode(prompt, add_special_tokens=False))
    max_new = s.max_new_tokens(len(ids), body.max_new())
    agen = s.submit(input_ids=[ids] * body.n,
                    sampling_params=[body.sampling_params(max_new, j) for j in range(body.n)],
                    return_logprob=body.logprobs, top_logprobs_num=body.top_logprobs or 0)
    first = await first_snapshot(agen)
    rid, created, tok = new_id("chatcmpl"), int(time.time()), TokenText(s.tokenizer)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _chat_stream(agen, first, rid, created, s.model_name, body.n, body.logprobs, include_usage, tok)
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)
    last = await until_disconnect(request, lambda: collect(agen, first))
    choices = []
    for i in range(body.n):
        snap = last[i]
        choices.append({"index": i, "message": {"role": "assistant", "content": snap["text"]},
                        "logprobs": chat_logprobs(snap["meta_info"], tok) if body.logprobs else None,
                        "finish_reason": finish(snap)})
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": s.model_name,
                         "choices": choices, "usage": _usage(last, len(ids))})


async def _chat_stream(agen: AsyncIterator[list[dict]], first: list[dict] | None, rid: str, created: int,
                       model: str, n: int, logprobs: bool, include_usage: bool,
                       tok: TokenText) -> AsyncIterator[bytes]:
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
    track, last = StreamTracker(), {}
    for i in range(n):
        yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]})
    try:
        batch = first
        while batch is not None:
            for snap in batch:
                last[snap["index"]] = snap
                text = track.delta(snap)
                lp = None
                if logprobs:
                    a, b = track.new_logprobs(snap)
                    lp = chat_logprobs(snap["meta_info"], tok, a, b)
                reason = finish(snap)
                if text or reason or (lp and lp["content"]):
                    yield sse({**head, "choices": [{"index": snap["index"], "delta": {"content": text},
                                                    "logprobs": lp, "finish_reason": reason}]})
            batch = await anext(agen, None)
    finally:
        await agen.aclose()  # type: ignore[attr-defined]
    if include_usage:
        yield sse({**head, "choices": [], "usage": _usage(last, None)})
    yield sse("[DONE]")


def _usage(last: dict[int, dict], prompt_tokens: int | None) -> dict[str, Any]:
    """Usage of one chat request: its n choices share one prompt."""
    metas = [s["meta_info"] for s in last.values()]
    if prompt_tokens is None:
        prompt_tokens = metas[0]["prompt_tokens"] if metas else 0
    return usage(prompt_tokens, sum(m["completion_tokens"] for m in metas),
                 max((m["cached_tokens"] for m in metas), default=0))


# --------------------------------------------------------------------- completions
@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    s = _state(request)
    body = await parse_body(request, CompletionRequest)
    s.check_model(body.model)
    prompts = body.prompts()
    ids_list = [s.encode(p) if isinstance(p, str) else p for p in prompts]
    texts = [p if isinstance(p, str) else s.tokenizer.decode(p) for p in prompts]
    for ids in ids_list:
        s.check_ids(ids)
    budgets = [s.max_new_tokens(len(ids), body.max_tokens) for ids in ids_list]
    n = body.n
    want_lp = body.logprobs is not None
    echo_lp = body.echo and want_lp
    agen = s.submit(input_ids=[ids for ids in ids_list for _ in range(n)],
                    sampling_params=[body.sampling_params(budgets[p], j) for p in range(len(prompts))
                                     for j in range(n)],
                    return_logprob=want_lp, logprob_start_len=0 if echo_lp else -1,
                    top_logprobs_num=body.logprobs or 0)
    first = await first_snapshot(agen)
    rid, created, tok = new_id("cmpl"), int(time.time()), TokenText(s.tokenizer)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _completion_stream(agen, first, rid, created, s.model_name, texts, n, body, include_usage, tok)
        return StreamingResponse(gen, media_type="text/event-stream", headers=SSE_HEADERS)
    last = await until_disconnect(request, lambda: collect(agen, first))
    choices = []
    for i in range(len(prompts) * n):
        snap, base = last[i], texts[i // n]
        text = base + snap["text"] if body.echo else snap["text"]
        lp = completion_logprobs(snap["meta_info"], tok, body.echo) if want_lp else None
        if lp is not None and body.echo and isinstance(prompts[i // n], str):
            lp["text_offset"] = _offsets(lp["tokens"])
        choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish(snap)})
    metas = [last[i]["meta_info"] for i in range(len(choices))]
    prompt_tokens = sum(len(ids) for ids in ids_list)
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": s.model_name,
                         "choices": choices,
                         "usage": usage(prompt_tokens, sum(m["completion_tokens"] for m in metas),
                                        sum(m["cached_tokens"] for m in metas))})


def _offsets(tokens: list[str]) -> list[int]:
    out, at = [], 0
    for t in tokens:
        out.append(at)
        at += len(t)
    return out


async def _completion_stream(agen: AsyncIterator[list[dict]], first: list[dict] | None, rid: str, created: int,
                             model: str, texts: list[str], n: int, body: CompletionRequest,
                             include_usage: bool, tok: TokenText) -> AsyncIterator[bytes]:
    head = {"id": rid, "object": "text_completion", "created": created, "model": model}
    track, last = StreamTracker(), {}
    if body.echo:
        for i in range(len(texts) * n):
            yield sse({**head, "choices": [{"index": i, "text": texts[i // n], "logprobs": None,
                                            "finish_reason": None}]})
    try:
        batch = first
        while batch is not None:
            for snap in batch:
                last[snap["index"]] = snap
                text = track.delta(snap)
                lp = None
                if body.logprobs is not None:
                    a, _ = track.new_logprobs(snap)
                    lp = completion_logprobs(snap["meta_info"], tok, False, start=a)
                reason = finish(snap)
                if text or reason or (lp and lp["tokens"]):
                    yield sse({**head, "choices": [{"index": snap["index"], "text": text, "logprobs": lp,
                                                    "finish_reason": reason}]})
            batch = await anext(agen, None)
    finally:
        await agen.aclose()  # type: ignore[attr-defined]
    if include_usage:
        metas = [last[i]["meta_info"] for i in sorted(last)]
        prompt = sum(m["prompt_tokens"] for j, m in enumerate(metas) if j % n == 0)
        yield sse({**head, "choices": [], "usage": usage(prompt, sum(m["completion_tokens"] for m in metas))})
    yield sse("[DONE]")
