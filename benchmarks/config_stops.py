"""Count the stops a command's config makes from the composed Hydra config to its uses (issue 37's measure).

A *stop* is a function of src/ that is handed config-derived data as an argument: the composed DictConfig or
any node of it, a typed settings object converted from it (an instance of a schema dataclass), or a plain
dict / list equal to a node of the resolved config (e.g. `OmegaConf.to_container(cfg.model)`). Each function
counts once however often it is called; a *place* is a module holding stops. A method receiving its own
settings object as `self` is not a hand-over (the object checking its own fields) unless `--self` is given.
The command runs in process on the tiny model under `sys.setprofile`:

    python benchmarks/config_stops.py train <tmp dir>                 # src.train debug=tiny, 2 steps
    python benchmarks/config_stops.py evaluate <tmp dir> <run folder> # src.eval of that run, 1 example
    REPO=<another checkout> python benchmarks/config_stops.py ...     # the same count on other code
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(os.environ.get("REPO", Path(__file__).resolve().parents[1])).resolve()
SCHEMA_MODULES = ("src.config.schemas", "src.config.commands", "src.lit.objectives", "src.lit.optim",
                  "src.flexidepth.config", "src.models.config", "src.data.config", "src.eval.config",
                  "src.eval.speed_plan")  # fmt: skip


def node_signatures(container) -> set[str]:
    """JSON text of every non-empty mapping and list of a resolved config tree."""
    sigs: set[str] = set()

    def walk(x):
        if isinstance(x, (dict, list)) and x:
            sigs.add(json.dumps(x, sort_keys=True, default=str))
            for v in x.values() if isinstance(x, dict) else x:
                walk(v)

    walk(container)
    return sigs


def schema_classes() -> tuple[type, ...]:
    classes = set()
    for name in SCHEMA_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # code from before the module existed
            continue
        classes |= {v for v in vars(module).values() if dataclasses.is_dataclass(v) and v.__module__ == name}
    return tuple(c for c in classes if isinstance(c, type))


def trace(fn, cfg, count_self: bool) -> dict[str, int]:
    """{"<file>:<function>": calls} of every stop while `fn(cfg)` runs."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    src = str(ROOT / "src") + "/"
    sigs = node_signatures(OmegaConf.to_container(cfg, resolve=True))
    schemas = schema_classes()
    stops: dict[str, int] = defaultdict(int)

    def tracked(v) -> bool:
        if isinstance(v, (DictConfig, ListConfig)) or (schemas and isinstance(v, schemas)):
            return True
        if isinstance(v, (dict, list)) and v:
            try:
                return json.dumps(v, sort_keys=True, default=str) in sigs
            except (TypeError, ValueError):
                return False
        return False

    def profile(frame, event, arg):
        code = frame.f_code
        if event != "call" or not code.co_filename.startswith(src):
            return
        varkw = bool(code.co_flags & 0x08)  # **kwargs: its values are the arguments
        n = code.co_argcount + code.co_kwonlyargcount + bool(code.co_flags & 0x04) + varkw
        for name in code.co_varnames[:n]:
            value = frame.f_locals.get(name)
            if name == "self" and not (count_self and schemas and isinstance(value, schemas)):
                continue
            if isinstance(value, tuple) or (varkw and name == code.co_varnames[n - 1]):
                values = list(value.values()) if isinstance(value, dict) else list(value)
            else:
                values = [value]
            if any(tracked(v) for v in values):
                stops[f"{code.co_filename[len(src) :]}:{code.co_qualname}"] += 1
                return

    sys.setprofile(profile)
    try:
        fn(cfg)
    finally:
        sys.setprofile(None)
    return stops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["train", "evaluate"])
    parser.add_argument("tmp", type=Path)
    parser.add_argument("run", type=Path, nargs="?", help="evaluate: the run folder to evaluate")
    parser.add_argument("--self", dest="count_self", action="store_true", help="count `self` hand-overs too")
    args = parser.parse_args()
    tmp = args.tmp.resolve()
    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    import tests.conftest  # noqa: F401  (offline, CPU, the resolvers and schemas)

    def composed(name, overrides, out):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(name, overrides=overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
        return cfg

    if args.command == "train":
        from src.train import train as fn

        cfg = composed("train", ["debug=tiny", "logger=none", "trainer.max_steps=2",
                                 "trainer.val_check_interval=2", "run_name=stops"], tmp / "run")  # fmt: skip
    else:
        from src.eval.__main__ import run as fn

        cfg = composed("evaluate", ["model=tiny_llama", "logger=none", f"ckpt_path={args.run.resolve()}",
                                    "eval.n_per_task=1", "eval.tasks=[cloze]", "eval.ppl_max_articles=1",
                                    "eval.max_new_tokens=2"], tmp / "eval")  # fmt: skip
    stops = trace(fn, cfg, args.count_self)
    for key in sorted(stops):
        print(f"  {stops[key]:4d}  {key}")
    places = {key.split(":")[0] for key in stops}
    print(f"{args.command}: {len(stops)} stops (functions) in {len(places)} places (modules); "
          f"{sum(stops.values())} calls")  # fmt: skip


if __name__ == "__main__":
    main()
