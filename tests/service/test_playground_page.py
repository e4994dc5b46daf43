"""GET /playground and its assets: open like /docs, behind the same middleware, off with
FLOW_PLAYGROUND=false. (The page itself is driven in a browser by tests/test_playground.py.)"""

from __future__ import annotations

from pathlib import Path

from conftest import serving

from service.tableau import SOLVER_NAMES


def test_the_page_and_its_assets_are_open_and_the_api_is_not(tiny_models_dir: Path) -> None:
    with serving(tiny_models_dir, api_key="k1") as client:
        page = client.get("/playground")
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert f'content="{",".join(SOLVER_NAMES)}"' in page.text
        assert '<meta name="flowserve-auth" content="bearer">' in page.text
        script = client.get("/playground/playground.js")
        assert script.status_code == 200
        assert script.headers["content-type"] == "text/javascript; charset=utf-8"
        assert client.get("/playground/playground.css").status_code == 200
        # Only those three paths are open: anything else under the prefix is behind the key.
        assert client.get("/playground/other.js").status_code == 401
        body = {"model": "tiny", "t": 0.5, "x": [[1.0, 2.0]]}
        assert client.post("/velocity", json=body).status_code == 401
        keyed = client.post("/velocity", json=body, headers={"Authorization": "Bearer k1"})
        assert keyed.json()["velocity"] == [[0.5, 1.0]]


def test_without_a_key_the_page_calls_at_once(tiny_models_dir: Path) -> None:
    with serving(tiny_models_dir) as client:
        assert '<meta name="flowserve-auth" content="none">' in client.get("/playground").text


def test_the_playground_can_be_turned_off(tiny_models_dir: Path) -> None:
    with serving(tiny_models_dir, playground=False) as client:
        assert client.get("/playground").status_code == 404
        assert client.get("/playground/playground.js").status_code == 404
