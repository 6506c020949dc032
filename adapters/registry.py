"""Adapter registry: (tenant, name) -> the newest validated adapter version, backed by the store,
and those versions' residency in the GPU slab.

Data path: upload -> format.parse_adapter -> format.validate -> store.commit (atomic, versioned)
-> the registry's map -> completions resolve(tenant, name) at admission -> the engine's next step
calls acquire(av), which stages the copy into a slab slot.

Versions: the store hands out versions (strictly increasing per name, also across replicas); the map
only ever moves forward (an older version arriving late - a slow sync, a concurrent upload - is
ignored). A request keeps the AdapterVersion it resolved at admission, and slots are keyed by
(tenant, name, version), so a new version or a delete never changes what a running request reads.

Replicas: every replica writes to and reads from the same store. start() loads everything stored,
then re-reads the store's listing every `sync_interval_s` (new versions, deletes); resolve() of a name
this replica has not seen yet looks in the store at once.

Threading: HTTP handlers call resolve/upload/remove/list from the event loop or its thread pool; the
sync runs in a worker thread; the engine thread calls acquire/release between steps. A lock guards
the maps; slab device writes happen only in acquire, i.e. only on the engine thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .format import MAX_HEADER_BYTES, Adapter, AdapterError, BaseSpec, parse_adapter, validate
from .slab import BASE, AdapterSlab, SlabFull, SlotRef
from .store import NAME_RULE, AdapterStore, StoreRecord, valid_name

log = logging.getLogger("scaleserve.adapters")

# Adapters loaded from settings.adapters (a directory given by the operator) belong to this pseudo
# tenant: every tenant can use and list them, no tenant can change them. Not a valid tenant name.
SHARED_TENANT = "*"


class AdapterNotFound(KeyError):
    pass


class AdapterTooLarge(AdapterError):
    pass


class TenantLimitExceeded(RuntimeError):
    pass


@dataclass
class AdapterVersion:
    tenant: str
    name: str
    version: int
    adapter: Adapter  # validated, float32 tensors on the host
    sha256: str = ""
    size_bytes: int = 0
    created_at: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, str, int]:
        return (self.tenant, self.name, self.version)

    @property
    def kind(self) -> str:
        return self.adapter.kind

    @property
    def granularity(self) -> str:
        return self.adapter.granularity

    @property
    def base_fingerprint(self) -> str:
        return self.adapter.base_fingerprint

    def describe(self) -> dict:
        """The public JSON view (HTTP responses)."""
        return {"object": "adapter", "name": self.name, "tenant": self.tenant, "version": self.version,
                "sha256": self.sha256, "kind": self.kind, "granularity": self.granularity,
                "size_bytes": self.size_bytes, "created_at": int(self.created_at),
                "base_fingerprint": self.base_fingerprint}


class AdapterRegistry:
    def __init__(self, base: BaseSpec, slab: AdapterSlab, store: AdapterStore | None = None, *,
                 sync_interval_s: float = 2.0, max_adapter_bytes: int = 1 << 30,
                 tenant_max_adapters: int | None = None, reserved_names: set[str] | None = None):
        self.base = base
        self.slab = slab
        self.store = store
        self.sync_interval_s = sync_interval_s
        self.max_adapter_bytes = max_adapter_bytes
        self.tenant_max_adapters = tenant_max_adapters
        self.reserved_names = set(reserved_names or ())  # e.g. the base model's served name
        self._lock = threading.RLock()
        self._latest: dict[tuple[str, str], AdapterVersion] = {}  # (tenant, name) -> newest version
        self._seen: dict[tuple[str, str], int] = {}  # newest store version applied (tombstones too)
        self._bad: dict[tuple[str, str, int], str] = {}  # store versions that failed validation
        self._misses: dict[tuple[str, str], float] = {}  # negative cache of store look-ups
        self._task: asyncio.Task | None = None
        self.last_sync: float | None = None
        self.on_load = None  # optional callback(seconds) for metrics

    @classmethod
    def from_settings(cls, lm, settings, slab: AdapterSlab | None = None,
                      store: AdapterStore | None = None) -> "AdapterRegistry":
        """The server's registry: slab sized by settings, store opened from settings.store_url()."""
        from .store import open_store

        if slab is None:
            slab = AdapterSlab(lm.model, chan_slots=settings.gpu_adapter_slots,
                               group_slots=settings.gpu_group_adapter_slots,
                               alpha_slots=settings.gpu_alpha_adapter_slots,
                               host_slots=settings.host_adapter_cache)
            sizes = slab.table_bytes()
            log.info("adapter slab (%s): per-channel %d slots %.0f MiB, group-wise %d slots %.0f MiB, "
                     "AlphaTuning %d slots %.0f MiB (slot 0 of each is the base)", str(slab.table_dtype).split(".")[-1],
                     slab.capacity["chan"], sizes["chan"] / 2**20, slab.capacity["group"], sizes["group"] / 2**20,
                     slab.capacity["alpha"], sizes["alpha"] / 2**20)
        if store is None:
            store = open_store(settings.store_url(), settings)
        reserved = {n for n in (getattr(lm, "name", None), settings.served_model_name) if n}
        return cls(BaseSpec.from_model(lm), slab, store, sync_interval_s=settings.store_sync_interval_s,
                   max_adapter_bytes=settings.max_adapter_bytes,
                   tenant_max_adapters=settings.tenant_max_adapters, reserved_names=reserved)

    # --- checking uploads ---------------------------------------------------------------------

    def check(self, data: bytes) -> Adapter:
        """bytes -> validated Adapter, or AdapterError naming the first offending tensor/field."""
        if len(data) > self.max_adapter_bytes:
            raise AdapterTooLarge(f"adapter is {len(data)} bytes; the limit is {self.max_adapter_bytes}", "file")
        return validate(parse_adapter(data, min(MAX_HEADER_BYTES, self.max_adapter_bytes)), self.base)

    def check_name(self, name: str) -> None:
        if not valid_name(name):
            raise AdapterError(f"adapter name {name!r} is invalid: {NAME_RULE}", "name")
        if name in self.reserved_names:
            raise AdapterError(f"adapter name {name!r} is the base model's name", "name")

    # --- names ----------------------------------------------------------------------------

    def upload(self, tenant: str, name: str, data: bytes) -> AdapterVersion:
        """Validate, store durably, and make it the newest version of (tenant, name). Blocking I/O:
        call from a worker thread. Raises AdapterError (4xx) or TenantLimitExceeded."""
        self.check_name(name)
        checked = self.check(data)
        with self._lock:
            if (self.tenant_max_adapters is not None and (tenant, name) not in self._latest
                    and self.count(tenant) >= self.tenant_max_adapters):
                raise TenantLimitExceeded(f"tenant {tenant!r} already has {self.count(tenant)} adapters, the "
                                          f"limit is {self.tenant_max_adapters}; delete one first")
        sha = hashlib.sha256(data).hexdigest()
        if self.store is None:
            return self.put(tenant, name, checked, sha, len(data), _validated=True)
        rec = self.store.commit(tenant, name, data, sha256=sha, kind=checked.kind,
                                granularity=checked.granularity, base_fingerprint=checked.base_fingerprint,
                                min_version=self._known_version(tenant, name))
        av = AdapterVersion(tenant, name, rec.version, checked, sha, len(data), rec.created_at)
        if self._install(av) and self.slab.host_slots > 0:
            # flatten (and pin) it now, in this worker thread: the engine thread's load at its first
            # request is then one host->device copy, not a pause of every running stream
            self.slab.stage(av.adapter, av.key)
        return av

    def put(self, tenant: str, name: str, adapter: Adapter, sha256: str = "", size_bytes: int = 0,
            version: int | None = None, _validated: bool = False) -> AdapterVersion:
        """Memory only (no store): tests, offline use, the shared adapters directory."""
        checked = adapter if _validated else validate(adapter, self.base)
        with self._lock:
            v = version if version is not None else self._known_version(tenant, name) + 1
            av = AdapterVersion(tenant, name, v, checked, sha256, size_bytes)
            self._install(av)
        return av

    def remove(self, tenant: str, name: str) -> int:
        """Delete (tenant, name); returns the deleted version. New resolves 404 at once; running
        requests finish on the version they hold (its slot is freed at their last release)."""
        with self._lock:
            av = self._latest.get((tenant, name))
        if self.store is not None:
            rec = self.store.tombstone(tenant, name, min_version=self._known_version(tenant, name))
            if rec is not None:
                self._apply_tombstone(tenant, name, rec.version)
                return av.version if av is not None else rec.version - 1
        if av is None:
            raise AdapterNotFound(name)
        with self._lock:  # not (or no longer) in the store: drop it here
            if self._latest.get((tenant, name)) is av:
                del self._latest[(tenant, name)]
        self.slab.retire(av.key)
        return av.version

    def delete(self, tenant: str, name: str) -> int:
        return self.remove(tenant, name)

    def get(self, tenant: str, name: str) -> AdapterVersion:
        """The tenant's own adapter (no shared fallback); looks in the store on a miss."""
        with self._lock:
            av = self._latest.get((tenant, name))
        if av is None and self.store is not None and valid_name(tenant) and valid_name(name):
            av = self._lookup_store(tenant, name)
        if av is None:
            raise AdapterNotFound(name)
        return av

    def resolve(self, tenant: str, name: str) -> AdapterVersion:
        """The version a new request of `tenant` asking for `name` uses: its own, else a shared one."""
        try:
            return self.get(tenant, name)
        except AdapterNotFound:
            pass
        with self._lock:
            av = self._latest.get((SHARED_TENANT, name))
        if av is None:
            raise AdapterNotFound(name)
        return av

    def list(self, tenant: str | None = None) -> list[AdapterVersion]:
        """All versions in the map (tenant=None), or one tenant's own plus the shared ones."""
        with self._lock:
            return sorted((v for (t, _), v in self._latest.items()
                           if tenant is None or t == tenant or t == SHARED_TENANT),
                          key=lambda v: (v.tenant, v.name))

    def count(self, tenant: str) -> int:
        with self._lock:
            return sum(1 for (t, _) in self._latest if t == tenant)

    def load_dir(self, path: str | Path, tenant: str = SHARED_TENANT) -> list[AdapterVersion]:
        """Every *.safetensors in `path`, named by file stem, into the map (not the store). A bad file
        is logged and skipped."""
        out = []
        for f in sorted(Path(path).glob("*.safetensors")):
            try:
                data = f.read_bytes()
                self.check_name(f.stem)
                out.append(self.put(tenant, f.stem, self.check(data), hashlib.sha256(data).hexdigest(),
                                    len(data), _validated=True))
            except (AdapterError, OSError) as e:
                log.error("adapter file %s skipped: %s", f, e)
        return out

    # --- the map --------------------------------------------------------------------------------

    def _known_version(self, tenant: str, name: str) -> int:
        with self._lock:
            av = self._latest.get((tenant, name))
            return max(self._seen.get((tenant, name), 0), av.version if av else 0)

    def _install(self, av: AdapterVersion) -> bool:
        """Make `av` the newest version unless a newer one (or a newer delete) is already known."""
        k = (av.tenant, av.name)
        with self._lock:
            if av.version <= self._seen.get(k, 0):
                return False
            old = self._latest.get(k)
            self._latest[k] = av
            self._seen[k] = av.version
            self._misses.pop(k, None)
        if old is not None:
            self.slab.retire(old.key)
        return True

    def _apply_tombstone(self, tenant: str, name: str, version: int) -> None:
        k = (tenant, name)
        with self._lock:
            if version <= self._seen.get(k, 0):
                return
            self._seen[k] = version
            old = self._latest.get(k)
            if old is not None and old.version < version:
                del self._latest[k]
            else:
                old = None
        if old is not None:
            self.slab.retire(old.key)

    def _load_record(self, rec: StoreRecord) -> AdapterVersion | None:
        """A store record -> an AdapterVersion, or None (logged) when its file is unusable."""
        bad_key = (rec.tenant, rec.name, rec.version)
        if bad_key in self._bad:
            return None
        try:
            data = self.store.read_blob(rec)
            if hashlib.sha256(data).hexdigest() != rec.sha256:
                raise AdapterError(f"sha256 of {rec.blob} does not match its record", "sha256")
            checked = self.check(data)
        except KeyError:
            return None  # pruned under us; the next sync sees the newer record
        except (AdapterError, ValueError) as e:
            self._bad[bad_key] = str(e)
            log.error("store adapter %s/%s v%d failed validation and is skipped: %s",
                      rec.tenant, rec.name, rec.version, e)
            return None
        return AdapterVersion(rec.tenant, rec.name, rec.version, checked, rec.sha256, rec.size_bytes,
                              rec.created_at)

    def _apply_record(self, rec: StoreRecord) -> None:
        if rec.deleted:
            self._apply_tombstone(rec.tenant, rec.name, rec.version)
            return
        av = self._load_record(rec)
        if av is not None:
            self._install(av)
        elif (rec.tenant, rec.name, rec.version) in self._bad:
            with self._lock:  # skip it from now on (the older good version keeps serving)
                k = (rec.tenant, rec.name)
                self._seen[k] = max(self._seen.get(k, 0), rec.version)

    def _lookup_store(self, tenant: str, name: str) -> AdapterVersion | None:
        k = (tenant, name)
        now = time.monotonic()
        with self._lock:
            if now - self._misses.get(k, -1e9) < self.sync_interval_s:
                return None
        try:
            rec = self.store.latest(tenant, name)
        except Exception as e:
            log.warning("store look-up of %s/%s failed: %s", tenant, name, e)
            rec = None
        if rec is not None:
            self._apply_record(rec)
        with self._lock:
            av = self._latest.get(k)
            if av is None:
                self._misses[k] = now
        return av

    # --- replica sync -----------------------------------------------------------------------------

    def sync(self) -> int:
        """Apply every store change since the last sync (blocking I/O). Returns how many names changed."""
        if self.store is None:
            return 0
        versions = self.store.versions()
        changed = 0
        for (tenant, name), v in versions.items():
            if v <= self._known_version(tenant, name) or (tenant, name, v) in self._bad:
                continue
            try:
                rec = self.store.read_record(tenant, name, v)
            except KeyError:
                continue
            except (ValueError, TypeError) as e:
                self._bad[(tenant, name, v)] = str(e)
                log.error("store record %s/%s v%d is unreadable and skipped: %s", tenant, name, v, e)
                continue
            before = self._latest.get((tenant, name))
            self._apply_record(rec)
            changed += self._latest.get((tenant, name)) is not before
        # names whose records vanished from the store entirely (the store was wiped by hand)
        with self._lock:
            gone = [k for k in self._latest if k[0] != SHARED_TENANT and k not in versions]
        for tenant, name in gone:
            with self._lock:
                av = self._latest.pop((tenant, name), None)
            if av is not None:
                self.slab.retire(av.key)
                changed += 1
        self.last_sync = time.time()
        return changed

    async def start(self) -> None:
        """Load everything stored (before the server takes traffic), then sync in the background."""
        if self.store is None or self._task is not None:
            return
        t0 = time.perf_counter()
        await asyncio.to_thread(self.sync)
        log.info("adapter store %s: %d adapters loaded in %.2f s (%d skipped as invalid); syncing every %.1f s",
                 self.store.url, len(self._latest), time.perf_counter() - t0, len(self._bad), self.sync_interval_s)
        self._task = asyncio.create_task(self._sync_loop(), name="adapter-store-sync")

    async def _sync_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval_s)
            try:
                await asyncio.to_thread(self.sync)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the store being down must not take the server down
                log.warning("adapter store sync failed (will retry): %s", e)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # --- residency (engine thread only) ------------------------------------------------------

    def acquire(self, av: AdapterVersion | None) -> SlotRef:
        """Make `av` resident and pin it; None = the base. Raises SlabFull if every slot is pinned."""
        if av is None:
            return BASE
        t0 = time.perf_counter()
        loaded = not self.slab.is_resident(av.key)
        ref = self.slab.acquire(av.key, av.adapter)
        if loaded and self.on_load is not None:
            self.on_load(time.perf_counter() - t0)
        return ref

    def release(self, av: AdapterVersion | None) -> None:
        if av is None:
            return
        self.slab.unpin(av.key)


__all__ = ["AdapterRegistry", "AdapterVersion", "AdapterNotFound", "AdapterError", "AdapterTooLarge",
           "TenantLimitExceeded", "SlabFull", "SHARED_TENANT"]
