"""Request bodies of the HTTP API (pydantic, strict JSON) and the OpenAI-style error shape.

Bodies are validated with `model_validate_json(raw, strict=True)`: a string where a number belongs
is an error (no silent coercion); unknown fields are ignored like OpenAI's API does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

Seed = Annotated[int, Field(ge=-(2**63), le=2**64 - 1)]
StopList = Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class ApiError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with `status`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body OpenAI clients parse."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def from_validation_error(e: ValidationError) -> ApiError:
    """The first pydantic problem as a 400 naming the parameter."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in err.get("loc", ()) if not str(x).startswith("function-"))
    if err.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {err.get('msg')}", code="invalid_json")
    if err.get("type") == "model_type" and not loc:
        return ApiError(400, "the request body must be a JSON object", code="invalid_json")
    msg = f"invalid value for '{loc}': {err.get('msg')}" if loc else str(err.get("msg"))
    return ApiError(400, msg, param=loc or None, code="invalid_value")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class SamplingBody(_Body):
    """Sampling fields shared by chat and completions (OpenAI names plus SGLang extensions)."""

    model: str = Field(min_length=1)
    n: int = Field(1, ge=1, le=128)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    stop: Annotated[str, Field(min_length=1)] | StopList | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    seed: Seed | None = None
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=10)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None

    @model_validator(mode="after")
    def _refuse_unbuilt(self) -> SamplingBody:
        if self.logit_bias:
            raise ValueError("logit_bias is not supported yet")
        if self.top_k == 0:
            raise ValueError("top_k must be -1 (off) or >= 1")
        return self

    def sampling_params(self, max_new_tokens: int, choice: int) -> dict[str, Any]:
        """SGLang sampling params for choice `choice` (a given seed is offset per choice)."""
        p: dict[str, Any] = {"max_new_tokens": max_new_tokens, "ignore_eos": self.ignore_eos,
                             "skip_special_tokens": self.skip_special_tokens}
        for key in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty", "presence_penalty",
                    "repetition_penalty", "stop_token_ids"):
            value = getattr(self, key)
            if value is not None:
                p[key] = value
        if 0 < p.get("temperature", 1.0) < 1e-5:  # as SGLang: a tiny temperature is greedy
            p["temperature"] = 0.0
        if self.stop is not None:
            p["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.seed is not None:
            p["seed"] = (self.seed + choice) % 2**63
        return p


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ResponseFormat(_Body):
    type: Literal["text"]


class ChatCompletionRequest(SamplingBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: None = None
    tool_choice: Literal["none"] | None = None

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.messages[-1].role == "assistant" and self.messages[-1].content is None:
            raise ValueError("the last message has no content")
        return self

    def max_new(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(SamplingBody):
    prompt: (Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]]
             | TokenIds | list[TokenIds])
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    suffix: None = None
    best_of: int | None = Field(None, ge=1, le=1)
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions

    @model_validator(mode="after")
    def _check_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        if self.stream and self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported when streaming")
        return self

    def prompts(self) -> list[str] | list[list[int]]:
        """The prompt(s) as a list of strings or a list of token-id lists."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class GenerateRequest(_Body):
    """SGLang's native /generate body."""

    model_config = ConfigDict(extra="forbid", strict=True)
    text: Annotated[str, Field(min_length=1)] | list[Annotated[str, Field(min_length=1)]] | None = None
    input_ids: TokenIds | list[TokenIds] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    rid: str | list[str] | None = None

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        if isinstance(self.text, list) and not self.text:
            raise ValueError("text must not be an empty list")
        for v in _as_list(self.top_logprobs_num):
            if not 0 <= v <= 20:
                raise ValueError("top_logprobs_num must be in [0, 20]")
        for v in _as_list(self.logprob_start_len):
            if v < -1:
                raise ValueError("logprob_start_len must be >= -1")
        return self


def _as_list(v: Any) -> list:
    if v is None:
        return []
    return v if isinstance(v, list) else [v]


SamplingBody.model_rebuild()
ChatCompletionRequest.model_rebuild()
CompletionRequest.model_rebuild()
