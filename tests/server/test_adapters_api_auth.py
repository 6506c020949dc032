"""API keys -> tenants: parsing, hashes only, constant-time lookup, the auth-off warning, 401 shape."""

from __future__ import annotations

import logging

import pytest
from fastapi import APIRouter, Depends, FastAPI
from fastapi.testclient import TestClient

from scaleserve.server import auth
from scaleserve.server.settings import Settings


def test_parse_keys_and_hashes_only(tmp_path):
    f = tmp_path / "keys"
    f.write_text("# comment\n\nsk-a==pad=alice\n  sk-b = bob \nsk-root=admin\n")
    s = Settings(api_keys="sk-env=carol,sk-env2=carol", api_keys_file=f)
    table = auth.KeyTable.from_settings(s)
    assert len(table) == 5 and table.tenants() == {"alice", "bob", "carol", "admin"}
    assert table.lookup("sk-a==pad") == auth.Tenant("alice", False)  # keys may contain '='
    assert table.lookup("sk-b") == auth.Tenant("bob", False)
    assert table.lookup("sk-root") == auth.Tenant("admin", True)
    assert table.lookup("sk-env2").name == "carol"
    assert table.lookup("sk-a") is None and table.lookup("") is None
    dump = repr(vars(table))
    assert "sk-a" not in dump and "sk-root" not in dump  # only hashes are kept
    for bad in ("novalue", "=tenant", "key=", "key=bad/tenant"):
        with pytest.raises(ValueError):
            auth.parse_keys(bad)


def _app(settings):
    app = FastAPI()
    router = APIRouter(route_class=auth.OpenAIErrorRoute)

    @router.get("/whoami")
    async def whoami(tenant: auth.Tenant = Depends(auth.get_tenant)):
        return {"tenant": tenant.name, "admin": tenant.is_admin}

    app.include_router(router)
    app.state.settings = settings
    return app


def test_auth_off_warns_and_everyone_is_default(caplog):
    app = _app(Settings())
    with caplog.at_level(logging.WARNING, logger="scaleserve.auth"):
        table = auth.configure(app, app.state.settings)
    assert not table.enabled
    assert any("AUTHENTICATION IS OFF" in r.getMessage() for r in caplog.records)
    with TestClient(app) as c:
        assert c.get("/whoami").json() == {"tenant": "default", "admin": True}
        assert c.get("/whoami", headers={"Authorization": "Bearer anything"}).json()["tenant"] == "default"


def test_keys_on_401_shape_and_lazy_configure(caplog):
    app = _app(Settings(api_keys="k1=alice,k2=admin"))  # configure() not called: the first request does it
    with TestClient(app) as c:
        assert c.get("/whoami", headers={"Authorization": "Bearer k1"}).json() == {"tenant": "alice",
                                                                                  "admin": False}
        assert c.get("/whoami", headers={"Authorization": "bearer k2"}).json()["admin"] is True
        for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k1"}, {"Authorization": "Bearer "}):
            r = c.get("/whoami", headers=h)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
            err = r.json()["error"]
            assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"
            assert "API key" in err["message"]
    assert not any("AUTHENTICATION IS OFF" in r.getMessage() for r in caplog.records)
