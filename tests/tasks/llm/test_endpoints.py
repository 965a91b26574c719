import pytest

from tasks.llm.client import Endpoint
from tasks.llm.endpoints import (
    EMBEDDED_SAMPLING,
    ConfigError,
    ResolvedEndpoints,
    api_key_from_env,
    open_endpoints,
    sampling_extras,
    split_urls,
)


def resolved(embedded: bool) -> ResolvedEndpoints:
    return ResolvedEndpoints([Endpoint("http://127.0.0.1:1/v1")], "m", embedded, 8192)


def test_sampling_extras_defaults_only_for_embedded_model():
    assert sampling_extras(resolved(True), None, None) == EMBEDDED_SAMPLING
    assert sampling_extras(resolved(False), None, None) == {}
    assert sampling_extras(resolved(True), 0.1, None)["frequency_penalty"] == 0.1
    assert sampling_extras(resolved(False), None, 0.2) == {"presence_penalty": 0.2}


def test_json_style_follows_endpoint_kind():
    assert resolved(True).json_style == "llama_cpp"
    assert resolved(False).json_style == "json_schema"


def test_split_urls_and_key_from_env(monkeypatch):
    assert split_urls(["http://a/v1,http://b/v1", " http://c/v1 "]) == [
        "http://a/v1",
        "http://b/v1",
        "http://c/v1",
    ]
    monkeypatch.delenv("LONGWRITER_API_KEY", raising=False)
    monkeypatch.setenv("MY_KEY", "k1")
    assert api_key_from_env("MY_KEY") == "k1"
    assert api_key_from_env("UNSET_VAR") is None


@pytest.mark.parametrize(
    ("urls", "model", "message"),
    [(["http://127.0.0.1:1/v1"], None, "--model"), (["ftp://x"], "m", "http")],
)
async def test_bad_endpoint_settings_are_config_errors(urls, model, message, monkeypatch):
    monkeypatch.delenv("LONGWRITER_MODEL", raising=False)
    with pytest.raises(ConfigError, match=message):
        async with open_endpoints(urls, model, None, 4):
            pass
