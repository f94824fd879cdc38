"""The device half of a training step: teacher-forced log-probs and the LoRA update.

`build_update(model_cfg, grpo_cfg, opt_cfg, total_updates, temperature, objective, plan)`
closes over everything static and returns the jitted programs; `objective` says what is
minimised on the policy's token log-probs of each micro-batch (`GRPOLoss`: the clipped
surrogate + KL; `NLLLoss`: SFT's masked NLL), so the update itself has no branch per
objective. The programs take two pytrees instead of long argument lists:

    Batch       the teacher-forced batch of one step (tokens, masks, advantages,
                reference / old / sampler log-probs), built on the host from a
                rollout by `teacher_forced_batch` and uploaded once
    TrainState  what the optimizer changes (LoRA, optimizer state)

The base params are an argument, never a closed-over constant: they are large and
must not be baked into the compiled program.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from grpo_jax import grpo, sharding
from grpo_jax.config import GRPOConfig, OptimizerConfig
from grpo_jax.model.config import ModelConfig
from grpo_jax.model import gemma3, lora as lora_lib


@flax.struct.dataclass
class Batch:
    """B x G completions behind their prompts, teacher-forced.

    tokens, input_mask [N, prompt_len + T]: the left-padded prompt then the
    right-padded completion; advantages [N] and the log-probs [N, T] are None until
    computed (ref: LoRA off, needed when beta > 0; old: the policy before the first
    of mu > 1 updates; sample: the sampler's own, for the drift metric).
    policy_mask [N, T]: with tool calls, True on the completion tokens the policy
    chose; a tool's tokens are context (in input_mask) but in no loss term.
    """

    tokens: jax.Array
    input_mask: jax.Array
    advantages: jax.Array | None = None
    ref_logprobs: jax.Array | None = None
    old_logprobs: jax.Array | None = None
    sample_logprobs: jax.Array | None = None
    policy_mask: jax.Array | None = None
    prompt_len: int = flax.struct.field(pytree_node=False, default=0)

    @property
    def completion_mask(self) -> jax.Array:
        """[N, T] the tokens every loss term, metric and token count reads: the
        completion's, less a tool's."""
        mask = self.input_mask[:, self.prompt_len:]
        return mask if self.policy_mask is None else mask & self.policy_mask


@flax.struct.dataclass
class PackedBatch:
    """SFT rows of several (prompt, target) sequences packed end to end: tokens,
    positions (restarting with each sequence) and segments (each token's sequence,
    0 for padding) [R, L]; the positions whose next token is a target, those targets
    and their mask [R, K]. Built on the host by `sft.pack_rows`."""

    tokens: jax.Array
    positions: jax.Array
    segments: jax.Array
    index: jax.Array
    targets: jax.Array
    mask: jax.Array

    @property
    def completion_mask(self) -> jax.Array:
        return self.mask


@flax.struct.dataclass
class TrainState:
    lora: Any        # model.lora.LoraWeights
    opt_state: Any   # optax state of `make_optimizer`


def teacher_forced_batch(prompt_tokens: np.ndarray, prompt_mask: np.ndarray,
                         completion_tokens: np.ndarray, lengths: np.ndarray, group: int,
                         sample_logprobs=None, advantages=None, policy_mask=None) -> Batch:
    """A rollout as the trainer reads it, as host (NumPy) arrays: each prompt row
    [B, P] repeated for its `group` completions [B*G, T] (right-padded after
    `lengths` tokens), joined; `policy_mask` [B*G, T] marks the tokens the policy chose
    (with tool calls). `sharding.put_batch` uploads it, once."""
    completion_mask = np.arange(completion_tokens.shape[1])[None, :] < lengths[:, None]
    tokens = np.concatenate([np.repeat(prompt_tokens, group, axis=0), completion_tokens], 1)
    input_mask = np.concatenate([np.repeat(prompt_mask, group, axis=0), completion_mask], 1)
    return Batch(tokens=tokens, input_mask=input_mask,
                 advantages=None if advantages is None else np.asarray(advantages, np.float32),
                 sample_logprobs=None if sample_logprobs is None else np.asarray(sample_logprobs),
                 policy_mask=None if policy_mask is None else np.asarray(policy_mask, bool),
                 prompt_len=prompt_tokens.shape[1])


def make_optimizer(opt: OptimizerConfig, total_updates: int) -> optax.GradientTransformation:
    """AdamW on the LoRA weights: linear warmup, cosine decay to 0 over `total_updates`."""
    warmup = int(opt.warmup_ratio * total_updates)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, opt.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_updates, warmup + 1), end_value=0.0)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    if opt.max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(opt.max_grad_norm), adamw)
    return adamw


def _tree_all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@dataclasses.dataclass(frozen=True)
class StepFunctions:
    """What `build_update` returns.

    logprobs(params, lora, tokens, input_mask, prompt_len) -> [N, T] completion
        log-probs at the sampling temperature (lora=None: the reference policy);
        `batch_logprobs` takes them from a Batch.
    update(params, state, batch) -> (state, metrics): one optimizer update; `state`
        is donated.
    init_state(lora) -> TrainState with a fresh optimizer state.
    """

    logprobs: Callable
    update: Callable
    optimizer: optax.GradientTransformation

    def batch_logprobs(self, params, lora, batch: Batch) -> jax.Array:
        return self.logprobs(params, lora, batch.tokens, batch.input_mask, batch.prompt_len)

    def init_state(self, lora) -> TrainState:
        return TrainState(lora=lora, opt_state=self.optimizer.init(lora))


# ---------------------------------------------------------------------------
# Losses: what an update minimises on one micro-batch's token log-probs. Frozen
# dataclasses (hashable by value), so equal configurations share compiled programs.


@dataclasses.dataclass(frozen=True)
class GRPOLoss:
    """The clipped GRPO-family surrogate + beta KL of `grpo` on the batch's advantages
    and old / reference log-probs. Rows come in groups of one prompt, so the
    log-prob pass may pack each group's shared prompt (`grpo.packing_group`)."""

    grpo: GRPOConfig
    shares_prompt = True

    @property
    def token_mean(self) -> bool:
        return self.grpo.aggregation == "token-mean"

    def __call__(self, logp: jax.Array, part: Batch):
        g = self.grpo
        return grpo.policy_loss(
            logp, part.old_logprobs, part.ref_logprobs, part.advantages, part.completion_mask,
            epsilon_low=g.epsilon_low, epsilon_high=g.epsilon_high, beta=g.beta,
            kl_estimator=g.kl_estimator, aggregation=g.aggregation, ratio_level=g.ratio_level)


@dataclasses.dataclass(frozen=True)
class NLLLoss:
    """SFT: the masked NLL of the completion tokens (`grpo.masked_nll`). Rows are
    different problems: no shared prompt to pack."""

    shares_prompt = False
    token_mean = True

    def __call__(self, logp: jax.Array, part: Batch):
        return grpo.masked_nll(logp, part.completion_mask)


def micro_batches(batch: Batch, micro: int, unit: int) -> Batch:
    """[N, ...] rows -> [N / micro, micro, ...] for the scan over micro-batches.

    Rows move in units of `unit` (a packed group of completions stays together), and
    micro-batch c takes units c, c + chunks, c + 2 chunks, ...: the scanned axis is
    the minor factor of the units, so the rows' sharding over data x fsdp (the major
    factor) stays on the rows of each micro-batch instead of landing on the loop.
    Micro-batches add up to the batch in any order, so this is the same update.
    """
    n = batch.tokens.shape[0]
    chunks = n // micro

    def split(x):
        x = x.reshape(micro // unit, chunks, unit, *x.shape[1:]).swapaxes(0, 1)
        return x.reshape(chunks, micro, *x.shape[3:])

    return jax.tree.map(split, batch)


def state_shardings(plan: sharding.MeshPlan, model_cfg: ModelConfig,
                     optimizer: optax.GradientTransformation, lora) -> TrainState:
    lora_sh = lora_lib.lora_shardings(plan, model_cfg, lora)
    return TrainState(lora_sh, sharding.opt_state_shardings(plan, optimizer, lora, lora_sh))


@functools.lru_cache(maxsize=32)
def build_update(model_cfg: ModelConfig, grpo_cfg: GRPOConfig, opt_cfg: OptimizerConfig,
                 total_updates: int, temperature: float = 1.0, objective: Any = None,
                 plan: sharding.MeshPlan | None = None) -> StepFunctions:
    """The jitted log-prob pass and update for one static configuration (cached, so
    equal configurations share compiled programs).

    objective: the loss the update minimises (`GRPOLoss(grpo_cfg)` by default; `NLLLoss()` for
    SFT, where only grpo_cfg's micro_batch and logprob_chunk apply).

    plan: the device mesh (default: one device, `sharding.local_plan`). The programs
    take and give arrays laid out by `sharding.LOGICAL_RULES` (explicit in/out
    shardings: weights and adapters by their logical axes, batch rows over data x
    fsdp, metrics replicated) and trace under the mesh.
    """
    plan = plan or sharding.local_plan()
    objective = GRPOLoss(grpo_cfg) if objective is None else objective
    if not callable(objective) or not hasattr(objective, "token_mean"):
        raise ValueError(f"objective must be a loss object (GRPOLoss, NLLLoss), got "
                         f"{objective!r}")
    optimizer = make_optimizer(opt_cfg, total_updates)

    def part_logprobs(params, lora, part):
        if isinstance(part, PackedBatch):
            return grpo.packed_logprobs(params, lora, part.tokens, part.positions,
                                        part.segments, part.index, part.targets, model_cfg,
                                        chunk_size=grpo_cfg.logprob_chunk,
                                        temperature=temperature)
        return token_logprobs(params, lora, part.tokens, part.input_mask, part.prompt_len)

    def token_logprobs(params, lora, tokens, input_mask, prompt_len):
        return grpo.per_token_logprobs(params, lora, tokens, input_mask, prompt_len, model_cfg,
                                       chunk_size=grpo_cfg.logprob_chunk,
                                       temperature=temperature,
                                       group=(grpo_cfg.packing_group(tokens.shape[0])
                                              if objective.shares_prompt else 1))

    def update(params, state: TrainState, batch: Batch):
        """One optimizer update of the LoRA weights on a sampled batch.

        Gradients are summed over micro-batches of `grpo_cfg.micro_batch` rows (a
        scan, so memory is one micro-batch's), each weighted by its share of the
        whole batch; an update whose loss or gradient is not finite is not applied
        (the state comes back unchanged). The policy is the sampling distribution:
        log-probs of logits / temperature, as old and reference log-probs are too.
        With `batch.sample_logprobs`, the metric `logprob_drift` is their mean
        |difference| from the trainer's log-probs under `state.lora` (top-k / top-p
        truncation shows up in it as the log of the kept probability mass).
        """
        n = batch.tokens.shape[0]
        micro = grpo_cfg.micro_batch or n
        chunks = n // micro
        # Micro-batches must add up to the whole batch's numbers: token means weigh
        # each by its share of the tokens (micro-batches hold unequal counts), row
        # means by 1 / chunks; extremes combine as extremes.
        total_tokens = jnp.maximum(jnp.sum(batch.completion_mask), 1).astype(jnp.float32)

        def loss_fn(lora, part: Batch):
            cmask = part.completion_mask
            logp = part_logprobs(params, lora, part)
            value, metrics = objective(logp, part)
            share = jnp.sum(cmask) / total_tokens
            value = value * (share if objective.token_mean else 1.0 / chunks)
            metrics = {k: v if k in grpo.EXTREME_METRICS else
                       v * (share if k in grpo.TOKEN_MEAN_METRICS else 1.0 / chunks)
                       for k, v in metrics.items()}
            if getattr(part, "sample_logprobs", None) is not None:
                diff = jnp.where(cmask, jnp.abs(jax.lax.stop_gradient(logp)
                                                - part.sample_logprobs), 0.0)
                metrics = {**metrics, "logprob_drift": jnp.sum(diff) / total_tokens}
            return value, metrics

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def reduction(name):
            """(operation, identity) combining metric `name` over micro-batches."""
            return grpo.EXTREME_METRICS.get(name, (jnp.add, 0.0))

        def accumulate(carry, part):
            grads, loss_sum, metric_sums = carry
            (loss, metrics), g = grad_fn(state.lora, part)
            grads = jax.tree.map(jnp.add, grads, g)
            metric_sums = {k: reduction(k)[0](metric_sums[k], v) for k, v in metrics.items()}
            return (grads, loss_sum + loss, metric_sums), None

        parts = micro_batches(batch, micro, grpo_cfg.packing_group(micro)
                              if objective.shares_prompt else 1)
        first = jax.tree.map(lambda x: x[0], parts)
        zero_metrics = jax.eval_shape(lambda: loss_fn(state.lora, first)[1])
        zero_metrics = {k: jnp.full(v.shape, reduction(k)[1], v.dtype)
                        for k, v in zero_metrics.items()}
        zero_grads = jax.tree.map(jnp.zeros_like, state.lora)
        (grads, loss, metrics), _ = jax.lax.scan(
            accumulate, (zero_grads, jnp.float32(0.0), zero_metrics), parts)
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.lora)
        new = TrainState(lora=optax.apply_updates(state.lora, updates), opt_state=new_opt_state)
        finite = jnp.isfinite(loss) & _tree_all_finite(grads)
        new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
                   "finite": finite}
        return new, metrics

    params_sh = gemma3.param_shardings(plan, model_cfg)

    def logprobs_shardings(params, lora, *_):
        lora_sh = lora_lib.lora_shardings(plan, model_cfg, lora)
        return (params_sh, lora_sh, plan.rows, plan.rows), plan.rows

    def update_shardings(params, state, batch):
        state_sh = state_shardings(plan, model_cfg, optimizer, state.lora)
        return (params_sh, state_sh, plan.rows), (state_sh, plan.replicated)

    return StepFunctions(
        logprobs=sharding.sharded_jit(plan, token_logprobs, logprobs_shardings,
                                      static_argnums=(4,)),
        update=sharding.sharded_jit(plan, update, update_shardings, donate_argnums=(1,)),
        optimizer=optimizer)
