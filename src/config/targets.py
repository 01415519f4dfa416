"""Nodes Hydra instantiates (`_target_` plus arguments: the `trainer` node, each of `callbacks` and `logger`)
checked against their target's own signature and type hints, before src.train loads anything.

These nodes stay open mappings (any Trainer, callback or logger argument may be set from the command line), so
without this an unknown key or `trainer.max_steps=x` surfaced only when the object was built, after the model
load, as a traceback from Hydra's instantiate.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterable, Mapping
from typing import Any

# arguments src.train passes to the Trainer itself (src/train.py `trainer_arguments`): the node must not set them
TRAINER_OWN = ("callbacks", "logger", "use_distributed_sampler")


def target_problems(node: Any, key: str, own: tuple[str, ...] = ()) -> list[str]:
    """Problems of the node at `key` (a mapping with `_target_`), each naming `<key>.<argument>`: `_target_`
    missing or not importable, an argument its target does not take (unless it takes **kwargs), one of `own`
    (set by src.train itself), a value the target's type hints reject (int, float, bool, str, None, Literal,
    Union, list, classes; a nested `_target_` mapping is not judged). Empty when the node is fine."""
    from hydra.utils import get_object

    if not isinstance(node, Mapping):
        return [f"{key}: expected a mapping with _target_, got {type(node).__name__} {node!r}"]
    target = node.get("_target_")
    if not target:
        return [f"{key}._target_ is missing (the class Hydra builds, e.g. lightning.pytorch.Trainer)"]
    try:
        obj = get_object(str(target))
    except Exception as err:  # ImportError, AttributeError, ValueError: hydra wraps them differently
        return [f"{key}._target_={target!r} cannot be imported ({type(err).__name__})"]
    call = obj.__init__ if inspect.isclass(obj) else obj
    try:
        parameters = inspect.signature(call).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): not judged
        return []
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    try:
        hints = typing.get_type_hints(call)
    except Exception:  # unresolvable annotations: keys are still checked, types are not
        hints = {}
    name = getattr(obj, "__name__", str(target))
    problems = []
    for arg, value in node.items():
        if str(arg).startswith("_"):
            continue
        if arg in own:
            problems.append(f"{key}.{arg} is set by src.train itself (configure `{arg}` in its own group)")
        elif arg not in parameters:
            if not open_ended:
                problems.append(f"{key}.{arg}: {name} takes no argument {arg!r}")
        elif arg in hints and accepts(hints[arg], value) is False:
            problems.append(
                f"{key}.{arg}: expected {_name(hints[arg])}, got {type(value).__name__} {value!r}"
            )
    return problems


def trainer_problems(node: Mapping[str, Any]) -> list[str]:
    """`target_problems` of the `trainer` node (the arguments src.train sets itself refused)."""
    return target_problems(node, "trainer", TRAINER_OWN)


def group_problems(nodes: Mapping[str, Any] | None, group: str) -> list[str]:
    """`target_problems` of every entry of a name -> node group (`callbacks`, `logger`); a null entry, or one
    without `_target_` (a switched-off entry), is not built by src.train and not checked."""
    problems = []
    for name, node in (nodes or {}).items():
        if isinstance(node, Mapping) and node.get("_target_"):
            problems += target_problems(node, f"{group}.{name}")
        elif node is not None and not isinstance(node, Mapping):
            problems.append(f"{group}.{name}: expected a mapping with _target_ or null, got {node!r}")
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
