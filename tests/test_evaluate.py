"""Evaluation wiring: train writes eval.json for base and trained side by side, and
`python -m grpo_jax.evaluate --run-dir` re-evaluates a run from its checkpoint."""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grpo_jax import runs, train
from grpo_jax.config import TrainConfig, config_from_dict
from grpo_jax.presets import TRAIN_PRESETS

FIGURES = ("format_accuracy", "exact_accuracy", "partial_accuracy", "lenient_accuracy")


def test_presets_round_trip_through_config_json():
    for name, cfg in TRAIN_PRESETS.items():
        assert config_from_dict(TrainConfig, json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


def test_config_json_of_an_earlier_version_reads_back(tmp_path):
    """config.json written before the dry run had its own command held its options as
    run fields; they are read back without them (and the data record beside them)."""
    cfg = dataclasses.replace(TRAIN_PRESETS["tiny"], output_dir=str(tmp_path))
    old = {**dataclasses.asdict(cfg), "dry_run": False, "topology": "v5e:2x4",
           "dry_run_json": None, "dry_run_attention": ["xla", "pallas"]}
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert runs.run_config(tmp_path) == cfg
    (tmp_path / "config.json").write_text(json.dumps({**old, "no_such_field": 1}))
    with pytest.raises(ValueError, match="unknown fields .'no_such_field'"):
        runs.run_config(tmp_path)


def test_evaluation_file_names():
    from grpo_jax import runs

    assert runs.eval_file() == "eval.json" and runs.eval_file("eval", 500) == "eval_n500.json"
    assert runs.eval_file("eval_same_template") == "eval_same_template.json"
    assert runs.eval_file("eval_same_template", 200) == "eval_same_template_n200.json"


def test_train_then_evaluate_run_dir(tmp_path):
    run = tmp_path / "run"
    cfg = dataclasses.replace(TRAIN_PRESETS["tiny"], output_dir=str(run), steps=1,
                              eval_problems=3, tensorboard=False)
    train.train(cfg)
    result = json.loads((run / "eval.json").read_text())
    assert result["num_problems"] == 3
    for model in ("base", "trained"):
        assert set(FIGURES) <= set(result[model])
        assert all(0.0 <= result[model][f] <= 1.0 for f in FIGURES)
        assert len(result["records"][model]) == 3
    # With no JAX_COMPILATION_CACHE_DIR the CLI keeps its programs under XDG_CACHE_HOME.
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run([sys.executable, "-m", "grpo_jax.evaluate", "--run-dir", str(run),
                           "--num-problems", "2"], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr
    assert "| format" in proc.stdout
    # Another count than the run's own goes to its own file; the run's stays as trained.
    assert json.loads((run / "eval.json").read_text()) == result
    other = json.loads((run / "eval_n2.json").read_text())
    assert other["num_problems"] == 2
    assert other["records"]["trained"] == result["records"]["trained"][:2]
    assert any((tmp_path / "cache" / "grpo_jax" / "xla").iterdir())
    # scripts/gold_steps_reached.py reads the same records against the gold solutions
    _load_script("gold_steps_reached").main([str(run), "--json", str(tmp_path / "g.json")])
    reached = json.loads((tmp_path / "g.json").read_text())
    assert set(reached) == {"base", "trained"}
    assert reached["trained"]["problems"] == 3 and reached["trained"]["gold_values"] >= 3


def test_evaluate_keeps_columns_it_already_has(tmp_path, monkeypatch):
    """A second evaluation of the same checkpoint and setup recomputes nothing (greedy
    repeats it: a stopped evaluation goes on where it was); a column whose file entry
    was removed, or is for another step, is computed again. Then --pass-at on it."""
    from grpo_jax import evaluate

    run = tmp_path / "run"
    train.train(dataclasses.replace(TRAIN_PRESETS["tiny"], output_dir=str(run), steps=2,
                                    save_every=1, eval_problems=2, tensorboard=False))
    args = evaluate.EvaluateArgs(run_dir=run, num_problems=3)
    first = evaluate.evaluate_run_dir(args)
    computed = []
    real_add = evaluate.EvalFile.add

    def counting_add(self, column, step, *a, **k):
        computed.append((column, step))
        return real_add(self, column, step, *a, **k)

    monkeypatch.setattr(evaluate.EvalFile, "add", counting_add)
    assert evaluate.evaluate_run_dir(args) == first and computed == []
    saved = json.loads((run / "eval_n3.json").read_text())
    del saved["base"], saved["steps"]["base"]
    (run / "eval_n3.json").write_text(json.dumps(saved))
    assert evaluate.evaluate_run_dir(args) == first and computed == [("base", 0)]
    computed.clear()
    evaluate.evaluate_run_dir(dataclasses.replace(args, step=1))
    assert computed == [("trained", 1)]
    # --columns: only those asked for (the base model's is the slow one that never changes)
    computed.clear()
    only = evaluate.evaluate_run_dir(dataclasses.replace(args, num_problems=4,
                                                         columns=("trained",)))
    assert computed == [("trained", 2)] and "base" not in only and "trained" in only
    with pytest.raises(ValueError, match="--columns needs at least one"):
        evaluate.evaluate_run_dir(dataclasses.replace(args, columns=()))

    # scripts/seed_base_column.py: another run of the same base model takes the base
    # column as it is (evaluate computes only the trained one); a run of another base
    # model, or a file already there, is refused.
    seed = _load_script("seed_base_column")
    other = tmp_path / "other"
    shutil.copytree(run, other, ignore=shutil.ignore_patterns("eval*.json"))
    seed.seed(run / "eval_n3.json", other)
    computed.clear()
    seeded = evaluate.evaluate_run_dir(dataclasses.replace(args, run_dir=other))
    assert computed == [("trained", 2)]
    assert seeded["base"] == first["base"] and seeded["trained"] == first["trained"]
    assert seeded["seeded_from"] == {"base": str(run / "eval_n3.json")}
    with pytest.raises(SystemExit, match="exists; not replacing it"):
        seed.seed(run / "eval_n3.json", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "gguf": "another.gguf"}))
    (other / "eval_n3.json").unlink()
    with pytest.raises(SystemExit, match="base models differ"):
        seed.seed(run / "eval_n3.json", other)

    # --pass-at: K samples a problem from the run's policy, fresh draws, not copies.
    result = evaluate.evaluate_run_dir(dataclasses.replace(args, num_problems=2, pass_at=3))
    trained = json.loads((run / "pass_at_3_n2.json").read_text())["trained"]
    assert trained == json.loads(json.dumps(result["trained"]))
    assert sum(trained["exact_samples_per_problem"]) == 2
    completions = [c for r in trained["records"] for c in r["completions"]]
    assert len(completions) == 6 and len(set(completions)) > 2


def _load_script(name: str):
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluate_missing_run_dir(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "grpo_jax.evaluate", "--run-dir",
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: run directory not found: {tmp_path / 'none'}"]
    (tmp_path / "none").mkdir()
    proc = subprocess.run([sys.executable, "-m", "grpo_jax.evaluate", "--run-dir",
                           str(tmp_path / "none")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'none' / 'config.json'} not found: is {tmp_path / 'none'} a "
        "training run's output dir?"]


def test_pass_at_k_counts_problems_with_an_exact_sample(tmp_path, monkeypatch):
    """evaluate --pass-at K: each problem sampled K times (consecutive rows, each its
    own stream); pass@K is the fraction of problems with at least one exact sample
    (scripted completions, known counts; a real tiny run in the test above)."""
    import types

    import numpy as np

    from grpo_jax import data, evaluate, sampler
    from grpo_jax.decode import SampleOutput

    problems = [data.Problem(question=f"q{i}", answer=str(i), index=i) for i in range(3)]
    # Problem 0: two of three samples exact; problem 1: none; problem 2: the last one.
    texts = ["<answer>0</answer>", "x", "<answer>0</answer>", "<answer>9</answer>", "", "y",
             "", "", "<reasoning>2 + 0 = 2</reasoning>\n<answer>2</answer>"]
    seen = {}

    def scripted_stream(params, prompts, key, **kw):
        seen["prompts"], seen["temperature"] = list(prompts), kw["sampling"].temperature
        n = len(prompts)
        return SampleOutput(np.zeros((n, 1), np.int32), np.zeros((n, 1)), np.zeros((n, 1)),
                            np.ones(n, np.int32), np.ones(n, bool), np.int32(1))

    monkeypatch.setattr(sampler, "sample_stream", scripted_stream)
    monkeypatch.setattr(sampler, "decode_completions", lambda tok, out, stops: texts)
    monkeypatch.setattr(data, "encode_prompts", lambda tok, ps, style, prefill, max_tokens:
                        [[p.index + 10] for p in ps])
    got = evaluate.sampled_accuracy(None, None, None, problems, types.SimpleNamespace(vocab_size=300), k=3,
                                    temperature=0.7, key=None, max_new_tokens=4, stop_ids=(1,))
    assert seen["prompts"] == [[10]] * 3 + [[11]] * 3 + [[12]] * 3
    assert seen["temperature"] == 0.7
    assert got["pass_at_3"] == pytest.approx(2 / 3)
    assert got["exact_samples_per_problem"] == [1, 1, 1, 0]
    assert got["samples"]["exact_accuracy"] == pytest.approx(3 / 9)
    assert [r["exact_samples"] for r in got["records"]] == [2, 0, 1]
    with pytest.raises(ValueError, match="temperature > 0"):
        evaluate.sampled_accuracy(None, None, None, problems, types.SimpleNamespace(vocab_size=300), k=3,
                                  temperature=0.0, key=None, max_new_tokens=4, stop_ids=(1,))
