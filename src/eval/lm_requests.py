"""The bookkeeping of the lm-eval wrapper (harness.py): route statistics per task and request type
(`RouteStats`) and the generation settings of a request (`generation_settings`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from src.flexidepth.generation import check_generation_args

REQUEST_TYPES = ("loglikelihood", "loglikelihood_rolling", "generate_until")


@dataclass
class RouteStats:
    """Token counts and summed layers used for one task and request type."""

    requests: int = 0
    tokens: int = 0  # positions processed by the model
    layers_sum: float = 0.0  # sum over those positions of layers used
    output_tokens: int = 0  # scored continuation tokens / generated tokens
    output_layers_sum: float = 0.0  # sum of layers used by the forwards that predicted them

    def __iadd__(self, other: RouteStats) -> RouteStats:
        self.requests += other.requests
        self.tokens += other.tokens
        self.layers_sum += other.layers_sum
        self.output_tokens += other.output_tokens
        self.output_layers_sum += other.output_layers_sum
        return self

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "tokens": self.tokens,
            "layers_used_mean": self.layers_sum / self.tokens if self.tokens else None,
            "output_tokens": self.output_tokens,
            "layers_used_output_mean": (
                self.output_layers_sum / self.output_tokens if self.output_tokens else None
            ),
        }


def generation_settings(
    gen_kwargs: dict | None,
    eos_text: str | None,
    default_max_gen_toks: int,
    where: str = "generate_until request",
) -> dict[str, Any]:
    """The generation settings of an lm_eval request, read as lm_eval's HF model reads them (explicit defaults:
    a 0 is a value); `eos_text` joins the stop strings. ValueError naming `where` and the key for a value the
    model cannot honour.

    Returns {"until": [str], "max_gen_toks": int, "do_sample": bool, "temperature": float, "top_p": float}.
    """
    if gen_kwargs is not None and not isinstance(gen_kwargs, dict):
        raise ValueError(f"{where}: generation kwargs must be a dict, got {gen_kwargs!r}")
    kwargs = dict(gen_kwargs or {})
    until = kwargs.pop("until", None)
    if until is None:
        until = []
    elif isinstance(until, str):
        until = [until]
    elif isinstance(until, list | tuple) and all(isinstance(u, str) for u in until):
        until = list(until)
    else:
        raise ValueError(f"{where}: until must be a string or a list of strings, got {until!r}")
    if eos_text and eos_text not in until:
        until.append(eos_text)
    max_gen = default_max_gen_toks
    for key in ("max_completion_tokens", "max_tokens", "max_new_tokens", "max_gen_toks"):  # last wins
        value = kwargs.pop(key, None)
        if value is not None:
            max_gen = value
    if isinstance(max_gen, bool) or not isinstance(max_gen, int) or max_gen < 0:
        raise ValueError(f"{where}: max_gen_toks must be an integer >= 0, got {max_gen!r}")
    temperature = kwargs.pop("temperature", None)
    temperature = 0.0 if temperature is None else temperature
    do_sample = kwargs.pop("do_sample", None)
    if do_sample is None:
        do_sample = isinstance(temperature, int | float) and temperature > 0
    top_p = kwargs.pop("top_p", None)
    top_p = 1.0 if top_p is None else top_p
    neutral = {"top_k": (None, 0), "num_beams": (None, 1), "repetition_penalty": (None, 1.0)}
    bad = {k: v for k, v in kwargs.items() if k not in neutral or v not in neutral[k]}
    if bad:
        raise ValueError(
            f"{where}: generation kwargs {bad} are not supported by this model (it honours until, "
            "max_gen_toks, do_sample, temperature, top_p)"
        )
    try:
        check_generation_args(max_gen, do_sample, temperature, top_p)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from error
    temperature = float(temperature)
    return {
        "until": [s for s in until if s],
        "max_gen_toks": int(max_gen),
        "do_sample": bool(do_sample) and temperature > 0,  # temperature 0 is greedy
        "temperature": temperature if do_sample and temperature > 0 else 1.0,
        "top_p": float(top_p),
    }
