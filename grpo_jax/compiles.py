"""XLA compilations, counted for the metrics: a step that compiles is a step that met
a shape its programs had not seen (a new prompt bucket, another batch of rows), and
on 2 CPU cores each of the sampler's, reference pass's and update's compiles costs
~25 s. A run should compile in its first steps and never again.

JAX reports every backend compilation (`/jax/core/compile/backend_compile_duration`),
including programs read back from the persistent compilation cache, which it also
reports as cache hits; `compiles` counts the ones XLA actually compiled.
"""
from __future__ import annotations

import threading

import jax

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"

_lock = threading.Lock()
_totals = {"backend": 0, "cache_hits": 0, "seconds": 0.0}
_listening = False


def _on_duration(event: str, seconds: float, **_) -> None:
    if event == _COMPILE_EVENT:
        with _lock:
            _totals["backend"] += 1
            _totals["seconds"] += seconds


def _on_event(event: str, **_) -> None:
    if event == _CACHE_HIT_EVENT:
        with _lock:
            _totals["cache_hits"] += 1


def _listen() -> None:
    global _listening
    with _lock:
        if _listening:
            return
        _listening = True
    jax.monitoring.register_event_duration_secs_listener(_on_duration)
    jax.monitoring.register_event_listener(_on_event)


class CompileCounter:
    """`take()`: the compilations since the last take (or since it was made), as
    metrics: `compiles` (XLA compiled), `compile_cache_hits` (read back from the
    persistent cache) and `compile_s` (time in both)."""

    def __init__(self):
        _listen()
        self._last = self._now()

    @staticmethod
    def _now() -> dict:
        with _lock:
            return dict(_totals)

    def take(self) -> dict:
        now, last = self._now(), self._last
        self._last = now
        hits = now["cache_hits"] - last["cache_hits"]
        return {"compiles": now["backend"] - last["backend"] - hits,
                "compile_cache_hits": hits,
                "compile_s": now["seconds"] - last["seconds"]}
