"""Sample signatures computed beside the build, so the export does not compute them last.

The export's near-duplicate pass needs every accepted sample's MinHash: one SHA-1 per 5-gram
shingle, ~1.6-2.4 ms a sample, so 2-2.5 s per 1,000 samples at the end of the run, after the
last LLM call, where nothing else overlaps it. While calls are in flight the build's event
loop is its bottleneck and the machine's other core mostly waits. So each sample, once it is
stored, goes to one worker process (niced: it yields to the event loop whenever both want a
core), which returns its (text_sha1, signature); the loop stores that as a SampleSignature
row through the store's batched writer, and the export reads it (tasks.export).

A cache, never a source of truth: a signature the worker did not deliver (the build stopped,
the worker died) is computed by the export, and one stored for another text is ignored, so
the verdicts are the same with or without it. A worker failure never fails the build.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
from types import TracebackType

from storage.models import SampleSignature, new_row
from storage.store import Store
from tasks.near_duplicates import text_signature

log = logging.getLogger(__name__)

# The worker's niceness: below the build's own processes, so that its hashing takes only the
# CPU they leave.
WORKER_NICE = 10


def _start_worker() -> None:
    """The worker's initializer: lower its priority and import what it hashes with now
    (numpy, datasketch), not under the first sample."""
    try:
        os.nice(WORKER_NICE)
    except OSError:  # a platform without nice(): it runs at the build's priority
        pass
    text_signature("")


class SignatureWorker:
    """One process computing stored samples' signatures while the build goes on. `submit`
    never blocks the loop beyond handing over the text; leaving the context awaits what is in
    flight (normally done: a sample's hashing is far shorter than the calls that write it)
    and stops the process."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self.failed = False
        self.stored = 0

    async def __aenter__(self) -> SignatureWorker:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose(wait=exc_type is None)

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        # Started with the first sample, not with the build: at start-up both cores are
        # busy (imports, Prefect's API server booting). "spawn": the build's process holds
        # threads (Prefect's, the loop's executor), which a fork would copy mid-lock.
        if self._pool is None:
            self._pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_worker,
            )
        return self._pool

    def submit(self, instruction_id: int, text: str) -> None:
        """Compute and store the signature of the sample `instruction_id` (its `text`)."""
        if self.failed:
            return
        task = asyncio.get_running_loop().create_task(self._sign(instruction_id, text))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _sign(self, instruction_id: int, text: str) -> None:
        loop = asyncio.get_running_loop()
        # The store write inside the try too: a task's exception that nothing awaits (this
        # task is awaited only at close, if still pending) would surface as no more than
        # asyncio's "never retrieved" line at collection.
        try:
            digest, data = await loop.run_in_executor(self._executor(), text_signature, text)
            row = new_row(
                SampleSignature, instruction_id=instruction_id, text_sha1=digest, hashvalues=data
            )
            await self.store.asave(row)
        except Exception as exc:  # noqa: BLE001 - a cache: the export computes what is missing
            if not self.failed:
                log.warning("sample signatures: worker failed (%s); the export computes them", exc)
            self.failed = True
            return
        self.stored += 1

    async def aclose(self, wait: bool = True) -> None:
        """Await (or, when the build failed, cancel) the signatures in flight; stop the
        process."""
        if self._pending:
            if not wait:
                for task in self._pending:
                    task.cancel()
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: pool.shutdown(wait=True, cancel_futures=not wait)
            )
