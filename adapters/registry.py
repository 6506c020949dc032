"""Adapter registry: names -> validated adapter versions, and their residency in the GPU slab.

Data path: upload -> format.parse_adapter -> format.validate -> (store) -> registry.put ->
the engine's next step calls acquire(), which stages the copy into a slab slot.

Threading: HTTP handlers call resolve/put/delete from the event loop; the engine thread calls
acquire/release between steps. A lock guards the maps; slab writes happen only in acquire/release,
i.e. only on the engine thread, so a running step never sees a half-written slot.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from .format import Adapter, AdapterError, BaseSpec, validate
from .slab import BASE, AdapterSlab, SlabFull, SlotRef


class AdapterNotFound(KeyError):
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


@dataclass
class _Resident:
    ref: SlotRef
    pins: int = 0


class AdapterRegistry:
    def __init__(self, base: BaseSpec, slab: AdapterSlab):
        self.base = base
        self.slab = slab
        self._lock = threading.Lock()
        self._latest: dict[tuple[str, str], AdapterVersion] = {}  # (tenant, name) -> newest version
        self._resident: OrderedDict[tuple[str, str, int], _Resident] = OrderedDict()  # LRU order
        self.on_load = None  # optional callback(seconds) for metrics

    # --- names ----------------------------------------------------------------------------

    def put(self, tenant: str, name: str, adapter: Adapter, sha256: str = "", size_bytes: int = 0,
            version: int | None = None) -> AdapterVersion:
        checked = validate(adapter, self.base)
        with self._lock:
            old = self._latest.get((tenant, name))
            v = version if version is not None else (old.version + 1 if old else 1)
            av = AdapterVersion(tenant, name, v, checked, sha256, size_bytes)
            self._latest[(tenant, name)] = av
        return av

    def delete(self, tenant: str, name: str) -> AdapterVersion:
        with self._lock:
            av = self._latest.pop((tenant, name), None)
        if av is None:
            raise AdapterNotFound(name)
        return av

    def resolve(self, tenant: str, name: str) -> AdapterVersion:
        with self._lock:
            av = self._latest.get((tenant, name))
        if av is None:
            raise AdapterNotFound(name)
        return av

    def list(self, tenant: str | None = None) -> list[AdapterVersion]:
        with self._lock:
            return sorted((v for (t, _), v in self._latest.items() if tenant is None or t == tenant),
                          key=lambda v: (v.tenant, v.name))

    # --- residency (engine thread only) ------------------------------------------------------

    def acquire(self, av: AdapterVersion | None) -> SlotRef:
        """Make `av` resident and pin it; None = the base. Raises SlabFull if every slot is pinned."""
        if av is None:
            return BASE
        with self._lock:
            res = self._resident.get(av.key)
            if res is not None:
                self._resident.move_to_end(av.key)
                res.pins += 1
                return res.ref
        table = self.slab.table_for(av.adapter)
        if self.slab.free_slots(table) == 0:
            self._evict_one(table)
        t0 = time.perf_counter()
        ref = self.slab.write(av.adapter)
        if self.on_load is not None:
            self.on_load(time.perf_counter() - t0)
        with self._lock:
            self._resident[av.key] = _Resident(ref, pins=1)
        return ref

    def release(self, av: AdapterVersion | None) -> None:
        if av is None:
            return
        with self._lock:
            res = self._resident.get(av.key)
            if res is not None:
                res.pins -= 1

    def _evict_one(self, table: str) -> None:
        with self._lock:
            victim = next((k for k, r in self._resident.items() if r.pins == 0 and r.ref.table == table), None)
            if victim is None:
                raise SlabFull(f"every {table} slot is in use by a running request")
            ref = self._resident.pop(victim).ref
        self.slab.release(ref)


__all__ = ["AdapterRegistry", "AdapterVersion", "AdapterNotFound", "AdapterError", "SlabFull"]
