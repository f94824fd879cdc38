"""Runs one training step, the reference pass and the sampler of a tiny Gemma on one
device and on each mesh given, in a process of its own with 8 simulated CPU devices
(`test_sharding` starts it: the test process itself has one device). Writes an .npz of
every result, and of the shardings the arrays came back with, for the test to compare.

    JAX_NUM_CPU_DEVICES=8 python tests/sharded_worker.py OUT.npz 8,1,1 2,4,1 2,2,2,pallas ...

A mesh ending in ",pallas" runs the model with attention_impl="pallas" (the kernels per
device under shard_map, in interpret mode), still compared with one device's XLA path.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _tiny_model import random_lora, random_params  # noqa: E402

from grpo_jax import decode, grpo, sampler, sharding, update as step_lib  # noqa: E402
from grpo_jax.config import GRPOConfig, MeshConfig, OptimizerConfig, SamplerConfig  # noqa: E402
from grpo_jax.model.config import LoraConfig, TINY  # noqa: E402
from grpo_jax.model import gemma3, kv_cache, lora as lora_lib  # noqa: E402

# Gemma's shape in miniature: 4 query heads (so tensor 4 splits them), one KV head, and
# two layers, a sliding-window one then a global one (their caches differ: a ring of
# the window, the whole length). Two layers, not TINY's four, halve the Pallas mesh's
# interpret-mode time (146 -> 77 s of the worker's ~230 s).
CFG = dataclasses.replace(TINY, name="tiny-1kv", num_kv_heads=1, num_layers=2)
assert [CFG.is_global_layer(i) for i in range(CFG.num_layers)] == [False, True]
LORA = LoraConfig(rank=4, alpha=8.0)
PROMPTS, GROUP, PROMPT_LEN, STEPS = 16, 2, 8, 8
GRPO = GRPOConfig(num_prompts=PROMPTS, group_size=GROUP, micro_batch=16, logprob_chunk=64)
SAMPLING = SamplerConfig(max_new_tokens=STEPS, temperature=1.0, stop_ids=(1,))


def inputs(seed: int):
    rng = np.random.default_rng(seed)
    params = random_params(CFG, rng)
    # A smaller embedding keeps the tied logits moderate, so samples are not all argmax.
    params["embed"] = params["embed"] * 0.1
    lora = random_lora(CFG, LORA, rng)
    lengths = rng.integers(3, PROMPT_LEN + 1, PROMPTS)
    prompt_mask = np.arange(PROMPT_LEN)[None, :] >= PROMPT_LEN - lengths[:, None]
    prompt_tokens = np.where(prompt_mask, rng.integers(2, CFG.vocab_size, prompt_mask.shape), 0)
    completions = rng.integers(2, CFG.vocab_size, (PROMPTS * GROUP, STEPS)).astype(np.int32)
    completion_lengths = rng.integers(1, STEPS + 1, PROMPTS * GROUP)
    batch = step_lib.teacher_forced_batch(prompt_tokens.astype(np.int32), prompt_mask,
                                          completions, completion_lengths, GROUP)
    n = PROMPTS * GROUP
    # Old and reference log-probs near the policy's, so ratios straddle the clip range.
    logp = grpo.per_token_logprobs(params, lora, batch.tokens, batch.input_mask,
                                   batch.prompt_len, CFG)
    noise = lambda: jnp.asarray(0.3 * rng.standard_normal((n, STEPS)), jnp.float32)  # noqa: E731
    batch = batch.replace(advantages=jnp.asarray(rng.standard_normal(n), jnp.float32),
                          ref_logprobs=logp + noise(), old_logprobs=logp + noise())
    return params, lora, batch, prompt_tokens.astype(np.int32), prompt_mask


def grads_fn(params, lora, batch, cfg=CFG):
    """Gradient of the GRPO loss w.r.t. the adapters (the update's inner step)."""
    def loss(lora):
        logp = grpo.per_token_logprobs(params, lora, batch.tokens, batch.input_mask,
                                       batch.prompt_len, cfg, chunk_size=GRPO.logprob_chunk,
                                       group=GROUP)
        return grpo.policy_loss(logp, batch.old_logprobs, batch.ref_logprobs, batch.advantages,
                                batch.completion_mask)[0]
    return jax.value_and_grad(loss)(lora)


def spec_of(x) -> str:
    return str(x.sharding.spec) if isinstance(x.sharding, jax.sharding.NamedSharding) else "single"


def run(plan: sharding.MeshPlan | None, seed: int, attention: str = "xla"
        ) -> dict[str, np.ndarray]:
    params, lora, batch, prompt_tokens, prompt_mask = inputs(seed)
    model_cfg = dataclasses.replace(CFG, attention_impl=attention)
    fns = step_lib.build_update(model_cfg, GRPO, OptimizerConfig(learning_rate=1e-2), 10, 1.0,
                                step_lib.GRPOLoss(GRPO), plan)
    if plan is not None:
        params = sharding.put_tree(params, gemma3.param_shardings(plan, CFG))
        lora = sharding.put_tree(lora, lora_lib.lora_shardings(plan, CFG, lora))
        batch = jax.tree.map(lambda x: sharding.put_rows(plan, x), batch)
        prompt_tokens, prompt_mask = (sharding.put_rows(plan, x)
                                      for x in (prompt_tokens, prompt_mask))
    out: dict[str, np.ndarray] = {}
    ref = fns.batch_logprobs(params, None, batch)
    out["ref_logprobs"] = ref
    state = fns.init_state(jax.tree.map(jnp.copy, lora))  # the update donates it
    if plan is not None:
        state = sharding.put_tree(state, step_lib.state_shardings(plan, CFG, fns.optimizer, lora))
    new_state, metrics = fns.update(params, state, batch)
    out["loss"], out["grad_norm"] = metrics["loss"], metrics["grad_norm"]
    for i, leaf in enumerate(jax.tree.leaves(new_state.lora)):
        out[f"lora_{i}"] = leaf
    if plan is None:
        loss, grads = jax.jit(grads_fn, static_argnums=3)(params, lora, batch, model_cfg)
    else:
        grad_sh = lora_lib.lora_shardings(plan, CFG, lora)
        loss, grads = sharding.sharded_jit(
            plan, grads_fn, lambda *a: ((gemma3.param_shardings(plan, CFG), grad_sh,
                                         plan.rows), (plan.replicated, grad_sh)),
            static_argnums=(3,))(params, lora, batch, model_cfg)
    out["grad_loss"] = loss
    for i, leaf in enumerate(jax.tree.leaves(grads)):
        out[f"grad_{i}"] = leaf
    sample = sampler.sample(params, prompt_tokens, prompt_mask, jax.random.key(seed + 1),
                            cfg=model_cfg, sampling=SAMPLING, group=GROUP, lora=lora,
                            plan=plan)
    out["sample_tokens"], out["sample_logprobs"] = sample.tokens, sample.logprobs
    specs = {
        "ref_logprobs": spec_of(ref), "sample_tokens": spec_of(sample.tokens),
        **{f"lora_{i}": spec_of(x) for i, x in enumerate(jax.tree.leaves(new_state.lora))},
        **{f"opt_{i}": spec_of(x) for i, x in enumerate(jax.tree.leaves(new_state.opt_state))},
        **{f"grad_{i}": spec_of(x) for i, x in enumerate(jax.tree.leaves(grads))},
    }
    if plan is not None:
        cfg_len = PROMPT_LEN + STEPS
        start = decode.programs(model_cfg, SAMPLING, cfg_len, GROUP, plan).start
        cache, _ = start(params, lora, prompt_tokens, prompt_mask,
                         np.arange(prompt_tokens.shape[0], dtype=np.int32),
                         jax.random.key(0), None, None)
        specs.update({f"cache_keys_{i}": spec_of(x) for i, x in enumerate(cache.keys)})
        specs["cache_lengths"] = spec_of(cache.lengths)
        # The shardings the rules give, to compare with what came back.
        want_lora = jax.tree.leaves(lora_lib.lora_shardings(plan, CFG, lora))
        want_opt = jax.tree.leaves(step_lib.state_shardings(plan, CFG, fns.optimizer, lora)
                                   .opt_state)
        specs.update({f"want_lora_{i}": str(s.spec) for i, s in enumerate(want_lora)})
        specs.update({f"want_opt_{i}": str(s.spec) for i, s in enumerate(want_opt)})
        specs["want_rows"] = str(plan.rows.spec)
        specs["want_cache"] = str(kv_cache.cache_shardings(plan, CFG).keys[0].spec)
    result = {k: np.asarray(jax.device_get(v)) for k, v in out.items()}
    result["specs"] = np.asarray(json.dumps(specs))
    return result


def main(argv: list[str]) -> int:
    path, seed = argv[0], int(os.environ.get("SHARDED_SEED", "0"))
    results = {f"single/{k}": v for k, v in run(None, seed).items()}
    for mesh in argv[1:]:  # "data,fsdp,tensor" or "data,fsdp,tensor,pallas"
        shape, attention = mesh.split(","), "xla"
        if shape[-1] == "pallas":
            shape, attention = shape[:-1], "pallas"
        plan = sharding.plan_for(MeshConfig(*map(int, shape)))
        name = "x".join(shape) + ("-pallas" if attention == "pallas" else "")
        results.update({f"{name}/{k}": v for k, v in run(plan, seed, attention).items()})
    np.savez(path, **results)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
