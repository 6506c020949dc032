"""Request and response bodies of the OpenAI-compatible API (the subset scaleserve implements).

Field bounds are part of the OpenAPI spec, so schema fuzzing only sends what a client may send;
anything outside them is a 400 in OpenAI's error shape (main.py maps validation errors).
Unknown fields are ignored, as the OpenAI API does for most of them.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

# --- requests -----------------------------------------------------------------------------------

Stop = Union[str, list[str], None]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1, max_length=256)
    max_tokens: int | None = Field(None, ge=1, description="default: what is left of the context")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000, description="extension: 0 = off")
    seed: int | None = Field(None, ge=-(2**62), le=2**62)
    stop: Stop = Field(None, description="up to 4 strings; output ends before the first match")
    stop_token_ids: list[int] | None = Field(None, max_length=64, description="extension")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = Field(False, description="extension: keep generating past EOS (benchmarks)")

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_SamplingRequest):
    prompt: Union[str, list[str], list[int], list[list[int]]] = Field(
        ..., description="one prompt: text or token ids (a one-element list of either also works)")
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = Field(False, description="not supported; must be false")
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
