"""The method registry: the only place that knows which methods exist.

A method class registers itself when its module is imported (`Method.__init_subclass__`, keyed by its
`name` default). Every module of this package is imported on first use (one file per method, no list to edit); a plug-in method is found
through its config: `conf/method/<name>.yaml` (or any folder on Hydra's search path, e.g.
`hydra.searchpath=[file:///my/conf]`) holding

    _target_: my_package.my_method.MyMethod     # resolved by Hydra (hydra.utils.get_class), which imports it
    name: my_method
    ...                                          # the dataclass fields of MyMethod

    method = build_method(s.method)             # validated Method instance (MethodConfigError names the key)
    applied = method.apply(model, tokenizer=tok, ckpt=folder, skip=s.skip.flexidepth())
"""

from __future__ import annotations

from typing import Any

from ..utils.errors import MethodConfigError
from .base import Method, registered


def method_names() -> list[str]:
    """Every registered method name, the built-in ones first (file name order)."""
    _builtins()
    return list(registered())


def method_class(name: str) -> type[Method]:
    """The class registered under `name`; MethodConfigError listing the known names otherwise."""
    _builtins()
    if name not in registered():
        raise MethodConfigError(f"method.name={name!r} is not one of {list(registered())}")
    return registered()[name]


def build_method(node: dict[str, Any]) -> Method:
    """A validated Method from a `method` node: the plain mapping a command's typed settings hold (`s.method`,
    `_target_` optional; a composed DictConfig is converted by the caller, `OmegaConf.to_container`).

    With `_target_` the class is resolved by Hydra (and registers itself on import); without it, by
    `name` (default flexidepth, checkpoints before the method group). Raises MethodConfigError naming
    `method.<key>` for an unknown name or key, a wrong type or value."""
    _builtins()
    options = dict(node)  # a copy: `_target_` is taken out
    target = options.pop("_target_", None)
    if target is not None:
        from hydra.utils import get_class

        try:
            cls = get_class(str(target))
        except Exception as err:  # ImportError / AttributeError wrapped by Hydra
            raise MethodConfigError(f"method._target_={target!r} cannot be imported: {err}") from None
        if not isinstance(cls, type) or not hasattr(cls, "from_config"):
            raise MethodConfigError(f"method._target_={target!r} is not a Method class (src/methods/base.py)")
    else:
        cls = method_class(str(options.get("name", "flexidepth")))
    options.setdefault("name", cls.__dict__.get("name") or "")
    return cls.from_config(options)


def trains(name: str) -> bool:
    """Whether method `name` is trained by `src.train` (routers / adapters)."""
    return bool(method_class(name).trains)


def method_macs(config, applied, layers_skipped: float) -> dict[str, float]:
    """MACs per token of an applied system vs its base model (`Method.macs`), by the cost model of the method
    that built it (`applied.name`): static removal, routed layers, MindSkip's attention-only skip."""
    return method_class(applied.name)().macs(config, applied, layers_skipped)


def compose_method(
    name: str, overrides: dict[str, Any] | None = None, searchpath: list[str] | None = None
) -> dict[str, Any]:
    """The options of `conf/method/<name>.yaml` composed by Hydra, updated with `overrides`.

    Inside a Hydra app the app's config loader and its `hydra.searchpath` (plug-in folders) are used, else
    this repository's conf/ plus `searchpath` (e.g. ["file:///my/conf"]). Raises MethodConfigError when no
    such config is on the search path."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    paths = list(searchpath or [])
    try:
        from hydra.core.hydra_config import HydraConfig

        paths += [p for p in HydraConfig.get().searchpath if p not in paths]
    except ValueError:  # not inside a Hydra app
        pass

    def load() -> dict[str, Any]:
        extra = [f"hydra.searchpath=[{','.join(paths)}]"] if paths else []
        cfg = compose(overrides=[f"+method={name}", *extra])
        return OmegaConf.to_container(cfg.method, resolve=True)

    try:
        if GlobalHydra.instance().is_initialized():
            node = load()
        else:
            from pathlib import Path

            conf = Path(__file__).resolve().parents[2] / "conf"
            with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
                node = load()
    except Exception as err:  # MissingConfigException and friends
        raise MethodConfigError(f"no method config method/{name} on the config search path ({err})") from None
    node.update(overrides or {})
    return node


_LOADED = False


def _builtins() -> None:
    """Import every module of this package once: each method file registers its class."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(_package_path()):
        if info.name not in ("base", "registry") and not info.name.startswith("_"):
            importlib.import_module(f"{__package__}.{info.name}")


def _package_path() -> list[str]:
    from pathlib import Path

    return [str(Path(__file__).resolve().parent)]
