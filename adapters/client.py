"""Client side of the adapter API: `scaleserve adapter push` and scripts.

    push("task.safetensors", "task-a", "http://localhost:8000", api_key="sk-...")
    -> {"name": "task-a", "version": 3, "sha256": ..., "kind": "peqa", "size_bytes": ..., "created_at": ...}
"""

from __future__ import annotations

from pathlib import Path

import httpx


class PushError(ValueError):
    """The server refused the upload (status_code, and the server's message). A ValueError so the
    CLI prints it as a one-line error instead of a traceback."""

    def __init__(self, message: str, status_code: int | None = None, body: dict | None = None):
        super().__init__(message)
        self.status_code = status_code
        self.body = body


def _headers(api_key: str | None) -> dict:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _raise_for(resp: httpx.Response, what: str) -> None:
    if resp.is_success:
        return
    try:
        body = resp.json()
        err = body.get("error", {}) if isinstance(body, dict) else {}
        msg = err.get("message") or body.get("detail") or resp.text
    except ValueError:
        body, msg = None, resp.text
    raise PushError(f"{what} failed: HTTP {resp.status_code}: {msg}", resp.status_code, body)


def push(file: str | Path, name: str, server_url: str, api_key: str | None = None,
         timeout: float = 300.0) -> dict:
    """Upload an adapter file as `name` (PUT /v1/adapters/{name}); returns the server's adapter object.
    api_key defaults to $SCALESERVE_API_KEY. Raises PushError on any HTTP error, FileNotFoundError if
    the file is missing."""
    from .store import NAME_RULE, valid_name

    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {path} does not exist")
    if not valid_name(name):  # the name goes into the URL: '?', '#' or '/' would upload under another name
        raise PushError(f"adapter name {name!r} is invalid: {NAME_RULE}")
    if not api_key:
        from scaleserve.server.settings import ClientSettings

        env_key = ClientSettings().api_key
        api_key = env_key.get_secret_value() if env_key is not None else None
    url = f"{server_url.rstrip('/')}/v1/adapters/{name}"
    try:
        resp = httpx.put(url, content=path.read_bytes(), timeout=timeout,
                         headers={**_headers(api_key), "Content-Type": "application/octet-stream"})
    except httpx.HTTPError as e:
        raise PushError(f"upload to {url} failed: {e}") from None
    _raise_for(resp, f"upload of {path} as {name!r}")
    return resp.json()


def list_adapters(server_url: str, api_key: str | None = None, timeout: float = 30.0) -> list[dict]:
    resp = httpx.get(f"{server_url.rstrip('/')}/v1/adapters", headers=_headers(api_key), timeout=timeout)
    _raise_for(resp, "listing adapters")
    return resp.json()["data"]


def delete(name: str, server_url: str, api_key: str | None = None, timeout: float = 30.0) -> dict:
    resp = httpx.delete(f"{server_url.rstrip('/')}/v1/adapters/{name}", headers=_headers(api_key),
                        timeout=timeout)
    _raise_for(resp, f"deleting {name!r}")
    return resp.json()
