"""tasks.runtime: chain slots stop admitting new chains once one failed on the endpoint."""

import asyncio

import pytest

from storage.store import Store
from tasks.llm.client import Endpoint, EndpointDownError, LLMClient
from tasks.runtime import BuildRuntime, StageConfig, in_chain_slot


async def test_no_chain_starts_after_one_failed_on_the_endpoint(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'rt.db'}")
    started: list[str] = []

    async def chain(name: str, fail: bool = False) -> bool:
        started.append(name)
        if fail:
            raise EndpointDownError("write call failed after 4 attempts")
        return True

    async with LLMClient([Endpoint("http://unused.test/v1")], "m") as client:
        rt = BuildRuntime(store, client, StageConfig(), chain_slots=asyncio.Semaphore(1))
        assert await in_chain_slot(rt, chain("first")) is True
        with pytest.raises(EndpointDownError):
            await in_chain_slot(rt, chain("failing", fail=True))
        assert rt.halted
        # The slot is free again, but the build is stopping: the chain never runs.
        assert await in_chain_slot(rt, chain("late")) is None
    assert started == ["first", "failing"]
    store.close()
