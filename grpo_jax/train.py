"""GRPO training: `python -m grpo_jax.train [--preset NAME] [--field value ...]`.

One step, top to bottom (each arrow one call into one module):
    data.batch_at  -> B problems at the stream position
    sampler.sample -> B x G completions from base + LoRA (prefill once per prompt)
    rewards.score_completions -> total and per-function rewards
    grpo.group_advantages     -> advantages within each group of G
    grpo.per_token_logprobs   -> reference log-probs (LoRA off), old log-probs when mu > 1
    train_step (jit) x mu     -> clipped surrogate + beta KL, grads w.r.t. LoRA only, AdamW
    metrics / checkpoint      -> metrics.jsonl, samples.jsonl, orbax every save_every steps
Every step's randomness is fold_in(seed, step) and its data position is
(step - 1) * B, so a resumed run repeats exactly what an uninterrupted one does.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grpo_jax import data, grpo, rewards, run_cli, sampler
from grpo_jax.config import (GRPOConfig, ModelConfig, OptimizerConfig, TrainConfig,
                             deferred_validation, model_preset, train_preset, validate)
from grpo_jax.model import gemma3, lora as lora_lib

log = logging.getLogger("grpo_jax.train")


class TrainingError(RuntimeError):
    pass


# ---------------------------------------------------------------------------
# Pieces


def load_base(cfg: TrainConfig):
    """(model config, params, tokenizer). `tiny` without weights: random, byte tokenizer."""
    if cfg.model == "tiny" and cfg.checkpoint is None and cfg.gguf is None:
        from grpo_jax.tokenizer import ByteTokenizer

        model_cfg = model_preset("tiny")
        if cfg.dtype:
            model_cfg = dataclasses.replace(model_cfg, dtype=cfg.dtype)
        params = gemma3.init_params(model_cfg, jax.random.key(cfg.seed + 1))
        # The embedding is tied, so its scale sets both how flat the random model's
        # logits are (varied samples, so groups carry signal) and how far LoRA can
        # move them (|logit| <= |normed h| * |embed row|). At 0.05x LoRA cannot lift
        # any token measurably; at 0.5x the input token dominates and samples
        # collapse; 0.2x samples near uniformly and is learnable (tests/test_learning.py).
        params = {**params, "embed": params["embed"] * 0.2}
        return model_cfg, params, ByteTokenizer()
    from grpo_jax.model.load import load_model

    loaded = load_model(cfg.model, checkpoint=cfg.checkpoint, gguf=cfg.gguf, dtype=cfg.dtype)
    return loaded.cfg, loaded.params, loaded.tokenizer


def num_updates(cfg: TrainConfig) -> int:
    return cfg.steps * cfg.grpo.num_iterations


def make_optimizer(opt: OptimizerConfig, total_updates: int) -> optax.GradientTransformation:
    warmup = int(opt.warmup_ratio * total_updates)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, opt.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_updates, warmup + 1), end_value=0.0)
    adamw = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    if opt.max_grad_norm:
        return optax.chain(optax.clip_by_global_norm(opt.max_grad_norm), adamw)
    return adamw


@functools.partial(jax.jit, static_argnames=("prompt_len", "model_cfg", "chunk", "temperature",
                                             "group"))
def sequence_logprobs(params, lora, tokens, input_mask, *, prompt_len: int,
                      model_cfg: ModelConfig, chunk: int, temperature: float = 1.0,
                      group: int = 1) -> jax.Array:
    """Teacher-forced completion log-probs [N, T] (lora=None: the reference policy)."""
    return grpo.per_token_logprobs(params, lora, tokens, input_mask, prompt_len, model_cfg,
                                   chunk_size=chunk, temperature=temperature, group=group)


def _tree_all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@functools.partial(jax.jit, static_argnames=(
    "prompt_len", "model_cfg", "grpo_cfg", "opt_cfg", "total_updates", "temperature"),
    donate_argnums=(1, 2))
def train_step(params, lora, opt_state, tokens, input_mask, old_logprobs, ref_logprobs,
               advantages, sample_logprobs=None, *, prompt_len: int, model_cfg: ModelConfig,
               grpo_cfg: GRPOConfig, opt_cfg: OptimizerConfig, total_updates: int,
               temperature: float = 1.0):
    """One optimizer update of the LoRA weights on a sampled batch.

    Gradients are averaged over micro-batches of `grpo_cfg.micro_batch` rows (a
    scan, so memory is one micro-batch's); an update whose loss or gradient is not
    finite is not applied (lora and optimizer state come back unchanged).
    The policy is the sampling distribution: log-probs of logits / `temperature`
    (the sampler's temperature), as old and reference log-probs must be too.
    sample_logprobs [N, T] (the sampler's own log-probs of the completions under
    the distribution it sampled from): the metric `logprob_drift` is their mean
    |difference| from the trainer's log-probs under the LoRA passed in, so no
    separate pass is needed to watch sampler/trainer agreement (top-k / top-p
    truncation shows up in it as the log of the kept probability mass).
    """
    n = tokens.shape[0]
    micro = grpo_cfg.micro_batch or n
    chunks = n // micro
    completion_mask = input_mask[:, prompt_len:]

    # Micro-batches must add up to the whole batch's numbers. Each contributes its
    # weight of them: token means its share of the tokens (micro-batches hold unequal
    # counts), row means 1 / chunks (equal rows); extremes combine as extremes. The
    # scan sums the weighted loss, gradients and metrics.
    total_tokens = jnp.maximum(jnp.sum(completion_mask), 1).astype(jnp.float32)

    def split(x):
        return None if x is None else x.reshape(chunks, micro, *x.shape[1:])

    def loss_fn(lora, batch):
        toks, mask, cmask, old, ref, adv, sampled = batch
        logp = grpo.per_token_logprobs(params, lora, toks, mask, prompt_len, model_cfg,
                                       chunk_size=grpo_cfg.logprob_chunk,
                                       temperature=temperature,
                                       group=grpo_cfg.packing_group(micro))
        loss, metrics = grpo.policy_loss(
            logp, old, ref, adv, cmask, epsilon_low=grpo_cfg.epsilon_low,
            epsilon_high=grpo_cfg.epsilon_high, beta=grpo_cfg.beta,
            kl_estimator=grpo_cfg.kl_estimator, aggregation=grpo_cfg.aggregation,
            ratio_level=grpo_cfg.ratio_level)
        share = jnp.sum(cmask) / total_tokens  # this micro-batch's share of the tokens
        loss = loss * (share if grpo_cfg.aggregation == "token-mean" else 1.0 / chunks)
        metrics = {k: v if k in grpo.EXTREME_METRICS else
                   v * (share if k in grpo.TOKEN_MEAN_METRICS else 1.0 / chunks)
                   for k, v in metrics.items()}
        if sampled is not None:
            diff = jnp.where(cmask, jnp.abs(jax.lax.stop_gradient(logp) - sampled), 0.0)
            metrics = {**metrics, "logprob_drift": jnp.sum(diff) / total_tokens}
        return loss, metrics

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def reduction(name):
        """(operation, identity) combining metric `name` over micro-batches."""
        return grpo.EXTREME_METRICS.get(name, (jnp.add, 0.0))

    def accumulate(carry, batch):
        grads, loss_sum, metric_sums = carry
        (loss, metrics), g = grad_fn(lora, batch)
        grads = jax.tree.map(jnp.add, grads, g)
        metric_sums = {k: reduction(k)[0](metric_sums[k], v) for k, v in metrics.items()}
        return (grads, loss_sum + loss, metric_sums), None

    batches = (split(tokens), split(input_mask), split(completion_mask), split(old_logprobs),
               split(ref_logprobs), split(advantages), split(sample_logprobs))
    zero_metrics = jax.eval_shape(lambda: loss_fn(lora, jax.tree.map(lambda x: x[0], batches))[1])
    zero_metrics = {k: jnp.full(v.shape, reduction(k)[1], v.dtype)
                    for k, v in zero_metrics.items()}
    zero_grads = jax.tree.map(jnp.zeros_like, lora)
    (grads, loss, metrics), _ = jax.lax.scan(
        accumulate, (zero_grads, jnp.float32(0.0), zero_metrics), batches)
    optimizer = make_optimizer(opt_cfg, total_updates)
    updates, new_opt_state = optimizer.update(grads, opt_state, lora)
    new_lora = optax.apply_updates(lora, updates)
    finite = jnp.isfinite(loss) & _tree_all_finite(grads)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
    metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads),
               "finite": finite}
    return keep(new_lora, lora), keep(new_opt_state, opt_state), metrics


# ---------------------------------------------------------------------------
# The loop


def _step_batch(cfg: TrainConfig, tokenizer, problems, step: int):
    """The prompts of `step` (1-based), left-padded, and their reference answers."""
    batch = data.batch_at(problems, cfg.data.shuffle_seed, (step - 1) * cfg.grpo.num_prompts,
                          cfg.grpo.num_prompts)
    tokens, mask = sampler.left_pad(data.encode_prompts(tokenizer, batch), multiple=cfg.sampler.prompt_bucket)
    return batch, tokens, mask


def run_step(cfg: TrainConfig, model_cfg: ModelConfig, params, tokenizer, lora, opt_state,
             problems, step: int, rng: jax.Array):
    """Sample, score, update. -> lora, opt_state, metrics dict, sample rows."""
    start = time.perf_counter()
    g = cfg.grpo
    batch, prompt_tokens, prompt_mask = _step_batch(cfg, tokenizer, problems, step)
    out = sampler.sample(params, jnp.asarray(prompt_tokens), jnp.asarray(prompt_mask),
                         jax.random.fold_in(rng, step), cfg=model_cfg, sampling=cfg.sampler,
                         group=g.group_size, lora=lora)
    comp_tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    sampled_at = time.perf_counter()
    texts = sampler.decode_completions(tokenizer, out)
    answers = [p.answer for p in batch for _ in range(g.group_size)]
    total, per_function = rewards.score_completions(texts, answers, cfg.rewards)
    advantages = grpo.group_advantages(total.astype(np.float32), g.group_size,
                                       scale_by_std=g.scale_advantages_by_std)

    prompt_len = prompt_tokens.shape[1]
    completion_mask = np.arange(comp_tokens.shape[1])[None, :] < lengths[:, None]
    tokens = jnp.asarray(np.concatenate(
        [np.repeat(prompt_tokens, g.group_size, axis=0), comp_tokens], axis=1))
    input_mask = jnp.asarray(np.concatenate(
        [np.repeat(prompt_mask, g.group_size, axis=0), completion_mask], axis=1))
    logprobs = functools.partial(sequence_logprobs, params, prompt_len=prompt_len,
                                 model_cfg=model_cfg, chunk=g.logprob_chunk,
                                 temperature=cfg.sampler.temperature,
                                 group=g.packing_group(tokens.shape[0]))
    scored_at = time.perf_counter()
    ref = logprobs(None, tokens, input_mask) if g.beta > 0 else None
    # mu = 1 is on-policy: old = stop_gradient(current) inside the loss, no extra pass.
    # mu > 1 fixes old before the first update.
    old = logprobs(lora, tokens, input_mask) if g.num_iterations > 1 else None
    jax.block_until_ready((ref, old))
    logprobs_at = time.perf_counter()

    finite_all, drift = True, None
    for _ in range(g.num_iterations):
        lora, opt_state, m = train_step(
            params, lora, opt_state, tokens, input_mask, old, ref, advantages,
            out.sampling_logprobs, prompt_len=prompt_len, model_cfg=model_cfg, grpo_cfg=g,
            opt_cfg=cfg.optimizer, total_updates=num_updates(cfg),
            temperature=cfg.sampler.temperature)
        finite_all &= bool(m["finite"])
        # Only the first update sees the sampling policy's own weights.
        drift = float(m["logprob_drift"]) if drift is None else drift
    m = jax.device_get(m)
    elapsed = time.perf_counter() - start
    generated = int(lengths.sum())
    metrics = {
        "reward/mean": float(total.mean()),
        **{f"reward/{name}": float(v.mean()) for name, v in per_function.items()},
        "format_rate": float(np.mean(np.asarray(rewards.match_format_exactly(texts, answers)) > 0)),
        "accuracy": float(np.mean(np.asarray(rewards.check_numbers(texts, answers)) > 0)),
        "kl": float(m.get("kl_mean", 0.0)),
        "loss": float(m["loss"]),
        "clip_frac": float(m["clip_frac"]),
        "grad_norm": float(m["grad_norm"]),
        "completion_len/mean": float(lengths.mean()),
        "stopped_frac": float(np.mean(np.asarray(out.stopped))),
        "logprob_drift": drift,
        "tokens_per_s": generated / elapsed,
        "step_time_s": elapsed,
        # Where the step's time went (compiles included on a step that compiles).
        "time/sample_s": sampled_at - start,
        "time/score_s": scored_at - sampled_at,
        "time/logprobs_s": logprobs_at - scored_at,
        "time/update_s": start + elapsed - logprobs_at,
        "skipped": int(not finite_all),
    }
    samples = [{"question": batch[i // g.group_size].question, "answer": answers[i],
                "completion": texts[i], "reward": float(total[i])}
               for i in range(0, len(texts), max(1, len(texts) // max(cfg.log_samples, 1)))
               ][:cfg.log_samples]
    return lora, opt_state, metrics, samples


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) GRPO as configured; -> the last step's metrics."""
    from grpo_jax.checkpoint import Checkpointer

    out_dir = Path(cfg.output_dir)
    problems = data.load_problems(cfg.data, "train")
    ckpt = Checkpointer(out_dir, fingerprint=cfg.fingerprint, keep=cfg.keep_checkpoints)
    try:
        ckpt.check_compatible()  # before any heavy loading: a foreign directory fails fast
        lora, start, metrics, model_cfg, params, tokenizer = _train_loop(cfg, ckpt, problems)
    finally:
        ckpt.close()
    if cfg.eval_problems and start < cfg.steps:
        from grpo_jax.evaluate import evaluate_run

        evaluate_run(cfg, model_cfg, params, tokenizer, lora, out_dir)
    return metrics


def _train_loop(cfg: TrainConfig, ckpt, problems):
    from grpo_jax.metrics import MetricsLogger, Progress

    out_dir = Path(cfg.output_dir)
    model_cfg, params, tokenizer = load_base(cfg)

    lora = lora_lib.init_lora(model_cfg, cfg.lora, jax.random.key(cfg.seed))
    opt_state = make_optimizer(cfg.optimizer, num_updates(cfg)).init(lora)
    restored = ckpt.restore_latest({"lora": lora, "opt_state": opt_state})
    start = 0
    if restored is not None:
        lora, opt_state, start = restored.state["lora"], restored.state["opt_state"], restored.step
        log.info("resuming from step %d in %s", start, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))

    rng = jax.random.key(cfg.seed)
    metrics: dict[str, Any] = {}
    periodic_eval = None
    if cfg.eval_every and cfg.eval_problems:
        from grpo_jax import evaluate

        held_out = evaluate.eval_problems(cfg)
        periodic_eval = lambda lora: evaluate.evaluate_model(  # noqa: E731
            params, lora, tokenizer, held_out, model_cfg, **evaluate.eval_options(cfg))[0]
    skips_in_a_row = 0
    with MetricsLogger(out_dir, tensorboard=cfg.tensorboard, resume_step=start) as logger, \
            Progress(total=cfg.steps, initial=start) as progress:
        for step in range(start + 1, cfg.steps + 1):
            lora, opt_state, metrics, samples = run_step(
                cfg, model_cfg, params, tokenizer, lora, opt_state, problems, step, rng)
            if periodic_eval is not None and step % cfg.eval_every == 0 and step < cfg.steps:
                figures = periodic_eval(lora)
                metrics.update({f"eval/{k}": v for k, v in figures.items()
                                if k.endswith("_accuracy")})
            logger.log(step, metrics)
            logger.log_samples(step, samples)
            progress.update(metrics)
            skips_in_a_row = skips_in_a_row + 1 if metrics["skipped"] else 0
            if cfg.max_consecutive_skips and skips_in_a_row >= cfg.max_consecutive_skips:
                raise TrainingError(f"{skips_in_a_row} steps in a row had a non-finite loss or "
                                    f"gradient (last at step {step}); stopping")
            if step % cfg.save_every == 0 or step == cfg.steps:
                ckpt.save(step, {"lora": lora, "opt_state": opt_state},
                          {"data_position": step * cfg.grpo.num_prompts})
    return lora, start, metrics, model_cfg, params, tokenizer


# ---------------------------------------------------------------------------
# CLI


def parse_config(argv: Sequence[str] | None = None) -> TrainConfig:
    """--preset picks the defaults; every other flag overrides one field of it."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    preset = "cpu-270m"
    for i, arg in enumerate(argv):
        if arg == "--preset" and i + 1 < len(argv):
            preset = argv[i + 1]
        elif arg.startswith("--preset="):
            preset = arg.split("=", 1)[1]
    base = train_preset(preset)
    with deferred_validation():
        cfg = tyro.cli(TrainConfig, default=base, args=argv)
    validate(cfg)
    return cfg


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(lambda: train(parse_config(argv)), TrainingError)


if __name__ == "__main__":
    sys.exit(main())
