"""The one decode engine: a KV cache plus, for each of its S rows, a record of what
that row has chosen so far; and the three programs that fill and advance them.

    start   prefill P prompts once each, fan each out to G rows, choose their first
            tokens -> a fresh state of P*G rows (GRPO's lockstep batch)
    insert  the same for R prompts, scattered into chosen rows of a running state
            (continuous batching: a row that finished takes the next prompt)
    decode  decode the active rows until `need` of them have finished, or all have

The drivers in `sampler.py` are a loop over these: lockstep (start, one decode until
every row is done) for rollouts, refill (insert whenever enough rows are free) for
evaluation. The programs are built per (model, sampling, cache length, group, mesh)
with explicit shardings: weights and adapters by their logical axes, the cache and
every per-row array over data x fsdp, so both drivers run on any mesh, several hosts
included. A one-device mesh traces the plain single-device program.

Randomness is per row: the row of prompt id p and sample g draws its t-th token with
fold_in(fold_in(key, p*G + g), t), so a row's tokens depend only on the key, its id
and its own logits, never on the rows beside it or on which slot it occupies: the
lockstep batch, G separate prefills and the refill stream give the same samples.

Each row is addressed in the cache by its own position (`kv_cache`), so rows of
different prompts and lengths decode side by side; a fresh row's stale slots are
masked until written (`kernels.reference.cache_mask`).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from grpo_jax import sampling as sampling_lib, sharding, stop_strings as stop_strings_lib
from grpo_jax.config import SamplerConfig
from grpo_jax.model import gemma3, kv_cache, lora as lora_lib
from grpo_jax.model.config import ModelConfig
from grpo_jax.tokenizer import PAD_ID


class SampleOutput(NamedTuple):
    tokens: jax.Array             # [B, N] int32, PAD after a row's stop token
    logprobs: jax.Array           # [B, N] float32 log-softmax at temperature 1 (full vocab); 0 after stop
    sampling_logprobs: jax.Array  # [B, N] log-prob under the distribution sampled from
                                  # (temperature, top-k, top-p applied); 0 when greedy
    lengths: jax.Array            # [B] int32 completion length, stop token included
    stopped: jax.Array            # [B] bool: ended on a stop token or string (False: hit the budget)
    steps: jax.Array              # [] int32 decode steps run (the loop exits once all rows stop)
    # With a tool (None without): [B, N] bool, True where the policy chose the token
    # (False: a tool wrote it, or past the row's length), and [B] int32 calls answered.
    policy_mask: jax.Array | None = None
    tool_calls: jax.Array | None = None


class Record(NamedTuple):
    """What each row has chosen so far ([S, N], N = max_new_tokens, or [S])."""
    tokens: jax.Array             # [S, N] int32, PAD past the row's length
    logprobs: jax.Array           # [S, N] float32, temperature-1 log-probs
    sampling_logprobs: jax.Array  # [S, N] float32, log-probs under the sampling transform
    lengths: jax.Array            # [S] int32: tokens chosen, the next one's column
    done: jax.Array               # [S] bool: stopped on a stop token or string
    stop_state: jax.Array         # [S] int32: each row's stop-string automaton state


class ToolRows(NamedTuple):
    """Each row's side of the tool protocol (`tools.py`), when the sampler has a tool."""
    policy: jax.Array      # [S, N] bool: the policy chose the column's token
    queue: jax.Array       # [S, Q] int32: a tool result's tokens, written from queue_at
    queue_at: jax.Array    # [S] int32
    queue_len: jax.Array   # [S] int32
    call_state: jax.Array  # [S] int32: the call automaton's state
    pending: jax.Array     # [S] bool: completed a call, waits for the host's result
    calls: jax.Array       # [S] int32: calls answered


class Rows(NamedTuple):
    """The per-row half of a decode state (the cache is the other)."""
    rec: Record
    last: jax.Array  # [S] int32: the token to feed next
    keys: jax.Array  # [S] the row's key: fold_in(key, row id)
    tool: ToolRows | None = None

    def finished(self) -> jax.Array:
        """[S] bool: stopped, or reached the token budget."""
        return self.rec.done | (self.rec.lengths >= self.rec.tokens.shape[1])

    def waiting(self) -> jax.Array:
        """[S] bool: unfinished rows that wait for a tool's result."""
        if self.tool is None:
            return jnp.zeros(self.last.shape, bool)
        return self.tool.pending & ~self.finished()

    def output(self, steps) -> SampleOutput:
        rec, tool = self.rec, self.tool
        return SampleOutput(rec.tokens, rec.logprobs, rec.sampling_logprobs, rec.lengths,
                            rec.done, steps, None if tool is None else tool.policy,
                            None if tool is None else tool.calls)


def empty_record(batch: int, steps: int) -> Record:
    return Record(jnp.full((batch, steps), PAD_ID, jnp.int32),
                  jnp.zeros((batch, steps), jnp.float32), jnp.zeros((batch, steps), jnp.float32),
                  jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), bool),
                  jnp.zeros((batch,), jnp.int32))


def empty_tool_rows(batch: int, steps: int, queue: int) -> ToolRows:
    zeros = jnp.zeros((batch,), jnp.int32)
    return ToolRows(jnp.zeros((batch, steps), bool), jnp.full((batch, queue), PAD_ID, jnp.int32),
                    zeros, zeros, zeros, jnp.zeros((batch,), bool), zeros)


def empty_rows(sampling: SamplerConfig, keys: jax.Array) -> Rows:
    batch, steps = keys.shape[0], sampling.max_new_tokens
    return Rows(empty_record(batch, steps), jnp.full((batch,), PAD_ID, jnp.int32), keys,
                empty_tool_rows(batch, steps, sampling.tool_result_tokens)
                if sampling.tools else None)


def record_choice(rec: Record, logits: jax.Array, keys: jax.Array, live: jax.Array,
                  sampling: SamplerConfig, stop_table: jax.Array | None,
                  forced: jax.Array | None = None) -> tuple[Record, jax.Array]:
    """Each `live` row chooses its next token from `logits` [V, S] with the key
    fold_in(its key, its length) and writes it at its own column; the other rows get
    PAD and keep their record. A row is done after a stop token, or a token that
    completes a stop string. forced [S]: a token to write instead (>= 0; its
    log-probs are recorded as 0), for tool results."""
    steps = rec.tokens.shape[1]
    step_keys = jax.vmap(jax.random.fold_in)(keys, rec.lengths)
    token, lp, slp = sampling_lib.choose_tokens(logits, step_keys, sampling)
    if forced is not None:
        token = jnp.where(forced >= 0, forced, token)
        lp, slp = (jnp.where(forced >= 0, 0.0, x) for x in (lp, slp))
    token = jnp.where(live, token, PAD_ID)
    stops = jnp.isin(token, jnp.asarray(sampling.stop_ids, jnp.int32))
    stop_state = rec.stop_state
    if stop_table is not None:
        new_state, matched = stop_strings_lib.advance(stop_table, stop_state, token)
        stop_state = jnp.where(live, new_state, stop_state)
        stops = stops | matched
    # Rows that are not live write to an out-of-range column, which the scatter drops.
    row = jnp.arange(token.shape[0])
    column = jnp.where(live, rec.lengths, steps)
    rec = Record(rec.tokens.at[row, column].set(token, mode="drop"),
                 rec.logprobs.at[row, column].set(lp, mode="drop"),
                 rec.sampling_logprobs.at[row, column].set(slp, mode="drop"),
                 rec.lengths + live.astype(jnp.int32), rec.done | (live & stops), stop_state)
    return rec, token


def choose(rows: Rows, logits: jax.Array, live: jax.Array, sampling: SamplerConfig,
           stop_table: jax.Array | None, call_table: jax.Array | None = None) -> Rows:
    """Each live row chooses its next token from `logits` [V, S] and writes it down;
    with a tool, a row with a result queued writes its next token instead, and a row
    whose chosen token completes a call (within the call bound) starts waiting."""
    tool = rows.tool
    if tool is None:
        rec, token = record_choice(rows.rec, logits, rows.keys, live, sampling, stop_table)
        return rows._replace(rec=rec, last=jnp.where(live, token, rows.last))
    live = live & ~tool.pending
    forcing = tool.queue_at < tool.queue_len
    queued = jnp.take_along_axis(
        tool.queue, jnp.minimum(tool.queue_at, tool.queue.shape[1] - 1)[:, None], axis=1)[:, 0]
    rec, token = record_choice(rows.rec, logits, rows.keys, live, sampling, stop_table,
                               jnp.where(forcing, queued, -1))
    sampled = live & ~forcing
    row = jnp.arange(token.shape[0])
    column = jnp.where(live, rows.rec.lengths, rec.tokens.shape[1])
    state, called = stop_strings_lib.advance(call_table, tool.call_state, token)
    tool = tool._replace(
        policy=tool.policy.at[row, column].set(sampled, mode="drop"),
        queue_at=tool.queue_at + (live & forcing).astype(jnp.int32),
        call_state=jnp.where(sampled, state, tool.call_state),
        pending=tool.pending | (sampled & called & (tool.calls < sampling.max_tool_calls)))
    return rows._replace(rec=rec, last=jnp.where(live, token, rows.last), tool=tool)


def feed(rows: Rows, chosen: jax.Array, queue: jax.Array, queue_len: jax.Array) -> Rows:
    """Hand tool results to rows `chosen` [S] bool: their queues [S, Q] of
    queue_len [S] tokens; they stop waiting and write them next. Rows donated."""
    tool = rows.tool
    pick = functools.partial(jnp.where, chosen)
    return rows._replace(tool=tool._replace(
        queue=jnp.where(chosen[:, None], queue, tool.queue),
        queue_at=pick(0, tool.queue_at), queue_len=pick(queue_len, tool.queue_len),
        pending=pick(False, tool.pending), calls=tool.calls + chosen.astype(jnp.int32)))


# ---------------------------------------------------------------------------
# The three programs' bodies


def _start(params, lora, prompt_tokens, prompt_mask, prompt_ids, key, stop_table,
           call_table=None, *, cfg: ModelConfig, sampling: SamplerConfig, cache_len: int,
           group: int) -> tuple[kv_cache.KVCache, Rows]:
    """Prefill prompts [P, L] once each, fan cache and logits out to `group` rows per
    prompt (prompt-major), choose each row's first token. Row g of prompt p is keyed
    by fold_in(key, prompt_ids[p] * group + g)."""
    hidden, cache = kv_cache.prefill(params, prompt_tokens, prompt_mask, cfg, cache_len, lora)
    logits = sampling_lib.vocab_major_logits(params, hidden, cfg)
    row_ids = (prompt_ids[:, None] * group + jnp.arange(group)).reshape(-1)
    if group > 1:
        cache = kv_cache.repeat_rows(cache, group)
        logits = jnp.repeat(logits, group, axis=1)
    rows = empty_rows(sampling, sampling_lib.row_keys(key, row_ids))
    rows = choose(rows, logits, jnp.ones(row_ids.shape, bool), sampling, stop_table,
                  call_table)
    return cache, rows


def _insert(params, lora, cache, rows, prompt_tokens, prompt_mask, prompt_ids, slot_ids, key,
            stop_table, call_table=None, *, cfg: ModelConfig, sampling: SamplerConfig,
            cache_len: int, group: int) -> tuple[kv_cache.KVCache, Rows]:
    """`_start` for R prompts, written into rows `slot_ids` [R*group] of a running
    state (an id >= S is filler and dropped)."""
    fresh_cache, fresh = _start(params, lora, prompt_tokens, prompt_mask, prompt_ids, key,
                                stop_table, call_table, cfg=cfg, sampling=sampling,
                                cache_len=cache_len, group=group)

    def write(old, new):
        return old.at[slot_ids].set(new.astype(old.dtype), mode="drop")

    return jax.tree.map(write, cache, fresh_cache), jax.tree.map(write, rows, fresh)


def _decode(params, lora, cache, rows: Rows, active, need, stop_table, call_table=None, *,
            cfg: ModelConfig, sampling: SamplerConfig
            ) -> tuple[kv_cache.KVCache, Rows, jax.Array]:
    """Decode the `active` rows until `need` of them have finished (or all have), or
    some row waits for a tool's result. -> cache, rows, decode steps run. The cache
    and rows are donated. A waiting row leaves the loop before its next step, so
    its cache position never moves while it waits."""

    def cond(state):
        _, rows, _ = state
        finished = rows.finished()
        return (jnp.any(active & ~finished) & (jnp.sum(active & finished) < need)
                & ~jnp.any(active & rows.waiting()))

    def body(state):
        cache, rows, steps = state
        hidden, cache = kv_cache.decode_step(params, cache, rows.last, cfg, lora)
        logits = sampling_lib.vocab_major_logits(params, hidden, cfg)
        return (cache, choose(rows, logits, active & ~rows.finished(), sampling, stop_table,
                              call_table), steps + 1)

    return jax.lax.while_loop(cond, body, (cache, rows, jnp.int32(0)))


# ---------------------------------------------------------------------------
# Programs on a mesh


class Programs(NamedTuple):
    start: sharding.ShardedJit   # (params, lora, tokens, mask, prompt_ids, key, table,
                                 #  call_table)
    insert: sharding.ShardedJit  # (params, lora, cache, rows, tokens, mask, prompt_ids,
                                 #  slot_ids, key, table, call_table); cache, rows donated
    decode: sharding.ShardedJit  # (params, lora, cache, rows, active, need, table,
                                 #  call_table); cache and rows donated
    feed: sharding.ShardedJit    # (rows, chosen, queue, queue_len); rows donated (tools)


def place_weights(params, lora, cfg: ModelConfig, plan: sharding.MeshPlan):
    """Weights and adapters laid out as the programs take them. Arrays placed otherwise
    (a loaded model's single-device arrays, even on a one-device mesh) would be copied
    into that layout by every program call: ~0.4 s a call for the 270M, paid once per
    decode segment (tool calls, refills) instead of once here."""
    source = params
    params = sharding.put_tree(params, gemma3.param_shardings(plan, cfg))
    if cfg.cpu_kernels == "amx":
        params = _packed_for_amx(source, params)
    if lora is not None:
        lora = sharding.put_tree(lora, lora_lib.lora_shardings(plan, cfg, lora))
    return params, lora


# The last weights packed for the AMX decode matmul: (ids of the caller's leaves, those
# leaves, the packed params). The leaves are held so that their ids stay theirs.
_last_packed: list = []
_pack = jax.jit(gemma3.pack_projections)


def _packed_for_amx(source, params):
    """`params` with the projections packed for AMX tiles (`gemma3.pack_projections`),
    packed once for as long as the caller passes the same weights (a run's frozen base
    model): packing the 270M's projections takes ~0.5 s, a sampling call's whole
    decode loop at 16 rows ~7 s. The programs' shardings, one per unpacked weight,
    are a prefix of the packed tree; the kernel runs on one device only."""
    leaves = jax.tree.leaves(source)
    key = tuple(map(id, leaves))
    if not _last_packed or _last_packed[0] != key:
        _last_packed[:] = [key, leaves, _pack(params)]
    return _last_packed[2]


def rows_shardings(plan: sharding.MeshPlan, tools: bool = False) -> Rows:
    """Every per-row array over data x fsdp (a prefix sharding for the [S, N] ones)."""
    return Rows(Record(*[plan.rows] * 6), plan.rows, plan.rows,
                ToolRows(*[plan.rows] * 7) if tools else None)


@functools.lru_cache(maxsize=32)
def programs(cfg: ModelConfig, sampling: SamplerConfig, cache_len: int, group: int,
             plan: sharding.MeshPlan) -> Programs:
    """The engine's programs for one static setup, with explicit in/out shardings
    (cached: equal setups share compiled programs)."""
    static = dict(cfg=cfg, sampling=sampling)
    params_sh = gemma3.param_shardings(plan, cfg)
    cache_sh = kv_cache.cache_shardings(plan, cfg)
    rows_sh, rows, rep = rows_shardings(plan, bool(sampling.tools)), plan.rows, plan.replicated

    def common(lora, stop_table, call_table):
        return (params_sh, lora_lib.lora_shardings(plan, cfg, lora),
                None if stop_table is None else rep, None if call_table is None else rep)

    def start_shardings(params, lora, tokens, mask, ids, key, stop_table, call_table):
        p_sh, l_sh, t_sh, c_sh = common(lora, stop_table, call_table)
        return (p_sh, l_sh, rows, rows, rows, rep, t_sh, c_sh), (cache_sh, rows_sh)

    def insert_shardings(params, lora, cache, state, tokens, mask, ids, slots, key,
                         stop_table, call_table):
        p_sh, l_sh, t_sh, c_sh = common(lora, stop_table, call_table)
        return ((p_sh, l_sh, cache_sh, rows_sh, rows, rows, rows, rows, rep, t_sh, c_sh),
                (cache_sh, rows_sh))

    def decode_shardings(params, lora, cache, state, active, need, stop_table,
                         call_table):
        p_sh, l_sh, t_sh, c_sh = common(lora, stop_table, call_table)
        return ((p_sh, l_sh, cache_sh, rows_sh, rows, rep, t_sh, c_sh),
                (cache_sh, rows_sh, rep))

    def feed_shardings(state, chosen, queue, queue_len):
        return (rows_sh, rows, rows, rows), rows_sh

    return Programs(
        sharding.sharded_jit(plan, functools.partial(
            _start, **static, cache_len=cache_len, group=group), start_shardings),
        sharding.sharded_jit(plan, functools.partial(
            _insert, **static, cache_len=cache_len, group=group), insert_shardings,
            donate_argnums=(2, 3)),
        sharding.sharded_jit(plan, functools.partial(_decode, **static), decode_shardings,
                             donate_argnums=(2, 3)),
        sharding.sharded_jit(plan, feed, feed_shardings, donate_argnums=(0,)))
