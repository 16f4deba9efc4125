"""The local engine: one worker in this process, the shards in order.

It streams: a shard's rows are read when its turn comes, and only its results are held."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .shards import Shard
from .worker import RunConfig, ShardRunner


def run_local(config: RunConfig, shards: Sequence[Shard], on_receipt: Callable[[dict], None]) -> None:
    """Run `shards` one after another; `on_receipt` commits each as it finishes."""
    runner = ShardRunner(config)
    try:
        for shard in shards:
            on_receipt(runner.run_shard(shard))
    finally:
        runner.close()
