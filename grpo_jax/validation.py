"""Config validation that a CLI parser can defer: each config dataclass checks itself
in __post_init__ (decorated with `validated`), and `deferred_validation` turns that
off while a parser builds configs field by field, so bad input ends in one line of
ours (`validate` afterwards) instead of the parser's own error box."""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses

# Validation runs in each config's __post_init__; a CLI parser that builds configs
# field by field defers it (see `deferred_validation`) so bad input ends in one
# line of ours instead of the parser's own error box.
_VALIDATE = contextvars.ContextVar("grpo_jax_validate_configs", default=True)


def validated(post_init):
    def run(self):
        if _VALIDATE.get():
            post_init(self)
    run.check = post_init
    return run


@contextlib.contextmanager
def deferred_validation():
    token = _VALIDATE.set(False)
    try:
        yield
    finally:
        _VALIDATE.reset(token)


def validate(cfg) -> None:
    """Run every (nested) config dataclass's checks, innermost first."""
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value):
            validate(value)
    check = getattr(type(cfg).__post_init__, "check", None)
    if check is not None:
        check(cfg)
