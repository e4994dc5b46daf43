"""Settings: defaults, FLOW_* variables, and the checks that name the setting to fix."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_variables_override_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOW_PORT", "9001")
    monkeypatch.setenv("FLOW_GRAPH_REWRITES", '["freeze"]')
    settings = Settings()
    assert settings.port == 9001
    assert settings.graph_rewrites == ("freeze",)
    assert settings.host == "127.0.0.1"


def test_several_api_keys() -> None:
    assert Settings(api_key=" one, two ,").api_keys() == [b"one", b"two"]
    assert Settings().api_keys() == []


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"api_key": " , "}, "api_key: FLOW_API_KEY is set but holds no key"),
        ({"block_rows": 4096, "max_batch_rows": 1024}, "lower FLOW_BLOCK_ROWS or raise"),
        ({"max_samples": 10, "max_queue_rows": 5}, "could never be admitted"),
        ({"graph_rewrites": ["fold"]}, "graph_rewrites"),
    ],
)
def test_inconsistent_settings_are_refused(values: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)
