"""The adapter store: atomic versioned commits, tombstones, pruning, concurrent claims; the local
directory backend and the S3 backend against moto's S3 server on loopback."""

from __future__ import annotations

import threading
import time

import pytest

from scaleserve.adapters import store as store_module
from scaleserve.adapters.store import (FileStore, S3Store, StoreError, StoreRecord, open_store, record_key,
                                       valid_name)


def s3_store(endpoint: str, bucket: str, prefix: str = "adapters/base-a") -> S3Store:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return S3Store(bucket, prefix, client=client)


@pytest.fixture(params=["file", "s3"])
def store(request, tmp_path):
    if request.param == "file":
        return FileStore(tmp_path / "store")
    endpoint = request.getfixturevalue("moto_endpoint")
    return s3_store(endpoint, f"bucket-{abs(hash(str(tmp_path))) % 10**8}")


def commit(store, tenant, name, data: bytes):
    import hashlib

    return store.commit(tenant, name, data, sha256=hashlib.sha256(data).hexdigest(), kind="peqa",
                        granularity="channel", base_fingerprint="f" * 64)


def test_names():
    assert valid_name("task-a.v2_x") and valid_name("A") and valid_name("9" * 64)
    for bad in ("", ".", "..", "-a", ".hidden", "a/b", "a b", "ä", "9" * 65, "a\n", "*"):
        assert not valid_name(bad), bad


def records(store, tenant, name) -> list[str]:
    return sorted(k for k in store._list(f"{tenant}/{name}/") if k.endswith(".json"))


def test_commit_versions_tombstone_prune(store):
    r1 = commit(store, "acme", "task", b"one")
    r2 = commit(store, "acme", "task", b"two")
    assert (r1.version, r2.version) == (1, 2)
    assert store.read_blob(store.latest("acme", "task")) == b"two"
    assert store.versions() == {("acme", "task"): 2}
    commit(store, "acme", "task", b"three")
    # v1 is young: a slow claimer may still be about to try its number, so its record stays
    assert records(store, "acme", "task") == [record_key("acme", "task", v) for v in (1, 2, 3)]
    store.prune_after_s = 0.0
    r4 = commit(store, "acme", "task", b"four")
    # now pruned to the newest KEEP_VERSIONS records; the blobs of v1 and v2 are gone too
    assert records(store, "acme", "task") == [record_key("acme", "task", 3), record_key("acme", "task", 4)]
    with pytest.raises(KeyError):
        store.read_blob(r1)
    with pytest.raises(KeyError):
        store.read_blob(r2)
    t = store.tombstone("acme", "task")
    assert t.deleted and t.version == 5
    assert store.latest("acme", "task").deleted
    assert store.tombstone("acme", "task") is None  # already deleted
    assert store.tombstone("acme", "never") is None
    r6 = commit(store, "acme", "task", b"again")  # versions keep counting after a delete
    assert r6.version == 6 and store.read_blob(r6) == b"again"
    assert r4.sha256 != r6.sha256
    # records round-trip
    assert StoreRecord.from_json(r6.to_json()) == r6
    # other tenants / names are independent
    assert commit(store, "other", "task", b"x").version == 1
    assert store.versions() == {("acme", "task"): 6, ("other", "task"): 1}


def stale_first_listing(store, monkeypatch):
    """The next claim lists nothing (as if it listed before any commit), then sees the truth."""
    real = store._name_versions
    calls = []

    def listing(tenant, name):
        calls.append(name)
        return [] if len(calls) == 1 else real(tenant, name)

    monkeypatch.setattr(store, "_name_versions", listing)


def test_a_slow_claimer_never_gets_a_number_already_handed_out(store, monkeypatch):
    # CI once saw six concurrent uploads get versions 1, 1, 2, 3, 4, 5: a claimer listed before v1
    # existed, v1 was pruned by the third commit, and the slow claimer's create-if-absent of v1 won.
    for data in (b"one", b"two", b"three"):
        commit(store, "acme", "task", data)
    stale_first_listing(store, monkeypatch)
    assert commit(store, "acme", "task", b"slow").version == 4  # v1 was young, so still taken


def test_a_claim_past_its_deadline_is_withdrawn_and_claimed_again(store, monkeypatch):
    store.prune_after_s = 0.0  # prune at once: v1 is gone after the third commit
    for data in (b"one", b"two", b"three"):
        commit(store, "acme", "task", data)
    assert record_key("acme", "task", 1) not in records(store, "acme", "task")

    class SlowClock:  # the first create-if-absent finishes 2 minutes after its listing; then all is quick
        def __init__(self):
            self.readings = iter([0.0, 120.0])

        def monotonic(self):
            return next(self.readings, 120.0)

        time = staticmethod(time.time)

    monkeypatch.setattr(store_module, "time", SlowClock())
    stale_first_listing(store, monkeypatch)
    rec = commit(store, "acme", "task", b"slow")
    assert rec.version == 4 and store.read_blob(store.latest("acme", "task")) == b"slow"
    # the withdrawn claim of v1 left nothing behind
    assert record_key("acme", "task", 1) not in records(store, "acme", "task")


def test_min_version_and_bad_names(store):
    assert commit(store, "t", "n", b"a").version == 1
    import hashlib

    r = store.commit("t", "n", b"b", sha256=hashlib.sha256(b"b").hexdigest(), kind="peqa", granularity="channel",
                     base_fingerprint="f", min_version=7)
    assert r.version == 8
    with pytest.raises(StoreError):
        commit(store, "../etc", "n", b"x")
    with pytest.raises(StoreError):
        commit(store, "t", "a/b", b"x")


def test_concurrent_commits_get_distinct_increasing_versions(store):
    got, errors = [], []

    def worker(i):
        try:
            got.append(commit(store, "acme", "race", f"payload-{i}".encode()).version)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(got) == list(range(1, 9))  # every writer got its own version, none lost
    latest = store.latest("acme", "race")
    assert latest.version == 8
    assert store.read_blob(latest).startswith(b"payload-")


def test_file_store_leaves_no_temp_files_and_ignores_them(tmp_path):
    s = FileStore(tmp_path / "s")
    commit(s, "acme", "task", b"x" * 1000)
    assert not [p for p in (tmp_path / "s").rglob(".tmp-*")]
    # a half-written temp file (crash mid-write) is invisible to readers
    (tmp_path / "s" / "acme" / "task" / ".tmp-deadbeef").write_bytes(b"partial")
    (tmp_path / "s" / "acme" / "task" / "v0000000009.json.partial").write_bytes(b"{")
    assert s.versions() == {("acme", "task"): 1}


def test_open_store(tmp_path, monkeypatch):
    s = open_store((tmp_path / "a").as_uri())
    assert isinstance(s, FileStore) and (tmp_path / "a").is_dir()
    assert isinstance(open_store(str(tmp_path / "b")), FileStore)
    with pytest.raises(StoreError):
        open_store("ftp://x/y")
    with pytest.raises(StoreError):
        open_store("s3:///nobucket")


def test_open_store_s3_from_settings(moto_endpoint):
    from scaleserve.server.settings import Settings

    settings = Settings(s3_endpoint_url=moto_endpoint, s3_region="us-east-1", s3_access_key_id="k",
                        s3_secret_access_key="s")
    s = open_store("s3://settings-bucket/some/prefix", settings)
    assert isinstance(s, S3Store) and s.url == "s3://settings-bucket/some/prefix"
    s.s3.create_bucket(Bucket="settings-bucket")
    assert commit(s, "acme", "x", b"data").version == 1
    keys = [o["Key"] for o in s.s3.list_objects_v2(Bucket="settings-bucket")["Contents"]]
    assert all(k.startswith("some/prefix/acme/x/") for k in keys), keys
