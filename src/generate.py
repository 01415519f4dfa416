"""Generate from one prompt and print each new token with the number of layers it used.

    python -m src.generate 'prompt="What is 12 + 30?"'                             # base SmolLM2 (all layers)
    python -m src.generate ckpt_path=outputs/train/runs/<run> max_new_tokens=48    # a FlexiDepth checkpoint
    python -m src.generate model=tiny_llama ckpt_path=<flexidepth folder> chat=false 'prompt="Once upon a time"'

Output (without colours): `The[30/30] answer[24/30] is[21/30] ...`, then one summary line. Quote the
prompt for Hydra when it holds spaces or symbols: `'prompt="..."'`. Config: conf/generate.yaml (model,
ckpt_path, prompt, chat, max_new_tokens, do_sample/temperature/top_p/seed, tau, color, device).
"""

from __future__ import annotations

import sys
from typing import TextIO

from omegaconf import DictConfig

from .config import register
from .config.commands import GenerateCommand
from .config.run_model import adopt_run_model
from .config.schemas import load
from .flexidepth.generation import GenerationOutput
from .utils.cli import hydra_command
from .utils.errors import ConfigError

register()  # resolvers and typed schemas, before Hydra composes this command's config


def check_prompt_length(prompt_tokens: int, max_new_tokens: int, config) -> None:
    """ConfigError naming `prompt` when the prompt (plus the tokens asked for) does not fit the model's
    position window (`max_position_embeddings`); positions past it were never trained."""
    window = getattr(config, "max_position_embeddings", None)
    if not isinstance(window, int):
        return
    if prompt_tokens >= window:
        raise ConfigError(
            f"prompt is {prompt_tokens} tokens, longer than the model's position window "
            f"(max_position_embeddings={window}); shorten the prompt"
        )
    if prompt_tokens + max_new_tokens > window:
        raise ConfigError(
            f"prompt ({prompt_tokens} tokens) + max_new_tokens={max_new_tokens} exceeds the model's position "
            f"window (max_position_embeddings={window}); lower max_new_tokens to <= {window - prompt_tokens}"
        )


def run(cfg: DictConfig, file: TextIO | None = None) -> GenerationOutput:
    """Convert the config once into its settings (`GenerateCommand`) and check them (`check`: the prompt,
    the sampling arguments, tau, the device, the checkpoint against the model; ConfigError / PreflightError
    naming the key), then load the model (and checkpoint) and generate from the prompt while printing to
    `file` (stdout)."""
    from .flexidepth import set_tau
    from .flexidepth.checkpoint import resolve_checkpoint
    from .flexidepth.generation import generate
    from .methods import build_method, checkpoint_method
    from .models.loader import load_base_model
    from .models.tokenizer import chat_prompt, load_tokenizer
    from .render.streamer import LayerStreamer
    from .utils.hardware import resolve_device

    file = file if file is not None else sys.stdout
    adopt_run_model(cfg)  # ckpt_path=<run>: the run's model, unless model= is given
    s = load(cfg, GenerateCommand)
    s.check()  # before any model work
    device = resolve_device(s.device)
    model = load_base_model(s.model).eval()
    tokenizer = load_tokenizer(s.model)
    ckpt = resolve_checkpoint(s.ckpt_path)
    routed: list[int] = []
    if ckpt is not None:
        build_method({"name": checkpoint_method(ckpt)}).apply(model, ckpt=ckpt)  # flexidepth or mindskip
        routed = list(model.flexidepth.layer_indices)
        if s.tau is not None:
            set_tau(model, s.tau)
    model.to(device)
    num_layers = model.config.num_hidden_layers

    text = chat_prompt(tokenizer, s.prompt) if s.chat else s.prompt
    # a chat template already holds its special tokens; plain text gets the tokenizer's usual BOS
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not s.chat)
    check_prompt_length(enc["input_ids"].shape[1], s.max_new_tokens, model.config)
    routing = f"checkpoint {ckpt}, routed layers {routed}" if ckpt else "base model, routing off"
    file.write(f"# {s.model.name_or_path}: {num_layers} layers; {routing}\n")
    file.write(f"# prompt: {s.prompt!r}\n")
    streamer = LayerStreamer(
        tokenizer, num_layers, file=file, color=s.color, min_layers=num_layers - len(routed)
    )
    return generate(
        model,
        tokenizer,
        enc["input_ids"],
        enc["attention_mask"],
        max_new_tokens=s.max_new_tokens,
        do_sample=s.do_sample,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        streamer=streamer,
    )


@hydra_command("generate")  # this command writes nothing, so a failure has nothing to delete
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
