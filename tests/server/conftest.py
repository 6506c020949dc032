"""Live-server fixtures: a real uvicorn on a loopback port (in a thread) over the tiny model, and
adapter files made from identity adapters with random perturbations."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch

from scaleserve.server.main import ThreadedServer


def make_adapters(lm, out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Four adapters that change the output: two per-channel PEQA, one group-wise PEQA, one AlphaTuning."""
    from scaleserve.adapters.format import identity_adapter

    g = torch.Generator().manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    specs = [("chan-a", "peqa", True), ("chan-b", "peqa", True), ("group-a", "peqa", False),
             ("alpha-a", "alphatuning", False)]
    for name, kind, per_channel in specs:
        a = identity_adapter(lm, kind, per_channel=per_channel, name=name)
        for k, t in a.tensors.items():
            noise = torch.rand(t.shape, generator=g) * 0.6 + 0.7  # x0.7 .. x1.3
            a.tensors[k] = t * noise
        path = out_dir / f"{name}.safetensors"
        a.save(path)
        files[name] = path
    (out_dir / "broken.safetensors").write_bytes(b"not an adapter")  # logged and skipped
    return files


class LiveServer(ThreadedServer):
    """ThreadedServer plus the conveniences these tests use."""

    def start(self, timeout: float = 120.0) -> "LiveServer":
        super().start(timeout, wait_ready=False)
        return self

    @property
    def state(self):
        return self.app.state

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kw)


@pytest.fixture(scope="session")
def adapter_files(tiny_lm, tmp_path_factory) -> dict[str, Path]:
    return make_adapters(tiny_lm, tmp_path_factory.mktemp("adapters"))


@pytest.fixture(scope="session")
def start_server(tiny_model_dir, tmp_path_factory):
    """Factory: start_server(**settings overrides) -> a started LiveServer over the tiny model."""
    from scaleserve.server.main import create_app
    from scaleserve.server.settings import Settings

    servers = []

    def start(**overrides) -> LiveServer:
        kw = dict(model=str(tiny_model_dir), device="cpu", kv_cache_max_blocks=256, served_model_name="tiny",
                  data_dir=tmp_path_factory.mktemp("data"), log_level="warning")
        kw.update(overrides)
        s = LiveServer(create_app(Settings(**kw))).start()
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def server(start_server, adapter_files) -> LiveServer:
    """The shared server: tiny model, the four test adapters."""
    return start_server(adapters=str(next(iter(adapter_files.values())).parent))
