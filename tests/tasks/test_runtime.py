"""tasks.runtime: chain slots, the one stage driver and the one runtime registry."""

import asyncio
from dataclasses import dataclass

import pytest

from storage.store import Store
from tasks.llm.client import Endpoint, EndpointDownError, LLMClient
from tasks.runtime import (
    BuildRuntime,
    Stage,
    StageConfig,
    get_runtime,
    in_chain,
    in_chain_slot,
    register,
    unregister,
)


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


async def test_stage_runs_only_what_is_left_and_counts_what_it_says(tmp_path):
    """The one batch driver: `todo` decides what of a batch is still to do, every item runs
    concurrently, the batch returns how many outcomes `counts`; in_chain counts a rejected
    chain as done."""
    store = Store(f"sqlite:///{tmp_path / 'stage.db'}")
    async with LLMClient([Endpoint("http://unused.test/v1")], "m") as client:
        rt = BuildRuntime(store, client, StageConfig(), chain_slots=asyncio.Semaphore(2))
        seen: list[int] = []
        running = 0
        peak = 0

        async def work(_rt: BuildRuntime, item: int) -> bool:
            nonlocal running, peak
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1
            seen.append(item)
            return item % 2 == 0  # odd items end rejected

        stage = Stage(
            "probe", BuildRuntime, lambda _rt, ids: [i for i in ids if i != 3], in_chain(work)
        )
        register(rt)
        try:
            accepted = await stage.run_batch(rt.id, [1, 2, 3, 4, 5, 6])
        finally:
            unregister(rt.id)
        assert sorted(seen) == [1, 2, 4, 5, 6]  # 3 was not left to do
        assert accepted == 3  # 2, 4, 6
        assert peak == 2  # under the chain slots, not all at once
        assert (rt.progress.rejected, rt.progress.instructions_done) == (2, 2)
        with pytest.raises(RuntimeError, match="not registered"):
            await stage.run_batch(rt.id, [1])
    store.close()


def test_one_registry_checks_the_kind_of_runtime():
    @dataclass
    class OtherRuntime:
        id: str = "other-1"

    other = OtherRuntime()
    register(other)
    try:
        assert get_runtime("other-1", OtherRuntime) is other
        with pytest.raises(TypeError, match="OtherRuntime, not a BuildRuntime"):
            get_runtime("other-1", BuildRuntime)
    finally:
        unregister("other-1")
    with pytest.raises(RuntimeError):
        get_runtime("other-1", OtherRuntime)
