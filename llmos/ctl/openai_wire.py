"""OpenAI's wire format as the gateway (llmos/ctl/gateway.py) reads and writes it: the
request bodies (OpenAI's fields, unknown ones ignored as OpenAI's servers do; bounded),
their errors (OpenAI's error JSON, errno -> HTTP status), and the mapping onto
``llm.generate``: messages as kernel chat turns (tool calls as the JSON the model writes,
tool results as user turns), a session's new turns, function tools as a JSON-schema
``response_format`` (kernel/toolcall.py), sampling options, usage and finish reasons."""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from kernel.toolcall import action_schema, parse_action, tool_guide
from syscalls import limits
from syscalls.errors import Errno, SyscallError

MAX_BODY_BYTES = limits.MAX_FRAME_BYTES  # a request becomes one frame: no bigger body helps


# -- errors ---------------------------------------------------------------------------


class ApiError(Exception):
    """An OpenAI error reply: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


#: errno -> (HTTP status, OpenAI error type)
ERRNO_STATUS: dict[Errno, tuple[int, str]] = {
    Errno.EINVAL: (400, "invalid_request_error"),
    Errno.E2BIG: (400, "invalid_request_error"),
    Errno.ENOTSUP: (400, "invalid_request_error"),
    Errno.EACCES: (403, "permission_error"),
    Errno.EPERM: (403, "permission_error"),
    Errno.ENOENT: (404, "not_found_error"),
    Errno.EDQUOT: (429, "insufficient_quota"),
    Errno.EAGAIN: (429, "rate_limit_error"),
    Errno.ETIMEDOUT: (504, "timeout_error"),
    Errno.ESHUTDOWN: (503, "service_unavailable"),
    Errno.ECONNREFUSED: (503, "service_unavailable"),
}


def from_syscall(exc: SyscallError) -> ApiError:
    status, type_ = ERRNO_STATUS.get(exc.code, (500, "server_error"))
    return ApiError(status, exc.message, type_, code=str(exc.code))


# -- the request bodies (OpenAI's fields; unknown ones ignored, as OpenAI's servers do) --


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str


class MessageToolCall(_Body):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessageIn(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class FunctionDef(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ToolDef(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: dict[str, str]


class StreamOptions(_Body):
    include_usage: bool = False


class ChatRequest(_Body):
    model: str = Field(min_length=1, max_length=limits.MAX_NAME_CHARS)
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=limits.MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    tools: list[ToolDef] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    user: str | None = Field(default=None, max_length=256)


class CompletionRequest(_Body):
    model: str = Field(min_length=1, max_length=limits.MAX_NAME_CHARS)
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    max_completion_tokens: None = None  # not a completions field: max_tokens is
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0)
    n: int | None = None
    best_of: int | None = None
    echo: bool = False
    logprobs: None = None
    suffix: None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, "prompt: exactly one prompt is supported", param="prompt")
            return self.prompt[0]
        return self.prompt


class InputPart(_Body):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Body):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputPart]


class InputFunctionCall(_Body):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class InputFunctionOutput(_Body):
    type: Literal["function_call_output"]
    call_id: str
    output: str


class ResponsesTool(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class ResponsesToolChoice(_Body):
    type: Literal["function"]
    name: str


class ResponsesRequest(_Body):
    model: str = Field(min_length=1, max_length=limits.MAX_NAME_CHARS)
    input: str | list[InputMessage | InputFunctionCall | InputFunctionOutput] = Field(
        max_length=limits.MAX_MESSAGES
    )
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    previous_response_id: str | None = Field(default=None, max_length=256)
    store: bool = True
    stream: bool = False
    tools: list[ResponsesTool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None

    def plan(self) -> ToolPlan | None:
        fns = [_Fn(t.name, t.parameters, t.description or "") for t in self.tools or []]
        choice = self.tool_choice
        if isinstance(choice, ResponsesToolChoice):
            return plan_for(fns, None, choice.name)
        return plan_for(fns, choice, None)

    def messages(self) -> list[dict[str, str]]:
        """The input as kernel chat turns (function calls and outputs as in chat)."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        names: dict[str, str] = {}
        out = []
        for i, item in enumerate(self.input):
            if isinstance(item, InputFunctionCall):
                names[item.call_id] = item.name
                try:
                    args = json.loads(item.arguments or "{}")
                except ValueError:
                    where = f"input.{i}.arguments"
                    raise ApiError(400, f"{where}: not JSON", param=where) from None
                out.append({"role": "assistant", "content": call_text(item.name, args)})
            elif isinstance(item, InputFunctionOutput):
                name = names.get(item.call_id, "the tool")
                out.append({"role": "user", "content": f"Result of {name}: {item.output}"})
            else:
                text = (
                    item.content
                    if isinstance(item.content, str)
                    else "".join(p.text for p in item.content)
                )
                role = "system" if item.role == "developer" else item.role
                out.append({"role": role, "content": text})
        return out


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """The body parsed into ``model``: 413 past ``MAX_BODY_BYTES``, 400 naming the field."""
    size = request.headers.get("content-length")
    if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
        raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    body = bytearray()
    async for chunk in request.stream():  # chunked bodies have no length: count as they come
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
    try:
        return model.model_validate_json(bytes(body))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(400, f"{where}: {first['msg']}", param=where) from None


# -- OpenAI -> llm.generate -------------------------------------------------------------


@dataclass(frozen=True)
class _Fn:
    """An OpenAI function in the shape kernel/toolcall.py reads (name, parameters, description)."""

    name: str
    parameters: dict[str, Any]
    description: str


def call_text(name: str, arguments: Any) -> str:
    """A tool call as the model writes it under ``action_schema`` (compact JSON)."""
    return json.dumps({"tool": name, "arguments": arguments}, separators=(",", ":"))


def kernel_messages(msgs: list[ChatMessageIn]) -> list[dict[str, str]]:
    """OpenAI messages as kernel chat turns: an assistant's tool calls as the JSON the model
    wrote, a tool result as a user turn naming the tool (the kernel has three roles)."""
    names: dict[str, str] = {}
    out: list[dict[str, str]] = []
    for i, msg in enumerate(msgs):
        if msg.role in ("system", "developer"):
            out.append({"role": "system", "content": msg.text()})
        elif msg.role == "user":
            out.append({"role": "user", "content": msg.text()})
        elif msg.role == "assistant" and msg.tool_calls:
            texts = []
            for tc in msg.tool_calls:
                names[tc.id] = tc.function.name
                try:
                    args = json.loads(tc.function.arguments or "{}")
                except ValueError:
                    raise ApiError(
                        400,
                        f"messages.{i}.tool_calls: arguments are not JSON",
                        param=f"messages.{i}.tool_calls",
                    ) from None
                texts.append(call_text(tc.function.name, args))
            out.append({"role": "assistant", "content": "\n".join(texts)})
        elif msg.role == "assistant":
            out.append({"role": "assistant", "content": msg.text()})
        else:  # tool
            name = names.get(msg.tool_call_id or "", "the tool")
            out.append({"role": "user", "content": f"Result of {name}: {msg.text()}"})
    return out


def _same(a: dict[str, str], b: dict[str, str]) -> bool:
    if a["role"] != b["role"]:
        return False
    if a["content"] == b["content"]:
        return True
    try:  # a tool call resent with other spacing or key order is the same call
        return json.loads(a["content"]) == json.loads(b["content"])
    except ValueError:
        return False


def new_messages(context: list[dict[str, str]], sent: list[dict[str, str]]) -> list[dict[str, str]]:
    """What of ``sent`` the session's ``context`` lacks: the tail after a resent prefix
    (the whole conversation again, as OpenAI clients send it), or all of it (a client that
    sends only its new turns). The session's own system prompt is not the client's."""
    if context and context[0]["role"] == "system" and not (sent and _same(context[0], sent[0])):
        context = context[1:]
    n = len(context)
    if n and len(sent) > n and all(_same(c, s) for c, s in zip(context, sent, strict=False)):
        return sent[n:]
    return sent


@dataclass
class ToolPlan:
    """How a request's tools are offered: the constrained format and the guide turn."""

    response_format: dict[str, Any]
    guide: str


def tool_plan(req: ChatRequest) -> ToolPlan | None:
    """``tools``/``tool_choice`` as a JSON-schema response format (None: plain text)."""
    if not req.tools:
        return None
    fns = [_Fn(t.function.name, t.function.parameters, t.function.description) for t in req.tools]
    choice = req.tool_choice
    named = choice.function.get("name") if isinstance(choice, NamedToolChoice) else None
    return plan_for(fns, choice if isinstance(choice, str) else None, named)


def plan_for(fns: list[_Fn], choice: str | None, named: str | None) -> ToolPlan | None:
    """Functions offered under a choice (auto/none/required, or one ``named``)."""
    if not fns or choice == "none":
        return None
    if named is not None:
        fns = [f for f in fns if f.name == named]
        if not fns:
            raise ApiError(400, f"tool_choice names {named!r}, not in tools", param="tool_choice")
    schema = action_schema(fns)  # type: ignore[arg-type]
    if named is not None or choice == "required":  # a call, never an answer
        schema = {"anyOf": schema["anyOf"][:-1]}
    return ToolPlan({"type": "json_schema", "schema": schema}, tool_guide(fns))  # type: ignore[arg-type]


def response_format(req: ChatRequest) -> dict[str, Any] | None:
    rf = req.response_format
    if rf is None or rf.get("type") == "text":
        return None
    if rf.get("type") == "json_object":
        return {"type": "json_object"}
    if rf.get("type") == "json_schema":
        schema = (rf.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ApiError(
                400, "response_format.json_schema.schema: required", param="response_format"
            )
        return {"type": "json_schema", "schema": schema}
    raise ApiError(
        400, f"response_format.type {rf.get('type')!r} is not supported", param="response_format"
    )


def generate_options(req: ChatRequest | CompletionRequest) -> dict[str, Any]:
    """The sampling options of ``llm.generate`` (OpenAI's defaults where unset)."""
    if req.n not in (None, 1):
        raise ApiError(400, "n: only 1 is supported", param="n")
    if getattr(req, "best_of", None) not in (None, 1):
        raise ApiError(400, "best_of: only 1 is supported", param="best_of")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    opts: dict[str, Any] = {
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "max_tokens": min(
            req.max_completion_tokens or req.max_tokens or limits.MAX_OUTPUT_TOKENS,
            limits.MAX_OUTPUT_TOKENS,
        ),
    }
    if stop:
        opts["stop"] = stop
    if req.seed is not None:
        opts["seed"] = req.seed % 2**63
    return opts


def now() -> int:
    return int(time.time())


def usage_json(prompt: int, output: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": output,
        "total_tokens": prompt + output,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def openai_finish(finish_reason: str) -> str:
    return "length" if finish_reason == "length" else "stop"


def tool_message(text: str, finish_reason: str) -> tuple[dict[str, Any], str]:
    """A constrained tool step's text as an OpenAI message and finish reason."""
    calls, answer = parse_action(text)
    if calls:
        tool_calls = [
            {
                "id": f"call_{secrets.token_hex(12)}",
                "type": "function",
                "function": {"name": c.name, "arguments": json.dumps(c.arguments)},
            }
            for c in calls
        ]
        msg = {"role": "assistant", "content": None, "refusal": None, "tool_calls": tool_calls}
        return msg, "tool_calls"
    content = answer if answer is not None else text
    return {"role": "assistant", "content": content, "refusal": None}, openai_finish(finish_reason)


def emptied(item: dict[str, Any]) -> dict[str, Any]:
    """An output item as first announced: no arguments or content yet."""
    return {"arguments": ""} if item["type"] == "function_call" else {"content": []}
