"""Measured speed of a trained checkpoint against its base model and really pruned static baselines, with
the held-out perplexity of every system: the speed-quality plane a deployment sees.

    python -m src.speed ckpt_path=outputs/train/runs/<run>                       # conf/speed.yaml
    python -m src.speed ckpt_path=<run> 'taus=[0.3,0.5,0.7]' prompts=2 new_tokens=16 rounds=3 batch=0

Systems, all built in one process from one base model (weights shared, not copied):
  base              the base model (ratio 1.0)
  flexidepth@<tau>  the checkpoint at each threshold of `taus` (its fast path: real skipping)
  <run>             a layer_replacement checkpoint (ckpt_path or more_ckpts trained with method=layer_replacement,
                    the static baseline in the manner of LLM-Streamline): its replaced layers take the adapter
                    for every token (no router, no attention, no K/V); one point, no threshold
  shortgpt_k<k>     ShortGPT with k layers *deleted* (the registry's shortgpt with `prune`: no router, no K/V,
                    no call for them; the KV cache holds only the kept layers): what a user deploying it runs

Timings (one intra-op thread by default), after `warmup` untimed rounds, `rounds` timed rounds, by wall time
and by process CPU time (CPU time excludes what other processes on a shared machine took from us):
  decode at batch 1 (each prompt alone) and at `batch` rows (prompts cycled), in lockstep: every system
      decodes the same prompt with its own KV cache and step t of every system runs before step t + 1 of
      any (a fresh seeded order every step), so a machine whose speed drifts over seconds slows all
      systems alike; only the decode steps are timed (the prefill before them is not); tokens/s =
      rows * new_tokens / seconds;
  prefill at batch 1 over `prefill_length` tokens, interleaved (every system once per round, the order
      rotating): tokens/s = prefill_length / seconds.
Ratios are the median over rounds of base seconds / system seconds of the same round (paired); our loop
itself is timed against HF `generate` on the base model (`loop_vs_hf`), so each ratio can also be read
against HF's loop. FLOP-ideal = base MACs / system MACs per token (src/flexidepth/flops.py; a deleted
layer costs 0, FlexiDepth counts K/V, router and adapter of a skipped layer) at the layers the system
skipped on the timed generated tokens.

Prompts and the prefill text are windows of held-out text (src/data/mixture.py HELDOUT_SETS, never
trained on). Held-out perplexity per set reuses the curves code of src.compare (src/eval/curves.py).
The comparison at equal measured speedup interpolates FlexiDepth's perplexity (log-linear) along its
curve of (measured batch-1 decode speedup, ppl) at each static point's speedup (ShortGPT, layer replacement); outside the range its
taus reach there is no value (never extrapolated); a second table lists, per ShortGPT point, the best
FlexiDepth point measured at least as fast (no interpolation; `faster_and_better`). A router skips more on some text than on other text, so
with `per_set_speed=true` batch-1 decode is also timed on each held-out set's own prompts
(`decode_b1@<set>`) and each set is compared at the speedups measured on its own prompts. Greedy
continuations are not the text the perplexity scores (a small model's greedy text repeats itself, and the
router treats repeated tokens differently), so with `text_decode=true` (the default) each set's own text is
also decoded teacher-forced, one token per step with the KV cache (`text_b1@<set>`): the same per-token work
as generation, on the set's own text (the last `new_tokens` of the first windows of `prompt_length` +
`new_tokens` tokens of its documents; the perplexity scores `ppl_max_length`-token windows of the same
documents, so the contexts, and with them the routes, differ: compare the layers skipped of both). The
comparison at equal speedup is given on both bases.

Writes <output_dir>/speed.json, speed.md and ppl_vs_speedup.png (one panel per held-out set). The measurement is
src/eval/speed.py (+ speed_timing.py), the drawing src/render/speed.py.
"""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig

from .config import register
from .config.commands import SpeedCommand
from .config.run_model import adopt_run_model
from .config.schemas import load
from .eval.speed import run_speed
from .render.speed import speed_markdown
from .utils.cli import hydra_command
from .utils.outputs import replacing

log = logging.getLogger(__name__)
register()  # resolvers and typed schemas, before Hydra composes this command's config


@hydra_command("speed", writes_folder=True)
def main(cfg: DictConfig) -> None:
    adopt_run_model(cfg)  # ckpt_path=<run>: the run's model, unless model= is given
    s = load(cfg, SpeedCommand)
    s.check()  # refuses an occupied output folder unless overwrite=true
    out = Path(s.paths.output_dir)
    with replacing(out, "speed"):  # an earlier speed.json / speed.md / figure replaced as one unit
        results = run_speed(s, out)
    print(speed_markdown(results))
    figure = ", ppl_vs_speedup.png" if results["heldout"] else ""
    log.info("speed: %s (speed.md, speed.json%s)", out, figure)


if __name__ == "__main__":
    main()
