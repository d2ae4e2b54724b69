"""Prefix affinity: a job goes to the engine that holds the most of its prompt in its KV cache.

Each engine (a worker, with its front-end processes) that caches prefixes has its own stream of a
model, `jobs:{model}:at:<engine>` (common/keys.py), beside the shared `jobs:{model}`. The gateway
hashes the prompt into chained blocks (common/prefix_blocks.py) and the enqueue script
(common/request_store.py) picks the stream, atomically with admission, by `ROUTE_LUA`:

- hit(e): the prompt's leading blocks found in `prefix:{model}:<e>`, a sorted set of the block hashes
  the engine holds, scored by when it last used each (its worker records every prompt it starts and
  trims the set to the engine's KV capacity, least recently used first, as the engine's cache evicts).
  A block older than `fresh_s` counts as gone.
- An engine whose own stream already holds `queue_batches` x its max_num_seqs unread jobs takes no more
  (overflow waits in the shared stream, where KEDA sees it and any worker may take it).
- score(e) = hit(e) - load_weight x prompt_tokens x (running + queued) / max_num_seqs: a hot prefix
  spreads over the engines that hold it rather than piling on one.
- The best engine gets the job only when its hit beats the smallest hit among the live engines by a
  block or more; otherwise affinity buys nothing (a shared system prompt that every engine holds, a
  new conversation) and the job goes to the shared stream, whichever worker has room first.

A routed job never waits on a busy engine while another has room: any worker that finds its own and
the shared stream empty takes entries of other engines' streams that waited `affinity_wait_ms`
(worker/job_reader.py), and so drains the stream of an engine that died. Each routed job also wakes one
idle worker, if there is one (`keys.idle_nudges`), to do so should it wait that long: the engine's load
the gateway sees is up to a heartbeat old, so "busy" cannot be told at routing time. Only live engines
serving the model are candidates (the gateway's view of heartbeats, at most a second old).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

from common import keys
from common.prefix_blocks import block_hashes

# Lua's unpack() of ZMSCORE's arguments stays far below its stack limit; longer prompts are routed on
# their first blocks, which is where prompts that share anything agree.
MAX_ROUTED_BLOCKS = 2048


@dataclass(frozen=True, slots=True)
class EngineLoad:
    """A live engine serving the model, as its heartbeats say (summed over its front-end processes)."""

    engine: str
    running: int
    max_seqs: int


@dataclass(frozen=True, slots=True)
class AffinityPolicy:
    load_weight: float = 0.5
    queue_batches: float = 1.0
    fresh_s: float = 600.0


def route_arg(model: str, prompt_token_ids: Sequence[int], block_size: int, engines: Sequence[EngineLoad],
              policy: AffinityPolicy) -> bytes | None:
    """The enqueue script's routing argument; None where there is nothing to choose between."""
    if block_size <= 0 or len(engines) < 2 or len(prompt_token_ids) < block_size:
        return None
    blocks = block_hashes(prompt_token_ids[: MAX_ROUTED_BLOCKS * block_size], block_size)
    return msgpack.packb({
        "engines": [[keys.entry_ref(keys.job_stream(model, e.engine), ""), keys.job_stream(model, e.engine),
                     keys.prefix_blocks(model, e.engine), e.running, max(1, e.max_seqs)] for e in engines],
        "blocks": [str(b) for b in blocks], "block_size": block_size, "fresh_after": time.time() - policy.fresh_s,
        "load_weight": policy.load_weight, "queue_batches": policy.queue_batches, "group": keys.CONSUMER_GROUP,
        "prompt_tokens": len(prompt_token_ids)})


# route(packed): the chosen engine's row {its entries' ref suffix (keys.entry_ref), stream, prefix key,
# running, max_seqs}, or nil for the shared stream. Runs inside the enqueue script (needs no keys of its own:
# all share the model's tag).
ROUTE_LUA = """
local function route(packed)
  local r = cmsgpack.unpack(packed)
  local best, best_score, best_hit, least_hit
  for _, e in ipairs(r.engines) do
    local hit = 0
    if #r.blocks > 0 then
      local scores = redis.call('ZMSCORE', e[3], unpack(r.blocks))
      while hit < #scores and scores[hit + 1] and tonumber(scores[hit + 1]) >= r.fresh_after do hit = hit + 1 end
    end
    hit = hit * r.block_size
    if least_hit == nil or hit < least_hit then least_hit = hit end
    local queued = redis.call('XLEN', e[2])  -- less what workers read (running, or taken by another engine)
    if queued > 0 then
      local pending = redis.pcall('XPENDING', e[2], r.group)
      if type(pending) == 'table' and pending[1] then queued = queued - pending[1] end
    end
    if queued < e[5] * r.queue_batches then
      local score = hit - r.load_weight * r.prompt_tokens * (e[4] + queued) / e[5]
      if best == nil or score > best_score then best, best_score, best_hit = e, score, hit end
    end
  end
  if best ~= nil and best_hit - least_hit >= r.block_size then return best end
  return nil
end
"""
