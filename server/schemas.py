"""Request and response bodies of the OpenAI-compatible API (the subset scaleserve implements).

Field bounds are part of the OpenAPI spec, so schema fuzzing only sends what a client may send;
anything outside them is a 400 in OpenAI's error shape (main.py maps validation errors).
Unknown fields are ignored, as the OpenAI API does for most of them. OpenAI fields that would change
the output and that scaleserve does not implement (response_format other than text, tools, function calling,
best_of > 1) are a 400 naming the field, not silently dropped.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# --- requests -----------------------------------------------------------------------------------

Stop = Union[str, list[str], None]
LOGIT_BIAS_MAX = 300  # tokens a request may bias


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=0, description="default: what is left of the context; 0 only with "
                                                           "echo (score the prompt, generate nothing)")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="extension: 0 = off")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: Stop = Field(None, description="up to 4 strings; output ends before the first match")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="extension")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=16, description="completions per prompt (seeded: seed, seed + 1, ...)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="extension: keep generating past EOS (benchmarks)")
    logit_bias: dict[str, float] | None = Field(
        None, max_length=LOGIT_BIAS_MAX, description="token id (a decimal string) -> a bias in [-100, 100] added to "
                                                      "its logit before sampling (and to the logprobs' logits)")
    # not implemented: accepted only at values that change nothing
    response_format: dict | None = Field(None, description='not supported beyond {"type": "text"}')
    tools: list[dict] | None = Field(None, description="not supported; must be empty")
    tool_choice: Union[str, dict, None] = Field(None, description='not supported beyond "none" / "auto"')
    functions: list[dict] | None = Field(None, description="not supported; must be empty")
    function_call: Union[str, dict, None] = Field(None, description='not supported beyond "none" / "auto"')

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """null means "not given", as OpenAI's API takes it (its spec marks these fields nullable, and the
        openai client sends an explicit None as null): a field with a non-null default gets that default."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items()
                    if not (v is None and k in fields and fields[k].default is not None)}
        return data

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, v, info):
        if v is not None and not info.data.get("stream"):  # (OpenAI refuses it too, rather than ignore it)
            raise ValueError("only allowed when stream is true")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, v):
        for key, bias in (v or {}).items():
            if not key.isdecimal():  # (isdecimal: ASCII and other digits alike; int() takes both)
                raise ValueError(f"keys must be token ids (decimal strings), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"biases must be in [-100, 100], got {bias} for token {key}")
        return v

    @field_validator("tools", "functions")
    @classmethod
    def _empty(cls, v, info):
        if v:
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_call(cls, v, info):
        if v not in (None, "none", "auto"):
            raise ValueError(f"{info.field_name} is not supported by this server (tools cannot be called)")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v):
        if v is not None and v.get("type", "text") != "text":
            raise ValueError(f"response_format {v.get('type')!r} is not supported by this server (text only)")
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="a prompt (text or token ids) or a batch of up to 64 of them: one choice each")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = Field(False, description="the prompt before the completion in text (and logprobs)")
    best_of: int | None = Field(None, ge=1, description="only 1 is supported")

    @field_validator("best_of")
    @classmethod
    def _one(cls, v):
        if v is not None and v > 1:
            raise ValueError("best_of > 1 is not supported by this server")
        return v
    suffix: str | None = Field(None, description="not supported; must be null")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Union[str, list[dict], None] = None
    name: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    max_completion_tokens: int | None = Field(None, ge=1)


# --- responses ----------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
