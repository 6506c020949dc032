"""Store-backed registry (versions, deletes, replicas, bad files in the store) and the slab's two
LRU tiers with pins."""

from __future__ import annotations

import asyncio
import hashlib
import logging

import pytest
import torch

from scaleserve.adapters.format import AdapterError, BaseSpec, identity_adapter
from scaleserve.adapters.registry import (SHARED_TENANT, AdapterNotFound, AdapterRegistry, AdapterTooLarge,
                                          TenantLimitExceeded)
from scaleserve.adapters.slab import AdapterSlab, SlabFull
from scaleserve.adapters.store import FileStore


def rand_adapter(lm, kind="peqa", per_channel=True, seed=0, name="a"):
    a = identity_adapter(lm, kind, per_channel=per_channel, name=name)
    g = torch.Generator().manual_seed(seed)
    for k, t in a.tensors.items():
        a.tensors[k] = t * (1 + 0.2 * torch.randn(t.shape, generator=g))
    return a


@pytest.fixture(scope="module")
def lm(tiny_model_dir):
    from scaleserve.server.loader import load_model

    return load_model(tiny_model_dir)  # its own copy: slabs write tables onto the model's layers


@pytest.fixture
def make_registry(lm, tmp_path):
    def make(store_dir=None, slab=None, **kw):
        store = FileStore(store_dir or tmp_path / "store")
        slab = slab or AdapterSlab(lm.model, chan_slots=2, group_slots=1, alpha_slots=1, host_slots=3)
        return AdapterRegistry(BaseSpec.from_model(lm), slab, store, **kw)

    return make


def test_upload_versions_resolve_delete(lm, make_registry):
    reg = make_registry()
    d1, d2 = rand_adapter(lm, seed=1).to_bytes(), rand_adapter(lm, seed=2).to_bytes()
    av1 = reg.upload("acme", "task", d1)
    assert (av1.version, av1.sha256, av1.size_bytes, av1.kind, av1.granularity) == (
        1, hashlib.sha256(d1).hexdigest(), len(d1), "peqa", "channel")
    assert reg.resolve("acme", "task") is av1
    with pytest.raises(AdapterNotFound):
        reg.resolve("other", "task")  # names are per tenant
    av2 = reg.upload("acme", "task", d2)
    assert av2.version == 2 and reg.resolve("acme", "task") is av2
    assert [a.name for a in reg.list("acme")] == ["task"] and reg.list("other") == []
    assert reg.remove("acme", "task") == 2
    with pytest.raises(AdapterNotFound):
        reg.resolve("acme", "task")
    with pytest.raises(AdapterNotFound):
        reg.remove("acme", "task")
    assert reg.upload("acme", "task", d1).version == 4  # after the tombstone (v3)


def test_upload_rejects_before_storing(lm, make_registry, tmp_path):
    reg = make_registry(max_adapter_bytes=1 << 20, tenant_max_adapters=1, reserved_names={"base-model"})
    good = rand_adapter(lm).to_bytes()
    with pytest.raises(AdapterError) as e:
        reg.upload("acme", "bad/name", good)
    assert e.value.field == "name"
    with pytest.raises(AdapterError):
        reg.upload("acme", "base-model", good)
    with pytest.raises(AdapterTooLarge):
        reg.upload("acme", "big", good + b"\0" * (1 << 20))
    with pytest.raises(AdapterError) as e:
        reg.upload("acme", "x", good[: len(good) // 2])
    assert e.value.field is not None
    assert not list((tmp_path / "store").rglob("*.json"))  # nothing stored
    reg.upload("acme", "one", good)
    with pytest.raises(TenantLimitExceeded):
        reg.upload("acme", "two", good)
    reg.upload("acme", "one", good)  # a new version of an existing name is not a new adapter
    reg.upload("other", "two", good)  # the limit is per tenant


def test_restart_and_replica_sync(lm, make_registry, tmp_path):
    a, b = make_registry(), make_registry()  # two replicas over one store
    av = a.upload("acme", "task", rand_adapter(lm, seed=3).to_bytes())
    # b has not synced: a resolve of an unseen name looks in the store at once
    got = b.resolve("acme", "task")
    assert (got.version, got.sha256) == (av.version, av.sha256)
    assert all(torch.equal(got.adapter.tensors[k], t) for k, t in av.adapter.tensors.items())
    a.upload("acme", "task", rand_adapter(lm, seed=4).to_bytes())
    a.upload("acme", "second", rand_adapter(lm, seed=5).to_bytes())
    assert b.resolve("acme", "task").version == 1  # until the next sync
    assert b.sync() == 2
    assert b.resolve("acme", "task").version == 2 and b.resolve("acme", "second").version == 1
    b.remove("acme", "second")
    a.sync()
    with pytest.raises(AdapterNotFound):
        a.resolve("acme", "second")
    # a negative look-up is cached for one sync interval, then retried
    fresh = make_registry()
    fresh.sync()
    assert {(v.tenant, v.name, v.version) for v in fresh.list()} == {("acme", "task", 2)}


def test_bad_file_in_store_is_logged_and_skipped(lm, make_registry, tmp_path, caplog):
    a = make_registry()
    a.upload("acme", "good", rand_adapter(lm, seed=1).to_bytes())
    av = a.upload("acme", "bad", rand_adapter(lm, seed=2).to_bytes())
    # corrupt the stored file (another base's adapter, with a matching sha in the record)
    other = rand_adapter(lm, seed=2)
    other.base_fingerprint = "0" * 64
    data = other.to_bytes()
    rec = a.store.latest("acme", "bad")
    a.store._put_atomic(rec.blob, data)
    import dataclasses
    a.store._put_atomic(f"acme/bad/v{rec.version:010d}.json",
                        dataclasses.replace(rec, sha256=hashlib.sha256(data).hexdigest()).to_json())
    (tmp_path / "store" / "acme" / "junk").mkdir()
    (tmp_path / "store" / "acme" / "junk" / "v0000000001.json").write_text("{not json")
    with caplog.at_level(logging.ERROR, logger="scaleserve.adapters"):
        b = make_registry()
        b.sync()
        b.sync()  # reported once, not every sync
    assert [v.name for v in b.list()] == ["good"]
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("acme/bad v2" in m or "acme/bad v1" in m for m in msgs) == 1, msgs
    assert any("junk" in m for m in msgs)
    # a later good upload of the name gets through
    a.upload("acme", "bad", rand_adapter(lm, seed=6).to_bytes())
    b.sync()
    assert b.resolve("acme", "bad").version == av.version + 1


def test_start_stop_background_sync(lm, make_registry):
    a, b = make_registry(), make_registry(sync_interval_s=0.05)

    async def run():
        await b.start()
        a.upload("acme", "x", rand_adapter(lm).to_bytes())
        for _ in range(100):
            await asyncio.sleep(0.05)
            if b.list("acme"):
                break
        await b.stop()

    asyncio.run(run())
    assert [v.name for v in b.list("acme")] == ["x"]


def test_shared_dir(lm, make_registry, tmp_path):
    d = tmp_path / "shared"
    d.mkdir()
    rand_adapter(lm, seed=1).save(d / "summarize.safetensors")
    (d / "broken.safetensors").write_bytes(b"nope")
    reg = make_registry()
    assert [v.name for v in reg.load_dir(d)] == ["summarize"]
    assert reg.resolve("anyone", "summarize").tenant == SHARED_TENANT
    assert [v.name for v in reg.list("anyone")] == ["summarize"]
    reg.sync()  # shared adapters are not in the store and survive a sync
    assert reg.resolve("acme", "summarize")
    with pytest.raises(AdapterNotFound):
        reg.remove("acme", "summarize")


def test_slab_lru_pins_and_host_tier(lm, make_registry):
    slab = AdapterSlab(lm.model, chan_slots=2, group_slots=1, alpha_slots=1, host_slots=2)
    reg = make_registry(slab=slab)
    avs = [reg.upload("acme", f"a{i}", rand_adapter(lm, seed=10 + i).to_bytes()) for i in range(4)]
    r0 = reg.acquire(avs[0])
    r1 = reg.acquire(avs[1])
    assert r0.table == r1.table == "chan" and r0 != r1
    layer = next(iter(slab.layers))
    key = f"{layer}.scales"
    assert torch.allclose(slab.layers[layer].slab_chan[r0.index], avs[0].adapter.tensors[key])
    with pytest.raises(SlabFull):  # both slots pinned: never evicted
        reg.acquire(avs[2])
    reg.release(avs[0])
    r2 = reg.acquire(avs[2])  # evicts a0 (LRU, unpinned), not the pinned a1
    assert r2 == r0 and slab.is_resident(avs[1].key) and not slab.is_resident(avs[0].key)
    assert torch.allclose(slab.layers[layer].slab_chan[r1.index], avs[1].adapter.tensors[key])
    assert torch.allclose(slab.layers[layer].slab_chan[r2.index], avs[2].adapter.tensors[key])
    # host tier: 2 entries, LRU; a re-load of a host-cached adapter is a host hit
    assert slab.in_host_cache(avs[2].key) and slab.in_host_cache(avs[1].key) and not slab.in_host_cache(avs[0].key)
    reg.release(avs[2])
    reg.acquire(avs[1])  # resident: a pin, no load
    reg.release(avs[1])
    reg.release(avs[1])
    hits = slab.host_hits
    reg.acquire(avs[3])  # evicts a2 (LRU of the unpinned)
    reg.release(avs[3])
    reg.acquire(avs[2])  # a2 comes back from the host tier
    assert slab.host_hits == hits + 1
    reg.release(avs[2])
    # a new version retires the old one's slot once unpinned; a pinned one keeps its data
    reg.acquire(avs[2])
    new = reg.upload("acme", "a2", rand_adapter(lm, seed=99).to_bytes())
    assert slab.is_resident(avs[2].key) is False and slab.pins(avs[2].key) == 1  # retired but pinned
    before = slab.free_slots("chan")
    reg.release(avs[2])
    assert slab.free_slots("chan") == before + 1
    rn = reg.acquire(new)
    assert torch.allclose(slab.layers[layer].slab_chan[rn.index], new.adapter.tensors[key])
    reg.release(new)


def test_per_channel_load_fills_every_layer_of_its_row_only(lm):
    """Per-channel tables of all layers are column ranges of one table; an adapter loads as one copy into
    its row: every layer's slice gets that layer's scales, other rows (base = 1, free, other adapters)
    are untouched."""
    slab = AdapterSlab(lm.model, chan_slots=3, group_slots=1, alpha_slots=1)
    a, b = rand_adapter(lm, seed=5), rand_adapter(lm, seed=6)
    ra, rb = slab.write(a), slab.write(b)
    free = ({1, 2, 3} - {ra.index, rb.index}).pop()
    for name, m in slab.layers.items():
        assert m.slab_chan.untyped_storage().data_ptr() == slab.chan_table.untyped_storage().data_ptr()
        assert torch.equal(m.slab_chan[ra.index], a.tensors[f"{name}.scales"].to(m.slab_chan.dtype))
        assert torch.equal(m.slab_chan[rb.index], b.tensors[f"{name}.scales"].to(m.slab_chan.dtype))
        assert torch.equal(m.slab_chan[0], torch.ones_like(m.slab_chan[0]))
        assert torch.equal(m.slab_chan[free], torch.ones_like(m.slab_chan[0]))


def test_slab_group_and_alpha_tables(lm, make_tiny_model, make_registry):
    reg = make_registry(slab=AdapterSlab(lm.model, chan_slots=1, group_slots=1, alpha_slots=1, host_slots=0))
    g = reg.upload("acme", "g", rand_adapter(lm, per_channel=False, seed=1).to_bytes())
    al = reg.upload("acme", "al", rand_adapter(lm, kind="alphatuning", seed=2).to_bytes())
    rg, ra = reg.acquire(g), reg.acquire(al)
    assert (rg.table, ra.table) == ("group", "alpha")
    layer = next(iter(reg.slab.layers))
    m = reg.slab.layers[layer]
    assert torch.allclose(m.slab_scales[rg.index], g.adapter.tensors[f"{layer}.scales"])
    assert torch.allclose(m.slab_alphas[ra.index], al.adapter.tensors[f"{layer}.alphas"])
    assert torch.allclose(m.slab_betas[ra.index], al.adapter.tensors[f"{layer}.betas"])


def test_slab_table_bytes(lm):
    """table_bytes (what the server logs at start) counts every slot of every layer's tables."""
    slab = AdapterSlab(lm.model, chan_slots=3, group_slots=2, alpha_slots=1)
    layers = slab.layers.values()
    n = sum(m.out_features for m in layers)
    ng = sum(m.out_features * m.num_groups for m in layers)
    bits = next(iter(layers)).bits
    size = torch.empty(0, dtype=slab.table_dtype).element_size()
    assert slab.table_bytes() == {"chan": 4 * n * size, "group": 3 * ng * size, "alpha": 2 * (bits + 1) * ng * size}


def test_upload_stages_the_adapter_for_its_first_load(lm, make_registry):
    """An upload flattens the adapter into the host tier in the uploading thread: the engine thread's load
    at its first request is a host hit (one copy), and what it copies is the uploaded adapter."""
    slab = AdapterSlab(lm.model, chan_slots=2, group_slots=1, alpha_slots=1, host_slots=4)
    reg = make_registry(slab=slab)
    av = reg.upload("acme", "fresh", rand_adapter(lm, seed=41).to_bytes())
    assert slab.in_host_cache(av.key) and slab.host_hits == 0
    ref = reg.acquire(av)
    assert slab.host_hits == 1 and slab.loads == 1
    for name, m in slab.layers.items():
        assert torch.equal(m.slab_chan[ref.index], av.adapter.tensors[f"{name}.scales"].to(m.slab_chan.dtype))
    reg.release(av)
    no_tier = AdapterSlab(lm.model, chan_slots=2, group_slots=1, alpha_slots=1, host_slots=0)
    av = make_registry(slab=no_tier).upload("acme", "fresh", rand_adapter(lm, seed=42).to_bytes())
    assert not no_tier.in_host_cache(av.key)  # no host tier: nothing is kept
