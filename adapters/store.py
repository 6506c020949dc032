"""Durable adapter store shared by every replica: a local directory (file://) or an S3 bucket (s3://).

Layout under the store root (the same keys on both backends):

  {tenant}/{name}/v{version:010d}.json            the version's metadata record
  {tenant}/{name}/blobs/{sha256[:16]}-{uuid}.safetensors   the adapter bytes the record points at

Commit protocol (why a reader never sees a half-written adapter):
  1. the blob is written atomically (file: temp file, fsync, rename, fsync dir; S3: one PUT) under a
     name no other upload uses;
  2. the record is then *claimed* with create-if-absent (file: link(2) of a fsynced temp file,
     S3: PUT with If-None-Match: *). The first writer of v{n} wins; a loser re-reads the newest
     version and tries n+1, so versions are strictly increasing per (tenant, name) even with
     concurrent uploads through several replicas.
A record exists only after its blob is complete, and readers only follow records.

Deleting writes a tombstone record ({"deleted": true}) as the next version, so a name deleted and
uploaded again keeps counting up. Older records and their blobs are pruned after each commit
(the newest KEEP_VERSIONS stay). A crash between steps 1 and 2 leaves an orphan blob, never a
visible record.

Pruning must not hand a version number out twice. A claimer computes n+1 from a listing; if record
n+1 were pruned before its create-if-absent, a slow claimer would win a number that was already
used (seen in CI: six concurrent uploads got versions 1, 1, 2, 3, 4, 5). So a record is pruned only
once it is PRUNE_AFTER_S old, and a claim that took longer than CLAIM_DEADLINE_S from its listing
withdraws its record and starts again: every record a claimer did not see in its listing was
created after that listing, and is still there when the claimer's create-if-absent runs.
(This tolerates clock skew between replicas of up to PRUNE_AFTER_S - CLAIM_DEADLINE_S.)
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

log = logging.getLogger("scaleserve.adapters.store")

# Tenant and adapter names: also path / object-key components, so a closed, safe character set.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_NAME_RE = re.compile(NAME_PATTERN)
_RECORD_RE = re.compile(r"^v(\d{10})\.json$")
KEEP_VERSIONS = 2  # records kept per name after a commit (the newest and the one before)
PRUNE_AFTER_S = 600.0  # an older record is pruned only once it is this old (see the module docstring)
CLAIM_DEADLINE_S = 60.0  # a claim slower than this from its listing is withdrawn and retried
_CLAIM_ATTEMPTS = 64


NAME_RULE = "1-64 characters of A-Z a-z 0-9 . _ -, starting with a letter or digit"  # (for error messages)


def valid_name(name: str) -> bool:
    """NAME_RULE: 1-64 characters of [A-Za-z0-9._-], starting with a letter or digit ('..' cannot be formed
    alone)."""
    return isinstance(name, str) and bool(_NAME_RE.fullmatch(name)) and name not in (".", "..")


class StoreError(RuntimeError):
    pass


@dataclass(frozen=True)
class StoreRecord:
    """One committed version of (tenant, name). `deleted` marks a tombstone (no blob)."""

    tenant: str
    name: str
    version: int
    kind: str = ""
    granularity: str = ""
    sha256: str = ""
    size_bytes: int = 0
    created_at: float = 0.0
    base_fingerprint: str = ""
    blob: str = ""  # key relative to the store root
    deleted: bool = False

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "StoreRecord":
        d = json.loads(data)
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def record_key(tenant: str, name: str, version: int) -> str:
    return f"{tenant}/{name}/v{version:010d}.json"


class AdapterStore:
    """Versioned, atomic adapter storage. Subclasses provide five primitives on keys (str, '/'-separated)."""

    url: str
    prune_after_s: float = PRUNE_AFTER_S
    claim_deadline_s: float = CLAIM_DEADLINE_S

    # --- backend primitives -------------------------------------------------------------------

    def _list(self, prefix: str = "") -> list[str]:
        """Every key under `prefix` (recursively)."""
        raise NotImplementedError

    def _get(self, key: str) -> bytes:
        """The object's bytes; KeyError if absent."""
        raise NotImplementedError

    def _put_atomic(self, key: str, data: bytes) -> None:
        """Write `data` so that a reader sees either nothing or all of it."""
        raise NotImplementedError

    def _put_exclusive(self, key: str, data: bytes) -> bool:
        """Atomically create `key` if it does not exist; False if it already does."""
        raise NotImplementedError

    def _delete(self, key: str) -> None:
        raise NotImplementedError

    # --- versions -------------------------------------------------------------------------------

    def versions(self) -> dict[tuple[str, str], int]:
        """(tenant, name) -> newest committed version (tombstones included). A listing, no record reads."""
        out: dict[tuple[str, str], int] = {}
        for key in self._list(""):
            parts = key.split("/")
            if len(parts) != 3:
                continue
            m = _RECORD_RE.fullmatch(parts[2])
            if m is None or not valid_name(parts[0]) or not valid_name(parts[1]):
                continue
            v = int(m.group(1))
            if v > out.get((parts[0], parts[1]), 0):
                out[(parts[0], parts[1])] = v
        return out

    def _name_versions(self, tenant: str, name: str) -> list[int]:
        vs = []
        for key in self._list(f"{tenant}/{name}/"):
            m = _RECORD_RE.fullmatch(key.rsplit("/", 1)[-1])
            if m is not None and key.count("/") == 2:
                vs.append(int(m.group(1)))
        return sorted(vs)

    def read_record(self, tenant: str, name: str, version: int) -> StoreRecord:
        rec = StoreRecord.from_json(self._get(record_key(tenant, name, version)))
        if (rec.tenant, rec.name, rec.version) != (tenant, name, version):
            raise StoreError(f"record {record_key(tenant, name, version)} describes "
                             f"{rec.tenant}/{rec.name} v{rec.version}")
        return rec

    def latest(self, tenant: str, name: str) -> StoreRecord | None:
        """The newest record of one name (None if never stored); may be a tombstone."""
        for v in reversed(self._name_versions(tenant, name)):
            try:
                return self.read_record(tenant, name, v)
            except KeyError:  # pruned between list and get: look at the next one
                continue
        return None

    def read_blob(self, rec: StoreRecord) -> bytes:
        return self._get(rec.blob)

    # --- writes ---------------------------------------------------------------------------------

    def commit(self, tenant: str, name: str, data: bytes, *, sha256: str, kind: str, granularity: str,
               base_fingerprint: str, min_version: int = 0) -> StoreRecord:
        """Store one new version of (tenant, name); returns its record (with the version it got)."""
        _check_names(tenant, name)
        blob = f"{tenant}/{name}/blobs/{sha256[:16]}-{uuid.uuid4().hex}.safetensors"
        self._put_atomic(blob, data)
        rec = self._claim(tenant, name, min_version, dict(
            kind=kind, granularity=granularity, sha256=sha256, size_bytes=len(data),
            base_fingerprint=base_fingerprint, blob=blob))
        self._prune(tenant, name, rec.version)
        return rec

    def tombstone(self, tenant: str, name: str, min_version: int = 0) -> StoreRecord | None:
        """Mark (tenant, name) deleted; None if it was not stored or already deleted."""
        _check_names(tenant, name)
        cur = self.latest(tenant, name)
        if cur is None or cur.deleted:
            return None
        rec = self._claim(tenant, name, max(min_version, cur.version), dict(deleted=True))
        self._prune(tenant, name, rec.version)
        return rec

    def _claim(self, tenant: str, name: str, min_version: int, fields: dict) -> StoreRecord:
        listed_at = time.monotonic()  # of the first listing this claim relies on
        v = min_version
        for _ in range(_CLAIM_ATTEMPTS):
            v = max([v, *self._name_versions(tenant, name)]) + 1
            rec = StoreRecord(tenant=tenant, name=name, version=v, created_at=time.time(), **fields)
            key = record_key(tenant, name, v)
            if not self._put_exclusive(key, rec.to_json()):
                continue  # someone else committed v: go past it
            if time.monotonic() - listed_at <= self.claim_deadline_s:
                return rec
            # Too slow: v may have been pruned and is now handed out a second time. Take it back and
            # claim again from a fresh listing.
            log.warning("claim of %s/%s v%d took over %.0f s; withdrawing it and claiming again",
                        tenant, name, v, self.claim_deadline_s)
            self._delete(key)
            listed_at = time.monotonic()
        raise StoreError(f"could not claim a version of {tenant}/{name} after {_CLAIM_ATTEMPTS} attempts")

    def _prune(self, tenant: str, name: str, newest: int) -> None:
        """Drop records older than the KEEP_VERSIONS newest once they are prune_after_s old, and the
        blobs no kept record points at."""
        try:
            versions = [v for v in self._name_versions(tenant, name) if v <= newest]
            old = versions[:-KEEP_VERSIONS] if len(versions) > KEEP_VERSIONS else []
            kept_blobs = set()
            for v in versions[-KEEP_VERSIONS:]:
                try:
                    kept_blobs.add(self.read_record(tenant, name, v).blob)
                except (KeyError, StoreError, ValueError):
                    pass
            now = time.time()
            for v in old:
                try:
                    rec = self.read_record(tenant, name, v)
                except (KeyError, StoreError, ValueError):
                    continue  # gone already, or unreadable: its number stays taken
                if now - rec.created_at < self.prune_after_s:
                    continue  # young: a slow claimer may still be about to try this number
                self._delete(record_key(tenant, name, v))
                if rec.blob and rec.blob not in kept_blobs:
                    self._delete(rec.blob)
        except Exception as e:  # pruning is housekeeping: never fail a commit for it
            log.warning("pruning old versions of %s/%s failed: %s", tenant, name, e)


def _check_names(tenant: str, name: str) -> None:
    if not valid_name(tenant):
        raise StoreError(f"tenant name {tenant!r} is not a valid store path component")
    if not valid_name(name):
        raise StoreError(f"adapter name {name!r} is not a valid store path component")


class FileStore(AdapterStore):
    """A local (or shared POSIX, e.g. NFS/RWX) directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.resolve().as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*key.split("/"))

    def _list(self, prefix: str = "") -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return []
        out = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for f in filenames:
                if not f.startswith("."):  # temp files are dot-files
                    out.append(f if rel == "." else f"{rel}/{f}")
        return out

    def _get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def _write_temp(self, final: Path, data: bytes) -> Path:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".tmp-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    @staticmethod
    def _fsync_dir(d: Path) -> None:
        try:
            fd = os.open(d, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:
            pass
        finally:
            os.close(fd)

    def _put_atomic(self, key: str, data: bytes) -> None:
        final = self._path(key)
        tmp = self._write_temp(final, data)
        os.replace(tmp, final)
        self._fsync_dir(final.parent)

    def _put_exclusive(self, key: str, data: bytes) -> bool:
        final = self._path(key)
        tmp = self._write_temp(final, data)
        try:
            os.link(tmp, final)  # atomic create-if-absent, also on NFS
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
            self._fsync_dir(final.parent)

    def _delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)


class S3Store(AdapterStore):
    """Any S3-compatible object store through boto3. Needs conditional writes (If-None-Match: *) for
    strictly monotonic versions across replicas (AWS S3 since 2024, MinIO, moto)."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str | None = None, access_key_id: str | None = None,
                 secret_access_key: str | None = None, client=None):
        if client is None:
            import boto3
            from botocore.config import Config

            client = boto3.client(
                "s3", endpoint_url=endpoint_url, region_name=region, aws_access_key_id=access_key_id,
                aws_secret_access_key=secret_access_key,
                config=Config(retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=30))
        self.s3 = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"

    def _k(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _list(self, prefix: str = "") -> list[str]:
        full = self._k(prefix) if prefix else (self.prefix + "/" if self.prefix else "")
        strip = len(self.prefix) + 1 if self.prefix else 0
        out = []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            out.extend(o["Key"][strip:] for o in page.get("Contents", ()))
        return out

    def _get(self, key: str) -> bytes:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._k(key))["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            raise KeyError(key) from None

    def _put_atomic(self, key: str, data: bytes) -> None:
        self.s3.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)  # a single PUT is atomic

    def _put_exclusive(self, key: str, data: bytes) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.put_object(Bucket=self.bucket, Key=self._k(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return False
            raise

    def _delete(self, key: str) -> None:
        self.s3.delete_object(Bucket=self.bucket, Key=self._k(key))


def open_store(url: str, settings=None) -> AdapterStore:
    """file:///dir (or a plain path) -> FileStore; s3://bucket/prefix -> S3Store (endpoint, region and
    credentials from settings; unset ones fall back to boto3's usual chain: env, IRSA, instance role)."""
    p = urlparse(url)
    if p.scheme in ("", "file"):
        path = unquote(p.path) if p.scheme == "file" else url
        if p.scheme == "file" and p.netloc not in ("", "localhost"):
            raise StoreError(f"file store URL {url!r} must be file:///absolute/path")
        return FileStore(path)
    if p.scheme == "s3":
        if not p.netloc:
            raise StoreError(f"S3 store URL {url!r} has no bucket (s3://bucket/prefix)")
        secret = lambda s: s.get_secret_value() if s is not None else None  # noqa: E731
        kw = {}
        if settings is not None:
            kw = dict(endpoint_url=settings.s3_endpoint_url, region=settings.s3_region,
                      access_key_id=secret(settings.s3_access_key_id),
                      secret_access_key=secret(settings.s3_secret_access_key))
        return S3Store(p.netloc, p.path, **kw)
    raise StoreError(f"unsupported adapter store URL {url!r} (use file:///dir or s3://bucket/prefix)")
