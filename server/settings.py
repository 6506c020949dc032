"""Settings: the one place that reads the environment. Every field is SCALESERVE_<NAME>.

CLI flags of `scaleserve serve` override the environment; both land in this class.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_data_dir() -> Path:
    return Path.home() / ".cache" / "scaleserve"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SCALESERVE_", extra="ignore", protected_namespaces=())

    # model
    model: str | None = Field(None, description="quantized model directory; empty = the embedded SmolLM2 default")
    served_model_name: str | None = Field(None, description="name clients use for the base model; default: dir name")
    device: str = Field("auto", description="auto | cpu | cuda")
    data_dir: Path = Field(default_factory=default_data_dir, description="cache of converted models, default store")

    # HTTP
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    log_level: str = "info"

    # engine
    max_num_seqs: int = Field(64, ge=1, description="most sequences in one running batch")
    max_num_batched_tokens: int = Field(2048, ge=16, description="token budget of one step (chunked prefill)")
    max_model_len: int | None = Field(None, ge=16, description="context limit; default: the model's")
    max_waiting: int = Field(256, ge=0, description="waiting-queue bound; beyond it requests get 429")
    kv_block_size: int = Field(16, ge=1)
    kv_cache_memory_fraction: float = Field(0.5, gt=0, le=0.95, description="share of free device memory for KV")
    kv_cache_max_blocks: int | None = Field(None, ge=1, description="hard cap on KV blocks (CPU default 2048)")
    prefix_caching: bool = Field(False, description="reuse the K/V of prompt blocks already computed for the same "
                                 "tenant, adapter and leading tokens (a shared system prompt, a conversation's "
                                 "earlier turns); greedy outputs can then differ in rare near-ties, as the cached "
                                 "K/V came from another batch shape")
    cuda_graphs: bool = True
    cuda_warmup: bool = Field(True, description="tune kernels and capture all decode graphs before ready "
                                                "(slower start; no stall when a new batch shape first appears)")
    overlap_steps: bool | None = Field(None, description="dispatch the next decode step before the host has "
                                       "processed the last one's tokens (hides host time behind the GPU); "
                                       "default: on with CUDA")
    slow_step_warn_ms: float | None = Field(None, ge=0, description="log a warning for every engine step that "
                                            "takes longer (its kind, sequences, tokens): a stall every stream "
                                            "sees; 0 turns it off; default: 250 with CUDA, off on CPU")
    gpu_step_timing: bool = Field(False, description="time each engine step on the GPU (CUDA events around its "
                                  "forward, from its inputs' upload to its last kernel) into the "
                                  "scaleserve_engine_gpu_step_seconds histogram: against the step's wall time it "
                                  "says whether the GPU or the host sets the pace")
    pdl: bool = Field(True, description="programmatic dependent launch of the Triton kernels (Hopper and newer): "
                                        "each kernel starts while the one before it finishes")
    tune_decode_graph: bool = Field(False, description="after warm-up, pick the one-row GEMV's configs by timing the "
                                    "batch-1 decode graph (server/graph_tune.py; ~1-2 min on a 7B), kept in "
                                    "data_dir/kernel-pins/ and reused by later starts on the same GPU")
    drain_grace_s: float = Field(30.0, ge=0, description="how long SIGTERM waits for in-flight requests")

    # adapters
    adapters: Path | None = Field(None, description="directory of adapter files loaded at start, named by stem")
    adapter_store: str | None = Field(None, description="file:///dir or s3://bucket/prefix; default under data_dir")
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    store_sync_interval_s: float = Field(2.0, gt=0, description="how often replicas re-read the shared store")
    gpu_adapter_slots: int = Field(256, ge=1, description="per-channel PEQA adapters resident on the device")
    gpu_group_adapter_slots: int = Field(8, ge=1, description="group-wise PEQA adapters resident on the device")
    gpu_alpha_adapter_slots: int = Field(8, ge=1, description="AlphaTuning adapters resident on the device")
    host_adapter_cache: int = Field(1024, ge=0, description="adapters kept in pinned host memory")
    max_adapter_bytes: int = Field(1 << 30, ge=1024)

    # tenants
    api_keys: SecretStr | None = Field(None, description="'key=tenant,key2=tenant2'; tenant 'admin' manages all")
    api_keys_file: Path | None = Field(None, description="file of 'key=tenant' lines (a mounted Secret)")
    tenant_max_adapters: int = Field(100, ge=0)
    tenant_max_concurrent: int = Field(64, ge=1)

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda"):
            raise ValueError("device must be auto, cpu or cuda")
        return v

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def store_url(self) -> str:
        return self.adapter_store or (self.data_dir / "adapters").resolve().as_uri()


class ClientSettings(BaseSettings):
    """What the client commands (`scaleserve adapter push`, adapters.client) read from the environment."""

    model_config = SettingsConfigDict(env_prefix="SCALESERVE_", extra="ignore")

    api_key: SecretStr | None = Field(None, description="the key a push sends (Authorization: Bearer) when none "
                                                        "is given")
