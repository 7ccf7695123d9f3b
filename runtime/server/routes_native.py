"""SGLang-native routes: /generate, /health, /health_generate, /get_model_info, /get_server_info."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from quantrt.engine.sampling_params import SamplingParams
from quantrt.errors import QuantrtError
from quantrt.server.openai_protocol import ApiError, GenerateRequest
from quantrt.server.routes_openai import SSE_HEADERS
from quantrt.server.state import (
    ServerState,
    collect,
    first_snapshot,
    parse_body,
    sse,
    until_disconnect,
)

router = APIRouter()
_NUMERIC = ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health")
async def health(request: Request) -> Response:
    ae = _state(request).ae
    if ae.error is not None:
        return JSONResponse({"status": "unhealthy", "error": str(ae.error)}, status_code=503)
    return Response(status_code=200)


@router.get("/health_generate")
async def health_generate(request: Request) -> Response:
    """Health plus one generated token (SGLang's deep health check)."""
    s = _state(request)
    agen = s.submit(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
    await until_disconnect(request, lambda: collect(agen, None))
    return Response(status_code=200)


@router.get("/get_model_info")
async def get_model_info(request: Request) -> dict[str, Any]:
    s = _state(request)
    args = s.engine.server_args
    return {"model_path": args.model_path, "tokenizer_path": args.tokenizer_path or args.model_path,
            "served_model_name": s.model_name, "is_generation": True, "preferred_sampling_params": None,
            "context_length": s.context_len, "architectures": getattr(s.engine.config, "architectures", None),
            "quantization": s.engine.quant_method, "dtype": str(s.engine.dtype).removeprefix("torch.")}


@router.get("/get_server_info")
async def get_server_info(request: Request) -> dict[str, Any]:
    """ServerArgs (api key hidden), platform, quantization, chosen kernels, KV cache dtype and capacity."""
    s = _state(request)
    e = s.engine
    args = dict(e.server_args.to_kwargs())
    if args.get("api_key"):
        args["api_key"] = "***"
    return {**args, "version": _version(), "platform": e.platform.describe(),
            "quantization": e.quant_method, "dtype": str(e.dtype).removeprefix("torch."),
            "kernels": _kernels(e.model),
            "kv_cache": {"dtype": str(e.dtype).removeprefix("torch."), "max_total_tokens": e.max_total_tokens,
                         "bytes_per_token": e.kv_bytes_per_token, "page_size": e.server_args.page_size,
                         "free_tokens": e.allocator.available() * e.server_args.page_size},
            "context_length": s.context_len, "requests_in_flight": s.ae.num_active(),
            "max_queued_requests": s.ae.max_queued}


def _kernels(model: Any) -> dict[str, int]:
    """kernel description -> how many QuantLinear layers use it."""
    from quantrt.layers.linear import QuantLinear

    if model is None:
        return {}
    return dict(Counter(m.kernel_desc for m in model.modules() if isinstance(m, QuantLinear)))


def _version() -> str:
    import quantrt

    return str(getattr(quantrt, "__version__", "unknown"))


# --------------------------------------------------------------------- /generate
@router.post("/generate")
async def generate(request: Request) -> Response:
    s = _state(request)
    body = await parse_body(request, GenerateRequest)
    single = isinstance(body.text, str) or (body.input_ids is not None and isinstance(body.input_ids[0], int))
    if body.text is not None:
        ids_list = [s.encode(t) for t in ([body.text] if isinstance(body.text, str) else body.text)]
    else:
        ids_list = [body.input_ids] if single else list(body.input_ids)  # type: ignore[list-item,arg-type]
    for ids in ids_list:
        if not ids:
            raise ApiError(400, "a prompt is empty", param="text", code="invalid_value")
        s.check_ids(ids)
    params = body.sampling_params if isinstance(body.sampling_params, list) else \
        [body.sampling_params or {}] * len(ids_list)
    if len(params) != len(ids_list):
        raise ApiError(400, f"got {len(params)} sampling_params for {len(ids_list)} prompts",
                       param="sampling_params", code="invalid_value")
    params = [_checked_params(s, p, len(ids)) for p, ids in zip(params, ids_list)]
    agen = s.submit(input_ids=ids_list[0] if single else ids_list, sampling_params=params,
                    return_logprob=body.return_logprob, logprob_start_len=body.logprob_start_len,
                    top_logprobs_num=body.top_logprobs_num)
    first = await first_snapshot(agen)
    if body.stream:
        return StreamingResponse(_generate_stream(agen, first, single), media_type="text/event-stream",
                                 headers=SSE_HEADERS)
    last = await until_disconnect(request, lambda: collect(agen, first))
    outs = [_output(last[i], single) for i in range(len(ids_list))]
    return JSONResponse(outs[0] if single else outs)


def _checked_params(s: ServerState, p: dict[str, Any], prompt_len: int) -> dict[str, Any]:
    """Validate one sampling dict before it reaches the engine loop; fill max_new_tokens."""
    p = dict(p)
    for key in _NUMERIC:
        v = p.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
            raise ApiError(400, f"sampling_params.{key} must be a finite number, got {v!r}",
                           param=f"sampling_params.{key}", code="invalid_value")
    seed = p.get("seed", p.get("sampling_seed"))
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ApiError(400, f"sampling_params.seed must be an integer in [0, 2**63), got {seed!r}",
                       param="sampling_params.seed", code="invalid_value")
    asked = p.get("max_new_tokens", 128)
    if asked is not None and (isinstance(asked, bool) or not isinstance(asked, int)):
        raise ApiError(400, f"sampling_params.max_new_tokens must be an integer, got {asked!r}",
                       param="sampling_params.max_new_tokens", code="invalid_value")
    p["max_new_tokens"] = s.max_new_tokens(prompt_len, asked)
    try:
        sp = SamplingParams.from_dict(p)
    except (QuantrtError, TypeError, ValueError) as e:
        raise ApiError(400, str(e), param="sampling_params", code="invalid_value") from e
    if sp.repetition_penalty < 0.01 or sp.repetition_penalty > 100:
        raise ApiError(400, "sampling_params.repetition_penalty must be in [0.01, 100]",
                       param="sampling_params.repetition_penalty", code="invalid_value")
    if 0 < sp.temperature < 1e-5:  # as SGLang: a tiny temperature is greedy (avoids overflow)
        p["temperature"] = 0.0
    return p


def _output(snap: dict, single: bool) -> dict[str, Any]:
    out = {"text": snap["text"], "output_ids": snap["output_ids"], "meta_info": snap["meta_info"]}
    if not single:
        out["index"] = snap["index"]
    return out


async def _generate_stream(agen: AsyncIterator[list[dict]], first: list[dict] | None,
                           single: bool) -> AsyncIterator[bytes]:
    """SGLang's stream: one event per update with the cumulative text, then [DONE]."""
    try:
        batch = first
        while batch is not None:
            for snap in batch:
                yield sse(_output(snap, single))
            batch = await anext(agen, None)
    finally:
        await agen.aclose()  # type: ignore[attr-defined]
    yield sse("[DONE]")
