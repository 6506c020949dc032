"""The adapter API through the real app over HTTP: upload -> used on the next request (equal to the
offline reference), a new version mid-stream, concurrent uploads, a cut-off upload, restart, the
tenant isolation matrix, the malformed-file matrix, the S3 backend (moto's server on loopback), two
replicas sharing one store, and `scaleserve adapter push` against a live server."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from scaleserve.adapters.format import identity_adapter

pytest.importorskip("scaleserve.server.main")

PROMPT = "Once upon a time there was a little robot"


def rand_adapter(lm, kind="peqa", per_channel=True, seed=0, spread=0.5):
    a = identity_adapter(lm, kind, per_channel=per_channel, name=f"seed{seed}")
    g = torch.Generator().manual_seed(seed)
    for k, t in a.tensors.items():
        a.tensors[k] = t * (1 + spread * torch.rand(t.shape, generator=g))
    return a


@pytest.fixture(scope="module")
def lms(tiny_model_dir):
    """Three private copies of the tiny model: two live replicas and the offline reference
    (every slab writes its tables onto the model it serves)."""
    from scaleserve.server.loader import load_model

    return [load_model(tiny_model_dir) for _ in range(3)]


@pytest.fixture
def settings_for(tmp_path):
    from scaleserve.server.settings import Settings

    def make(**kw):
        base = dict(data_dir=tmp_path / "data", device="cpu", kv_cache_max_blocks=512, max_num_seqs=16,
                    store_sync_interval_s=0.2, gpu_adapter_slots=8, gpu_group_adapter_slots=2,
                    host_adapter_cache=8, cuda_graphs=False)
        base.update(kw)
        return Settings(**base)

    return make


def _create_app(settings, lm):
    from scaleserve.server.main import create_app

    return create_app(settings, lm=lm)


@contextmanager
def app_client(settings, lm):
    app = _create_app(settings, lm)
    with TestClient(app, base_url="http://scaleserve") as c:
        yield c


@contextmanager
def live_server(settings, lm):
    """The app under a real uvicorn on a loopback port, in a thread."""
    from scaleserve.server.main import ThreadedServer

    with ThreadedServer(_create_app(settings, lm)).start(120) as srv:
        yield srv.url, srv.app


def reference(lm, adapter, n: int) -> list[str]:
    """The offline path (generate_ids), greedy, ignoring EOS: each new token, as the server's
    logprobs block spells it (one decode per token id: exact even where text would hold back
    an incomplete UTF-8 tail)."""
    from scaleserve.server.generate import generate_ids

    ids = lm.tokenizer.encode(PROMPT)
    (toks,), _ = generate_ids(lm, [ids], [adapter], max_new_tokens=n, temperature=0.0, stop_ids=set())
    return [lm.tokenizer.decode([t]) for t in toks]


def tokens(c, model, n=12, headers=None) -> list[str]:
    r = complete(c, model, n, headers, logprobs=0)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def complete(c, model, n=12, headers=None, **kw):
    return c.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": n, "temperature": 0,
                                           "ignore_eos": True, **kw}, headers=headers or {})


def put(c, name, data: bytes, headers=None, **params):
    return c.put(f"/v1/adapters/{name}", content=data, params=params,
                 headers={"Content-Type": "application/octet-stream", **(headers or {})})


def assert_openai_error(r, status, *fragments):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["code"], err  # every error names its code (some upload errors had none)
    for f in fragments:
        assert f in err["message"], (f, err)
    return err


def base_name(c) -> str:
    return c.get("/v1/models").json()["data"][0]["id"]


# --- upload -> use ---------------------------------------------------------------------------------


def test_upload_then_use_equals_reference(lms, settings_for):
    lm, ref_lm = lms[0], lms[2]
    chan, group = rand_adapter(lm, seed=1), rand_adapter(lm, per_channel=False, seed=2)
    with app_client(settings_for(), lm) as c:
        r = put(c, "chan-task", chan.to_bytes())
        assert r.status_code == 201, r.text
        body = r.json()
        assert {"name", "version", "sha256", "kind", "size_bytes", "created_at"} <= set(body)
        assert (body["name"], body["version"], body["kind"]) == ("chan-task", 1, "peqa")
        r = c.post("/v1/adapters", data={"name": "group-task"},
                   files={"file": ("g.safetensors", group.to_bytes(), "application/octet-stream")})
        assert r.status_code == 201, r.text
        ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
        assert {"chan-task", "group-task"} <= ids
        listed = c.get("/v1/adapters").json()["data"]
        assert {a["name"] for a in listed} == {"chan-task", "group-task"}
        assert c.get("/v1/adapters/group-task").json()["granularity"] == "group"
        out = {m: tokens(c, m) for m in ("chan-task", "group-task", base_name(c))}
    assert out["chan-task"] == reference(ref_lm, chan, 12)
    assert out["group-task"] == reference(ref_lm, group, 12)
    assert out[base_name_of(lm)] == reference(ref_lm, None, 12)
    assert out["chan-task"] != out[base_name_of(lm)]


def base_name_of(lm):
    return lm.name


def test_alphatuning_upload_on_bcq_base(make_tiny_model, settings_for):
    from scaleserve.server.loader import load_model

    d = make_tiny_model(method="bcq")
    lm, ref_lm = load_model(d), load_model(d)
    ad = rand_adapter(lm, kind="alphatuning", seed=3, spread=0.3)
    with app_client(settings_for(), lm) as c:
        assert put(c, "alpha", ad.to_bytes()).status_code == 201
        text = tokens(c, "alpha")
        # a PEQA adapter cannot fit a bcq base: named field
        assert_openai_error(put(c, "p", _peqa_bytes_for(lm)), 400, "kind")
    assert text == reference(ref_lm, ad, 12)


def _peqa_bytes_for(lm):
    from scaleserve.adapters.format import Adapter

    t = {f"{n}.scales": torch.ones(m.out_features) for n, m in lm.model.quant_linears().items()}
    return Adapter("peqa", "p", lm.fingerprint, t).to_bytes()


# --- versions while streaming, concurrent uploads, cut-off uploads ------------------------------------


def test_new_version_mid_stream(lms, settings_for, monkeypatch):
    lm, ref_lm = lms[0], lms[2]
    v1, v2 = rand_adapter(lm, seed=11), rand_adapter(lm, seed=12)
    n = 100
    forward = lm.model.forward

    def slow_forward(*a, **kw):  # ~20 ms a step, so the stream is still running when the upload returns
        time.sleep(0.02)
        return forward(*a, **kw)

    monkeypatch.setattr(lm.model, "forward", slow_forward)
    with live_server(settings_for(), lm) as (url, app):
        with httpx.Client(base_url=url, timeout=120) as c:
            assert put(c, "task", v1.to_bytes()).json()["version"] == 1
            av1 = app.state.registry.resolve("default", "task")
            pieces = []
            with c.stream("POST", "/v1/completions", json={
                    "model": "task", "prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                    "stream": True, "logprobs": 0}) as stream:
                lines = stream.iter_lines()
                for line in lines:  # wait for the first token
                    if line.startswith("data: ") and line != "data: [DONE]":
                        ch = json.loads(line[6:])["choices"]
                        if ch and ch[0]["logprobs"]:
                            pieces += ch[0]["logprobs"]["tokens"]
                            break
                with httpx.Client(base_url=url, timeout=120) as c2:
                    r = put(c2, "task", v2.to_bytes())
                assert r.status_code == 201 and r.json()["version"] == 2
                # the running request still holds v1's slot (it was admitted before the upload)
                assert app.state.registry.slab.pins(av1.key) >= 1, "stream finished before the upload; raise n"
                with httpx.Client(base_url=url, timeout=120) as c2:
                    after = tokens(c2, "task")
                for line in lines:
                    if line.startswith("data: ") and line != "data: [DONE]":
                        ch = json.loads(line[6:])["choices"]
                        if ch and ch[0]["logprobs"]:
                            pieces += ch[0]["logprobs"]["tokens"]
    assert pieces == reference(ref_lm, v1, n)
    assert after == reference(ref_lm, v2, 12)


def test_concurrent_uploads_of_one_name(lms, settings_for, tmp_path):
    lm = lms[0]
    blobs = [rand_adapter(lm, seed=20 + i).to_bytes() for i in range(6)]
    with live_server(settings_for(), lm) as (url, app):
        def up(b):
            with httpx.Client(base_url=url, timeout=120) as c:
                return put(c, "race", b)

        with ThreadPoolExecutor(6) as ex:
            rs = list(ex.map(up, blobs))
        assert all(r.status_code == 201 for r in rs), [r.text for r in rs]
        versions = sorted(r.json()["version"] for r in rs)
        assert versions == list(range(1, 7))
        by_version = {r.json()["version"]: r.json()["sha256"] for r in rs}
        with httpx.Client(base_url=url, timeout=120) as c:
            got = c.get("/v1/adapters/race").json()
            assert (got["version"], got["sha256"]) == (6, by_version[6])
            assert complete(c, "race").status_code == 200
    # the store agrees: newest record v6 pointing at a blob with that sha
    from scaleserve.adapters.store import open_store

    store = open_store(settings_for().store_url())
    rec = store.latest("default", "race")
    import hashlib

    assert rec.version == 6 and hashlib.sha256(store.read_blob(rec)).hexdigest() == by_version[6]


def _raw_partial_put(url: str, path: str, body: bytes, send: int) -> None:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall((f"PUT {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body[:send])
    time.sleep(0.3)
    s.close()


def test_cut_off_upload_stores_nothing(lms, settings_for):
    lm = lms[0]
    data = rand_adapter(lm, seed=30).to_bytes()
    settings = settings_for()
    with live_server(settings, lm) as (url, app):
        _raw_partial_put(url, "/v1/adapters/cut", data, len(data) // 2)
        # the same cut-off, for a multipart POST
        boundary = "xyzzy"
        mp = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\ncut2\r\n--{boundary}\r\n"
              f"Content-Disposition: form-data; name=\"file\"; filename=\"a.safetensors\"\r\n\r\n").encode()
        mp += data + f"\r\n--{boundary}--\r\n".encode()
        host, port = url.removeprefix("http://").split(":")
        s = socket.create_connection((host, int(port)))
        s.sendall((f"POST /v1/adapters HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={boundary}"
                   f"\r\nContent-Length: {len(mp)}\r\n\r\n").encode() + mp[: len(mp) - 200])
        time.sleep(0.3)
        s.close()
        time.sleep(0.3)
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/v1/adapters/cut").status_code == 404
            assert c.get("/v1/adapters/cut2").status_code == 404
            assert c.get("/v1/adapters").json()["data"] == []
            assert complete(c, base_name(c)).status_code == 200  # still serving
            assert put(c, "cut", data).status_code == 201
            assert c.get("/v1/adapters/cut").json()["version"] == 1
    store_dir = settings.data_dir / "adapters"
    assert [p.name for p in store_dir.rglob("*.json")] == ["v0000000001.json"]
    assert not list(store_dir.rglob(".tmp-*"))


# --- restart, S3, replicas ---------------------------------------------------------------------------


def test_restart_keeps_everything(lms, settings_for):
    lm = lms[0]
    a, b = rand_adapter(lm, seed=40), rand_adapter(lm, seed=41)
    settings = settings_for()
    with app_client(settings, lm) as c:
        put(c, "keep", a.to_bytes())
        put(c, "keep", b.to_bytes())
        put(c, "gone", a.to_bytes())
        assert c.delete("/v1/adapters/gone").json()["deleted"] is True
        before = c.get("/v1/adapters").json()["data"]
        text = complete(c, "keep").json()["choices"][0]["text"]
    with app_client(settings, lm) as c:
        after = c.get("/v1/adapters").json()["data"]
        assert after == before and [(x["name"], x["version"]) for x in after] == [("keep", 2)]
        assert complete(c, "keep").json()["choices"][0]["text"] == text
        assert c.get("/v1/adapters/gone").status_code == 404
        assert put(c, "gone", a.to_bytes()).json()["version"] == 3  # after v1 and the tombstone


def test_s3_store_through_the_app(lms, settings_for, moto_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", aws_access_key_id="k",
                 aws_secret_access_key="s").create_bucket(Bucket="adapters")
    lm = lms[0]
    settings = settings_for(adapter_store="s3://adapters/base-1", s3_endpoint_url=moto_endpoint,
                            s3_region="us-east-1", s3_access_key_id="k", s3_secret_access_key="s")
    ad = rand_adapter(lm, seed=50)
    with app_client(settings, lm) as c:
        assert put(c, "s3-task", ad.to_bytes()).status_code == 201
        assert put(c, "s3-task", ad.to_bytes()).json()["version"] == 2
        put(c, "s3-other", ad.to_bytes())
        c.delete("/v1/adapters/s3-other")
        text = complete(c, "s3-task").json()["choices"][0]["text"]
    with app_client(settings, lm) as c:  # a restart reads it all back from S3
        assert [(a["name"], a["version"]) for a in c.get("/v1/adapters").json()["data"]] == [("s3-task", 2)]
        assert complete(c, "s3-task").json()["choices"][0]["text"] == text
    keys = [o["Key"] for o in boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1",
                                           aws_access_key_id="k", aws_secret_access_key="s")
            .list_objects_v2(Bucket="adapters")["Contents"]]
    assert all(k.startswith("base-1/default/") for k in keys)


def _eventually(fn, timeout=10.0):
    deadline = time.time() + timeout
    while True:
        if fn():
            return True
        assert time.time() < deadline, "not within the sync interval"
        time.sleep(0.05)


def test_two_replicas_share_one_store(lms, settings_for):
    settings = settings_for(store_sync_interval_s=0.3)
    ad1, ad2 = rand_adapter(lms[0], seed=60), rand_adapter(lms[0], seed=61)
    with app_client(settings, lms[0]) as a, app_client(settings, lms[1]) as b:
        assert put(a, "shared", ad1.to_bytes()).status_code == 201
        # asked at once, b resolves it from the store (no waiting for the sync)
        assert complete(b, "shared").status_code == 200
        t0 = time.time()
        put(b, "shared", ad2.to_bytes())
        put(b, "from-b", ad1.to_bytes())
        _eventually(lambda: {x["name"]: x["version"] for x in a.get("/v1/adapters").json()["data"]}
                    == {"shared": 2, "from-b": 1})
        assert time.time() - t0 < 5.0
        assert complete(a, "shared").json()["choices"][0]["text"] == complete(b, "shared").json()["choices"][0]["text"]
        assert a.delete("/v1/adapters/from-b").status_code == 200
        _eventually(lambda: b.get("/v1/adapters/from-b").status_code == 404)
        assert_openai_error(complete(b, "from-b"), 404)


# --- tenants -----------------------------------------------------------------------------------------

KEYS = {"alice": "sk-alice-0123", "bob": "sk-bob-4567", "admin": "sk-admin-89ab"}


def auth(who):
    return {"Authorization": f"Bearer {KEYS[who]}"}


def test_tenant_isolation_matrix(lms, settings_for, tmp_path):
    lm = lms[0]
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"# tenants\n{KEYS['alice']}=alice\n{KEYS['bob']}=bob\n")
    settings = settings_for(api_keys_file=keyfile, api_keys=f"{KEYS['admin']}=admin", tenant_max_adapters=2)
    da, db = rand_adapter(lm, seed=70).to_bytes(), rand_adapter(lm, seed=71).to_bytes()
    with app_client(settings, lm) as c:
        base = c.get("/v1/models", headers=auth("alice")).json()["data"][0]["id"]
        # keys
        assert_openai_error(c.get("/v1/adapters"), 401, "API key")
        assert_openai_error(c.get("/v1/adapters", headers={"Authorization": "Bearer nope"}), 401)
        assert_openai_error(complete(c, base, headers={"Authorization": "Basic xyz"}), 401)
        # uploads: the same name in two tenants is two adapters
        assert put(c, "a-only", da, auth("alice")).status_code == 201
        assert put(c, "same", da, auth("alice")).status_code == 201
        assert put(c, "same", db, auth("bob")).json()["version"] == 1
        names = lambda who, **p: sorted((x["tenant"], x["name"]) for x in  # noqa: E731
                                        c.get("/v1/adapters", headers=auth(who), params=p).json()["data"])
        # list
        assert names("alice") == [("alice", "a-only"), ("alice", "same")]
        assert names("bob") == [("bob", "same")]
        assert names("admin") == [("alice", "a-only"), ("alice", "same"), ("bob", "same")]
        assert names("admin", tenant="bob") == [("bob", "same")]
        assert {m["id"] for m in c.get("/v1/models", headers=auth("bob")).json()["data"]} == {base, "same"}
        # get / use: another tenant's adapter is a 404, like one that does not exist
        assert c.get("/v1/adapters/a-only", headers=auth("alice")).status_code == 200
        assert_openai_error(c.get("/v1/adapters/a-only", headers=auth("bob")), 404)
        assert_openai_error(c.get("/v1/adapters/a-only", headers=auth("bob"), params={"tenant": "alice"}), 404)
        assert complete(c, "a-only", headers=auth("alice")).status_code == 200
        assert_openai_error(complete(c, "a-only", headers=auth("bob")), 404)
        assert complete(c, base, headers=auth("bob")).status_code == 200  # the base is for all
        sa = complete(c, "same", headers=auth("alice")).json()["choices"][0]["text"]
        sb = complete(c, "same", headers=auth("bob")).json()["choices"][0]["text"]
        assert sa != sb  # each tenant's "same" is its own adapter
        # update / delete: bob cannot touch alice's
        assert_openai_error(c.delete("/v1/adapters/a-only", headers=auth("bob")), 404)
        assert_openai_error(put(c, "x", db, auth("bob"), tenant="alice"), 404)
        assert c.get("/v1/adapters/a-only", headers=auth("alice")).json()["version"] == 1
        assert c.delete("/v1/adapters/same", headers=auth("bob")).status_code == 200
        assert c.get("/v1/adapters/same", headers=auth("alice")).status_code == 200
        # admin manages everything (?tenant=)
        assert put(c, "same", db, auth("admin"), tenant="alice").json()["version"] == 2
        assert c.get("/v1/adapters/same", headers=auth("alice")).json()["version"] == 2
        assert c.delete("/v1/adapters/a-only", headers=auth("admin"), params={"tenant": "alice"}).status_code == 200
        assert_openai_error(complete(c, "a-only", headers=auth("alice")), 404)
        # per-tenant adapter limit (2)
        assert put(c, "second", da, auth("alice")).status_code == 201
        err = assert_openai_error(put(c, "third", da, auth("alice")), 429, "limit")
        assert err["code"] == "adapter_quota_exceeded"
        assert put(c, "same", da, auth("alice")).status_code == 201  # a new version is fine


# --- validation --------------------------------------------------------------------------------------


def _malformed(lm):
    good = rand_adapter(lm, seed=80)
    names = sorted(good.tensors)
    first = names[0]

    def variant(fn):
        a = rand_adapter(lm, seed=80)
        fn(a)
        return a.to_bytes()

    data = good.to_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    return {
        "not safetensors": (b"PK\x03\x04 this is a zip, not an adapter" * 4, "file"),
        "pickle": (b"\x80\x04\x95" + b"\x00" * 64, "file"),
        "empty": (b"", "file"),
        "truncated": (data[: 8 + hlen + 10], names[0]),
        "oversized header": (struct.pack("<Q", 1 << 40) + b"{}", "file"),
        "header not json": (struct.pack("<Q", 4) + b"{{{{", "file"),
        "wrong shape": (variant(lambda a: a.tensors.__setitem__(first, a.tensors[first][:-1])), first),
        "wrong kind": (variant(lambda a: setattr(a, "kind", "lora")), "kind"),
        "nan": (variant(lambda a: a.tensors[names[1]].__setitem__(3, float("nan"))), names[1]),
        "inf": (variant(lambda a: a.tensors[names[2]].__setitem__(0, float("inf"))), names[2]),
        "other base": (variant(lambda a: setattr(a, "base_fingerprint", "0" * 64)), "base_fingerprint"),
        "missing module": (variant(lambda a: a.tensors.pop(names[-1])), names[-1]),
        "extra tensor": (variant(lambda a: a.tensors.__setitem__("model.evil.scales", torch.ones(3))),
                         "model.evil.scales"),
        "int dtype": (variant(lambda a: a.tensors.__setitem__(first, a.tensors[first].to(torch.int32))), first),
    }


def test_malformed_file_matrix(lms, settings_for):
    lm = lms[0]
    settings = settings_for(max_adapter_bytes=256 << 10)
    with app_client(settings, lm) as c:
        base = base_name(c)
        for case, (data, field) in _malformed(lm).items():
            for r in (put(c, "bad", data),
                      c.post("/v1/adapters", data={"name": "bad"}, files={"file": ("bad.safetensors", data)})):
                assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
                err = r.json()["error"]
                assert field in err["message"] or err["param"] == field, (case, err)
            assert c.get("/v1/adapters/bad").status_code == 404, case
            assert complete(c, base, n=2).status_code == 200, case  # keeps serving
        assert_openai_error(put(c, "big", b"\0" * (300 << 10)), 413, "limit")
        assert_openai_error(put(c, "-bad-name", rand_adapter(lm).to_bytes()), 400, "name")
        assert_openai_error(put(c, base, rand_adapter(lm).to_bytes()), 400, "base model")
        assert_openai_error(c.post("/v1/adapters", data={"name": "x"}), 400, "file")
        assert_openai_error(c.post("/v1/adapters", files={"file": ("a", b"x")}), 400, "name")
        assert c.get("/v1/adapters").json()["data"] == []
        assert not list((settings.data_dir / "adapters").rglob("*.json"))  # nothing stored
        assert put(c, "good", rand_adapter(lm).to_bytes()).status_code == 201


def test_adapter_errors_are_counted_in_metrics(lms, settings_for):
    """scaleserve_errors_total counts the adapter routes' error responses too (by code), as it does the
    generation routes': a bad upload, an unknown adapter."""
    import re

    def errors(c, code):
        m = re.search(rf'^scaleserve_errors_total{{type="{code}"}} ([0-9.e+]+)$', c.get("/metrics").text, re.M)
        return float(m.group(1)) if m else 0.0

    with app_client(settings_for(), lms[0]) as c:
        assert put(c, "bad", b"not an adapter").status_code == 400
        assert c.post("/v1/adapters", data={"name": "bad"},
                      files={"file": ("bad.safetensors", b"not an adapter")}).status_code == 400
        assert c.delete("/v1/adapters/ghost").status_code == 404
        assert errors(c, "invalid_adapter") == 2 and errors(c, "adapter_not_found") == 1


# --- CLI -----------------------------------------------------------------------------------------------


def test_push_rejects_a_name_that_is_not_an_adapter_name(lms, settings_for, tmp_path):
    """push() puts the name in the URL: a name with '?', '#' or '/' was sent as is, so 'x?tenant=bob' stored
    adapter 'x' in tenant bob (auth off: the caller is admin), 'y#z' stored 'y', and 'a/b' was an opaque
    'HTTP 404: Not Found'. Now such a name is refused before anything is sent, with the naming rule."""
    from scaleserve.adapters.client import PushError, push

    f = tmp_path / "task.safetensors"
    rand_adapter(lms[0], seed=91).save(f)
    with live_server(settings_for(), lms[0]) as (url, app):
        for name in ("x?tenant=bob", "y#z", "a/b", "caf\u00e9", ""):
            with pytest.raises(PushError, match="1-64 characters"):
                push(f, name, url)
        reg = app.state.registry
        assert reg.list(None) == []
        assert push(f, "ok-name", url)["name"] == "ok-name"


def test_cli_push_against_live_server(lms, settings_for, tmp_path):
    lm = lms[0]
    f = tmp_path / "task.safetensors"
    rand_adapter(lm, seed=90).save(f)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not an adapter at all")
    keyfile = tmp_path / "keys"
    keyfile.write_text(f"{KEYS['alice']}=alice\n")
    with live_server(settings_for(api_keys_file=keyfile), lm) as (url, app):
        cli = [str(Path(sys.executable).with_name("scaleserve")), "adapter", "push"]
        r = subprocess.run(cli + [str(f), "--name", "cli-task", "--server", url, "--api-key", KEYS["alice"]],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert (out["name"], out["version"], out["tenant"]) == ("cli-task", 1, "alice")
        r = subprocess.run(cli + [str(bad), "--name", "cli-bad", "--server", url, "--api-key", KEYS["alice"]],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "HTTP 400" in r.stderr and "safetensors" in r.stderr, r.stderr
        r = subprocess.run(cli + [str(f), "--name", "cli-task", "--server", url, "--api-key", "wrong"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "HTTP 401" in r.stderr, r.stderr
        assert app.state.registry.resolve("alice", "cli-task").version == 1
        # no --api-key: SCALESERVE_API_KEY's (read through server/settings.py's ClientSettings)
        env = {**os.environ, "SCALESERVE_API_KEY": KEYS["alice"]}
        r = subprocess.run(cli + [str(f), "--name", "cli-task", "--server", url], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and json.loads(r.stdout)["version"] == 2, r.stderr
        env.pop("SCALESERVE_API_KEY")
        r = subprocess.run(cli + [str(f), "--name", "cli-task", "--server", url], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode != 0 and "HTTP 401" in r.stderr, r.stderr
