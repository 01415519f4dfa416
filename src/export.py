"""Export a trained FlexiDepth model as a self-contained Hugging Face folder, optionally pushed to the Hub.

    python -m src.export ckpt_path=outputs/train/runs/<run> out_dir=exports/<name>
    python -m src.export ckpt_path=outputs/train/runs/<run> out_dir=exports/<name> hub_repo=<user>/<name>
    python -m src.export ckpt_path=<run> out_dir=<folder> overwrite=true    # the run's model (no model=)

The folder loads without this repository (docs/checkpoints.md §3):

    model = AutoModelForCausalLM.from_pretrained(out_dir, trust_remote_code=True)   # flexidepth_tau=0.6 overrides tau
    tokenizer = AutoTokenizer.from_pretrained(out_dir, trust_remote_code=False)   # needs no code

It holds config.json (the base config + `auto_map` + the routing block `flexidepth`), modeling_flexidepth.py
(src/export_modeling/, copied verbatim: torch + transformers only), model.safetensors (base weights and
router/adapter tensors under the model's own keys), the tokenizer files, generation_config.json and a model
card README.md written from the run's files (`model_card`, src/render/model_card.py).

The format, its checks, the writer, the verifier, the upload and the swap are src/models/export.py's; this
command runs them. Order of work: every argument, the hub setting, the output folder, the checkpoint (method,
family, base model) are checked before the model is loaded (`ExportCommand.check`); the folder is written to a temporary sibling, loaded back with its own
modeling file and compared with the trained model (teacher-forced logits and routes), and only then renamed
into place, so a failure, Ctrl-C or SIGTERM leaves nothing at `out_dir` and no temporary folder. The rename
checks `out_dir` again: a folder written meanwhile (a second export, a user's file) is refused, never
replaced; `overwrite=true` replaces a previous export and deletes only the files it lists. A `compare_json`
is read at the start (a truncated file is refused). Config: conf/export.yaml.
"""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

from omegaconf import DictConfig

from .config import register
from .config.commands import ExportCommand
from .config.run_model import adopt_run_model
from .config.schemas import load
from .models.export import (
    REPO_ID,
    replace_folder,
    routing_block,
    stop_on_sigterm,
    upload_export,
    verify_export,
    write_export,
)
from .render.model_card import FIGURE, card_license, curve_files, model_card
from .utils.cli import hydra_command
from .utils.run_config import run_folder_of

register()  # resolvers and typed schemas, before Hydra composes this command's config


def run(cfg: DictConfig) -> Path:
    """Convert the config once (`ExportCommand`), check everything, load, write to a temporary sibling,
    verify, rename into place, upload if asked. Returns the export folder."""
    import torch

    adopt_run_model(cfg)  # ckpt_path=<run>: the run's model, unless model= is given
    s = load(cfg, ExportCommand)
    folder = (
        s.check()
    )  # hub, keys, out_dir, compare_json, the checkpoint and the base model: nothing loaded yet
    with torch.no_grad(), stop_on_sigterm():  # SIGTERM / Ctrl-C: the temporary folder is removed
        return build_and_write(s, folder)


def build_and_write(s: ExportCommand, folder: Path) -> Path:
    """`run` after its checks (under `torch.no_grad()`): load, write the temporary sibling, verify, rename."""
    from .flexidepth.checkpoint import load_flexidepth
    from .models.embedded import resolve_model_path
    from .models.loader import load_base_model
    from .models.tokenizer import load_tokenizer

    model = load_base_model(s.model).eval()
    tokenizer = load_tokenizer(s.model)
    load_flexidepth(model, folder)
    model.eval()

    base_path = None if s.model.random_init else resolve_model_path(s.model.name_or_path)
    name = str(s.model.name_or_path)
    hub_base = name if REPO_ID.match(name) and not Path(name).exists() else None
    compare_json = Path(s.compare_json) if s.compare_json else None
    card = model_card(
        routing_block(model, name),
        model.config.num_hidden_layers,
        run_folder_of(folder),
        compare_json,
        license_name=card_license(base_path),
        base_model=hub_base,
    )
    out_dir = s.out_path()
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:  # BaseException included: a SIGTERM (stop_on_sigterm) or Ctrl-C removes the temporary folder
        figure = {k: v for k, v in curve_files(compare_json).items() if k == FIGURE}
        files = write_export(model, tokenizer, tmp, card, name, figure)
        check = verify_export(tmp, model, tokenizer)
        replace_folder(tmp, out_dir, s.overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"export: {out_dir} ({len(files)} files; checked against the trained model: logits max |diff| "
        f"{check['max_abs_diff']:.2e}, same routes)",
        flush=True,
    )
    print(
        f"  load: AutoModelForCausalLM.from_pretrained({str(out_dir)!r}, trust_remote_code=True)", flush=True
    )
    if s.hub_repo:
        sent = upload_export(out_dir, s.hub_repo, s.private)
        print(f"  uploaded {len(sent)} files to https://huggingface.co/{s.hub_repo}", flush=True)
    return out_dir


@hydra_command("export")  # the export writes only out_dir, through a temporary sibling: nothing to clean up
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
