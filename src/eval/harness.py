"""lm-evaluation-harness integration: run a (FlexiDepth-injected or plain) HF causal LM on lm_eval tasks and
record how many layers it used, per task.

    from src.eval.harness_run import run_harness                                    # the run: harness_run.py
    out = run_harness(model, tokenizer, ["hellaswag", "winogrande"], num_fewshot=5)   # hub data: internet
    out["hellaswag"]["score"], out["hellaswag"]["layers_used_mean"]

    include = write_local_tasks(tmp)                                                # offline, project data
    out = run_harness(model, tokenizer, ["flexidepth_mc", "flexidepth_gen"], include_path=include, limit=8)

The model wrapper, `FlexiDepthLM` (registered in lm_eval as ``"flexidepth"`` by `harness_run.register`, when
a run starts), implements lm_eval's three
request types:
- ``loglikelihood``: left-padded batched forwards (longest first; LM head only over the continuation
  positions); sum of the continuation tokens' log-softmax and whether greedy decoding would produce them.
  Inputs longer than `max_length` lose their left end, as in lm_eval's HF model.
- ``loglikelihood_rolling``: the document split into lm_eval's disjoint rolling windows
  (`lm_eval.utils.get_rolling_token_windows`, prefix token = BOS, else EOS), each scored as above, summed.
- ``generate_until``: `src.flexidepth.generation.generate` (greedy unless the task asks for sampling) over
  left-padded prompts truncated to `max_length - max_gen_toks`, stopping at EOS or after `max_gen_toks`; the
  text is cut at the first ``until`` string. `generate` knows EOS only, so a batch runs until every row
  hit EOS or `max_gen_toks`; tokens after a stop string are discarded and are not counted in the stats.

Routed models (injected and `any(layer.routing ...)`) are scored with `routed_forward`, so the layers
counted are the layers the fast path really ran; plain models (or routing off) go through `model(...)` and
use every layer. Tokenisation follows lm_eval's HF model: the tokenizer's own special tokens (none are added
to a string that already starts with the BOS text), context/continuation split by encoding both and the
whole, trailing context spaces moved into the continuation. Where the tokenizer merges the end of the context
with the start of the continuation (``"hello wor"`` + ``"ld"``), lm_eval's split would leave the continuation
without tokens (or misaligned); the split then moves back to the last token the context and the whole share,
so the merged token is scored as part of the continuation (a warning says so). A continuation that is truly
empty, or longer than `max_length` on its own, is an error naming the request.

Request parameters are read as lm_eval's HF model reads them, with explicit defaults (a 0 is a value, not
"missing"): ``max_gen_toks`` (aliases ``max_new_tokens``, ``max_tokens``, ``max_completion_tokens``; 0 gives
empty generations), ``do_sample`` (unset: sample iff temperature > 0), ``temperature`` (0: greedy),
``top_p`` (0: the top token), ``until``. Any other generation keyword (``top_k``, ``num_beams`` ...) is
refused unless it has its neutral value, since `generate` cannot honour it. Sampled requests run one at a
time with the wrapper's seed, so a result never depends on which requests share its batch; an empty
generation context is conditioned on the prefix token (BOS, else EOS), as an empty log-likelihood context.

Route statistics (`RouteStats`) are kept per task (`Instance.task_name`) and request type:
- ``tokens`` / ``layers_used_mean``: every position the model processed (forward inputs: loglikelihood
  contexts + continuations minus the last token; generation prompts plus the generated tokens fed back,
  up to the stop point) and the mean layers used over them (unrouted layers + routed layers that ran);
- ``output_tokens`` / ``layers_used_output_mean``: the positions whose next-token prediction is the task's
  output, i.e. the scored continuation tokens, or each generated token (layers of the forward that
  produced it, as in `GenerationOutput.layers_used`).

Per-task attribution: lm_eval sends the requests of all tasks mixed (and batched together here); every
Instance carries its task name, so each request's tokens are credited to its own task. A token's route
depends only on that sequence (padding is masked and excluded), so batching tasks together does not change
the numbers. `run_harness` therefore needs a single `simple_evaluate` call; a group (e.g. ``mmlu``) or a
tag gets the sum over its leaf tasks, which are also reported under ``"subtasks"``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM

from src.data.batching import pad_batch
from src.flexidepth.generation import generate
from src.flexidepth.inject import routing_active
from src.flexidepth.routes import routed_forward
from src.models.tokenizer import pad_token_id as tokenizer_pad_id
from src.utils.errors import ConfigError

from .lm_requests import REQUEST_TYPES, RouteStats, generation_settings

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- the LM
def check_harness_tokenizer(tokenizer) -> None:
    """ConfigError naming model.tokenizer when the tokenizer has no EOS token: the harness ends generations
    at EOS and conditions an empty context on BOS, else EOS."""
    if getattr(tokenizer, "eos_token_id", None) is None:
        bos = "and no BOS token " if getattr(tokenizer, "bos_token_id", None) is None else ""
        raise ConfigError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token {bos}(eos_token_id "
            "is None), which the lm-eval harness tasks need to end generations and to condition an empty "
            "context: set model.tokenizer to a tokenizer with an EOS token, or leave lm-eval tasks out of "
            "eval.tasks"
        )


class FlexiDepthLM(TemplateLM):
    """lm_eval model wrapping an in-memory HF causal LM, FlexiDepth-injected or not.

    Args:
        model: the causal LM (put in eval mode; moved to `device` when given).
        tokenizer: its HF tokenizer.
        batch_size: sequences per forward / per generation batch.
        max_length: longest input in tokens; default `model.config.max_position_embeddings` (else 2048).
        device: where to run; default the model's device.
        max_gen_toks: generation length when a task sets none (lm_eval's HF default: 256).
        seed: sampling seed for tasks that ask for ``do_sample``.
        max_batch_size: ignored (lm_eval passes it; there is no automatic batch size).

    Registered as lm_eval model ``"flexidepth"``; it wraps objects, so build it with
    ``get_model("flexidepth").create_from_arg_obj({"model": model, "tokenizer": tokenizer})`` or pass an
    instance to `simple_evaluate`, not a command-line ``--model_args`` string.

    `stats[task][request_type]` accumulates `RouteStats` over every call; `reset_stats()` clears them.
    """

    def __init__(
        self,
        model,
        tokenizer,
        batch_size: int = 8,
        max_length: int | None = None,
        device: str | torch.device | None = None,
        max_gen_toks: int = 256,
        seed: int = 1234,
        max_batch_size: int | None = None,
    ):
        super().__init__()
        del max_batch_size  # accepted because lm_eval's simple_evaluate passes it; batch sizes are fixed
        if (
            isinstance(batch_size, str) and batch_size.strip().isdigit()
        ):  # lm_eval's command line gives strings
            batch_size = int(batch_size)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"batch_size must be an integer >= 1 (no automatic batch size), got {batch_size!r}"
            )
        if max_length is not None and (not isinstance(max_length, int) or max_length < 2):
            raise ValueError(f"max_length must be None (the model's) or an integer >= 2, got {max_length!r}")
        if isinstance(max_gen_toks, bool) or not isinstance(max_gen_toks, int) or max_gen_toks < 0:
            raise ValueError(f"max_gen_toks must be an integer >= 0, got {max_gen_toks!r}")
        check_harness_tokenizer(tokenizer)
        if device is not None:
            model.to(device)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = int(batch_size)
        self._max_length = None if max_length is None else int(max_length)
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.num_layers = int(model.config.num_hidden_layers)
        self.stats: dict[str, dict[str, RouteStats]] = {}

    # ------------------------------------------------------------------ properties
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """Conditioning token for an empty context (loglikelihood, rolling windows): BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def pad_token_id(self) -> int:
        """The padding id (`src.models.tokenizer.pad_token_id`: pad, else EOS, else 0)."""
        return tokenizer_pad_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        if self._max_length is not None:
            return self._max_length
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def routed(self) -> bool:
        """True when the model is injected and at least one FlexiDepth layer routes (`routing_active`)."""
        return routing_active(self.model)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        self.stats = {}

    def _stats(self, task: str | None, reqtype: str) -> RouteStats:
        return self.stats.setdefault(str(task), {}).setdefault(reqtype, RouteStats())

    def task_stats(self, tasks: list[str] | None = None) -> RouteStats:
        """Sum over request types of the given tasks (all tasks when None)."""
        total = RouteStats()
        for task, by_type in self.stats.items():
            if tasks is None or task in tasks:
                for stats in by_type.values():
                    total += stats
        return total

    # ------------------------------------------------------------------ tokenisation
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids of `string`; special tokens as the tokenizer adds them, unless it starts with BOS text."""
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            add_special_tokens = not (bos and string.startswith(bos))
        return self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError(
                "eval.harness.apply_chat_template=true but the tokenizer "
                f"{getattr(self.tokenizer, 'name_or_path', '')!r} has no chat template; set it to false"
            )
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) for a non-empty context, lm_eval's causal split made safe.

        As lm_eval: trailing context whitespace moves to the continuation, and both come from encoding the
        whole text and the context. The split point is the number of leading tokens the two encodings share:
        lm_eval's `len(context ids)` whenever the context's tokens are a prefix of the whole's, and earlier
        when the tokenizer merged the context's end with the continuation's start, so that the continuation
        keeps the merged token instead of losing it.
        """
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tok_encode(context + continuation)
        ctx = self.tok_encode(context)
        shared = 0
        for a, b in zip(ctx, whole, strict=False):
            if a != b:
                break
            shared += 1
        if shared < len(ctx):
            self._boundary_merges = getattr(self, "_boundary_merges", 0) + 1
            warn = log.warning if self._boundary_merges <= 3 else log.debug  # the first few, then quietly
            warn(
                "context %r and continuation %r share a token at their boundary: the continuation is scored "
                "from token %d of the context (%d context tokens kept)",
                context[-20:],
                continuation[:20],
                shared,
                shared,
            )
        if shared == 0:  # the whole context merged into the continuation: condition on the prefix token
            return [self.prefix_token_id], whole
        return whole[:shared], whole[shared:]

    def _encode_request(
        self, context: str, continuation: str, where: str = "request"
    ) -> tuple[list[int], list[int]]:
        """Token ids of a log-likelihood request; ValueError naming `where` if the continuation has none."""
        if not isinstance(context, str) or not isinstance(continuation, str):
            raise ValueError(
                f"{where}: context and continuation must be strings, got {context!r}, {continuation!r}"
            )
        if context:
            ctx, cont = self._encode_pair(context, continuation)
        else:
            cont = self.tok_encode(continuation, add_special_tokens=False)
            if cont and cont[0] == self.prefix_token_id:  # the text starts with the prefix token itself
                ctx, cont = cont[:1], cont[1:]
            else:
                ctx = [self.prefix_token_id]
        if not cont:
            raise ValueError(
                f"{where}: the continuation {continuation!r} encodes to no token, so it has no log-likelihood "
                f"(context ends with {context[-30:]!r})"
            )
        if len(cont) > self.max_length:
            raise ValueError(
                f"{where}: the continuation has {len(cont)} tokens, more than max_length={self.max_length}; "
                "it cannot be scored in one window"
            )
        return ctx, cont

    # ------------------------------------------------------------------ forwards
    def _forward(self, seqs: list[list[int]], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded forward of `seqs`, logits of the last `keep` positions only.

        Returns (logits [B, keep, V], layers used [B, T] fp64, 0 on padding). Left padding lines every
        sequence's end up in the last column, so one `logits_to_keep` covers every row's continuation
        (the LM head over all positions is the largest cost at a large vocabulary). Positions are
        `cumsum(mask) - 1`, as in `generate`.
        """
        ids, mask = pad_batch(seqs, self.pad_token_id, side="left")
        ids, mask = ids.to(self._device), mask.to(self._device)
        position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
        kwargs = {"position_ids": position_ids, "logits_to_keep": max(int(keep), 1), "use_cache": False}
        with torch.inference_mode():
            if self.routed:
                out = routed_forward(self.model, ids, mask, **kwargs)
                if out.routes is not None:
                    return out.logits, out.routes.layers_used.double()
                logits = out.logits
            else:
                logits = self.model(input_ids=ids, attention_mask=mask, **kwargs).logits
        return logits, mask.double() * self.num_layers

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        tasks: list[str | None] | None = None,
        reqtype: str = "loglikelihood",
        **kwargs,
    ) -> list[tuple[float, bool]]:
        """Score (context ids, continuation ids) pairs; credits tokens to `tasks[i]` under `reqtype`."""
        tasks = tasks if tasks is not None else [None] * len(requests)
        inputs, conts = [], []
        for _, context, continuation in requests:
            whole = (context + continuation)[-(self.max_length + 1) :]
            inputs.append(whole[:-1])
            n_cont = min(len(continuation), len(whole) - 1)  # truncation may cut into the continuation
            conts.append(continuation[len(continuation) - n_cont :])
        order = sorted(range(len(requests)), key=lambda i: -len(inputs[i]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            keep = max(len(conts[i]) for i in idx)
            logits, used = self._forward([inputs[i] for i in idx], keep)
            used = used.cpu()
            for row, i in enumerate(idx):
                length, n_cont = len(inputs[i]), len(conts[i])
                target = torch.tensor(conts[i], dtype=torch.long, device=logits.device)
                logp = F.log_softmax(logits[row, logits.shape[1] - n_cont :].float(), dim=-1)
                score = float(logp.gather(-1, target[:, None]).sum()) if n_cont else 0.0
                greedy = bool((logp.argmax(-1) == target).all()) if n_cont else True
                results[i] = (score, greedy)
                stats = self._stats(tasks[i], reqtype)
                stats.tokens += length
                stats.layers_sum += float(used[row].sum())
                stats.output_tokens += n_cont
                stats.output_layers_sum += float(used[row, used.shape[1] - n_cont :].sum())
                if reqtype == "loglikelihood":
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ request types
    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log P(continuation | context), is_greedy) for each request's (context, continuation)."""
        encoded, tasks = [], []
        for req in requests:
            context, continuation = req.args
            where = f"loglikelihood request (task {req.task_name}, doc {req.doc_id})"
            encoded.append(((context, continuation), *self._encode_request(context, continuation, where)))
            tasks.append(req.task_name)
            self._stats(req.task_name, "loglikelihood").requests += 1
        return self._loglikelihood_tokens(encoded, tasks=tasks, reqtype="loglikelihood")

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole string, scored over lm_eval's disjoint rolling windows."""
        windows, owners, tasks = [], [], []
        for n, req in enumerate(requests):
            (string,) = req.args
            self._stats(req.task_name, "loglikelihood_rolling").requests += 1
            for context, continuation in map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append(((string, ""), context, continuation))
                owners.append(n)
                tasks.append(req.task_name)
        scores = self._loglikelihood_tokens(windows, tasks=tasks, reqtype="loglikelihood_rolling")
        totals = [0.0] * len(requests)
        for owner, (score, _) in zip(owners, scores, strict=True):
            totals[owner] += score
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, if asked, sampled) continuation of each context, cut at its first ``until`` string."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one batch never mixes generation settings
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        for idxs in groups.values():
            first = requests[idxs[0]]
            where = f"generate_until request (task {first.task_name}, doc {first.doc_id})"
            settings = self._gen_settings(first.args[1], where)
            max_ctx = self.max_length - settings["max_gen_toks"]
            if max_ctx <= 0:
                raise ValueError(
                    f"max_gen_toks={settings['max_gen_toks']} leaves no room for a prompt in "
                    f"max_length={self.max_length}"
                )
            prompts = {i: self._gen_prompt(requests[i].args[0])[-max_ctx:] for i in idxs}
            order = sorted(idxs, key=lambda i: -len(prompts[i]))
            # sampled: one request per batch, so its draws never depend on the other rows of a batch
            step = 1 if settings["do_sample"] else self.batch_size
            for start in range(0, len(order), step):
                batch = order[start : start + step]
                texts = self._generate_batch(
                    [prompts[i] for i in batch], [requests[i] for i in batch], settings
                )
                for i, text in zip(batch, texts, strict=True):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results  # type: ignore[return-value]

    def _gen_prompt(self, context: str) -> list[int]:
        """Prompt ids of a generation context; an empty one is the prefix token (BOS, else EOS)."""
        ids = self.tok_encode(context)
        return ids if ids else [self.prefix_token_id]

    def _gen_settings(self, gen_kwargs: dict | None, where: str = "generate_until request") -> dict[str, Any]:
        """Generation settings of a request (`generation_settings`, lm_requests.py); ValueError naming `where`."""
        eos_text = self.tokenizer.decode([self.eot_token_id]) if self.eot_token_id is not None else None
        return generation_settings(gen_kwargs, eos_text, self.max_gen_toks, where)

    def _generate_batch(self, prompts: list[list[int]], reqs: list[Instance], settings: dict) -> list[str]:
        if settings["max_gen_toks"] <= 0:
            for req in reqs:
                self._stats(req.task_name, "generate_until").requests += 1
            return [""] * len(reqs)
        ids, mask = pad_batch(prompts, self.pad_token_id, side="left")  # left padding, as `generate` expects
        out = generate(
            self.model,
            self.tokenizer,
            ids,
            mask,
            max_new_tokens=settings["max_gen_toks"],
            do_sample=settings["do_sample"],
            temperature=settings["temperature"],
            top_p=settings["top_p"],
            eos_token_id=self.eot_token_id,
            pad_token_id=self.pad_token_id,
            seed=self.seed,
        )
        gen_used = out.layers_used.double().cpu()
        prompt_used = (
            out.prefill.layers_used.double().sum(-1).cpu()
            if out.prefill is not None
            else mask.sum(-1).double() * self.num_layers
        )
        texts = []
        for row, req in enumerate(reqs):
            n_valid = int(out.valid[row].sum())
            tokens = out.new_tokens[row, :n_valid].tolist()
            text, kept = self._cut_at_stop(tokens, settings["until"])
            texts.append(text)
            stats = self._stats(req.task_name, "generate_until")
            stats.requests += 1
            # processed: the prompt, then generated tokens 0 .. kept-2 fed back to produce 1 .. kept-1
            stats.tokens += len(prompts[row]) + max(kept - 1, 0)
            stats.layers_sum += float(prompt_used[row]) + float(gen_used[row, 1:kept].sum())
            stats.output_tokens += kept
            stats.output_layers_sum += float(gen_used[row, :kept].sum())
        return texts

    def _cut_at_stop(self, tokens: list[int], stops: list[str]) -> tuple[str, int]:
        """(text before the first stop string, number of tokens generated up to where it completed)."""
        text = self.tok_decode(tokens)
        cuts = [text.find(s) for s in stops if s in text]
        if not cuts:
            return text, len(tokens)
        lo, hi = 1, len(tokens)  # fewest tokens whose text already holds a stop string
        while lo < hi:
            mid = (lo + hi) // 2
            prefix = self.tok_decode(tokens[:mid])
            if any(s in prefix for s in stops):
                hi = mid
            else:
                lo = mid + 1
        return text[: min(cuts)], lo


__all__ = ["FlexiDepthLM", "REQUEST_TYPES", "RouteStats"]
