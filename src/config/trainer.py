"""The `trainer` node (Lightning Trainer arguments, conf/trainer/*.yaml) checked against its target's signature.

The node stays an open mapping (any Trainer argument may be set from the command line), so its keys and value
types are checked here, from the target class's own `__init__` signature and type hints, before src.train loads
anything: without this an unknown key or `trainer.max_steps=x` surfaced only when the Trainer was built, after the
model load, as a traceback from Hydra's instantiate.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

# arguments src.train passes to the Trainer itself (src/train.py `trainer_arguments`): the node must not set them
OWN_ARGUMENTS = ("callbacks", "logger", "use_distributed_sampler")


def trainer_problems(node: Mapping[str, Any]) -> list[str]:
    """Problems of a `trainer` node, each naming `trainer.<key>`: `_target_` missing or not importable, a key its
    `__init__` does not take (unless it takes **kwargs), a key src.train sets itself, a value its type hints
    reject (int, float, bool, str, None, Literal, Union, list, classes; a `_target_` mapping is not judged).
    Empty when the node is fine."""
    from hydra.utils import get_class

    target = node.get("_target_")
    if not target:
        return ["trainer._target_ is missing (e.g. lightning.pytorch.Trainer)"]
    try:
        cls = get_class(str(target))
    except Exception as err:  # ImportError, AttributeError, ValueError: hydra wraps them differently
        return [f"trainer._target_={target!r} cannot be imported ({type(err).__name__})"]
    parameters = inspect.signature(cls.__init__).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # unresolvable annotations: keys are still checked, types are not
        hints = {}
    problems = []
    for key, value in node.items():
        if key.startswith("_"):
            continue
        if key in OWN_ARGUMENTS:
            problems.append(f"trainer.{key} is set by src.train itself (configure `{key}` in its own group)")
        elif key not in parameters:
            if not open_ended:
                problems.append(f"trainer.{key}: {cls.__name__} takes no argument {key!r}")
        elif key in hints and accepts(hints[key], value) is False:
            problems.append(
                f"trainer.{key}: expected {_name(hints[key])}, got {type(value).__name__} {value!r}"
            )
    return problems


def accepts(hint: Any, value: Any) -> bool | None:
    """Whether `value` (a plain config value) fits the type `hint`: True, False, or None where it cannot tell
    (a mapping given for a class, e.g. a Strategy as a `_target_` node Hydra instantiates)."""
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        verdicts = [accepts(arg, value) for arg in args]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin is typing.Literal:
        return any(value == arg and type(value) is type(arg) for arg in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, Iterable) or hint in (list,):
        if not isinstance(value, list | tuple):
            return None if isinstance(value, Mapping) else False
        verdicts = [accepts(args[0], item) for item in value] if args else []
        return False if False in verdicts else True
    if origin is dict or hint is dict:
        return isinstance(value, Mapping)
    if isinstance(value, Mapping):  # a `_target_` node Hydra instantiates: not judged here
        return None
    return isinstance(value, origin or hint) if isinstance(origin or hint, type) else None


def _name(hint: Any) -> str:
    """`hint` as a reader writes it: `int | None`, `one of 64, 32, 'bf16-mixed'`, `list[int]`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        literals = [
            lit for arg in args if typing.get_origin(arg) is typing.Literal for lit in typing.get_args(arg)
        ]
        others = [_name(arg) for arg in args if typing.get_origin(arg) is not typing.Literal]
        return " | ".join([_name(typing.Literal[tuple(literals)])] * bool(literals) + others)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if hint is type(None):
        return "null"
    if origin is not None and args:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_name(arg) for arg in args)}]"
    return getattr(hint, "__name__", str(hint))
