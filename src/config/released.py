"""The released two-stage recipe's skip-loss weight in this framework's normalisation.

The release's README gives alpha = 1e-4 (stage 1) and 1e-5 (stage 2), trained with the Hugging Face Trainer on
8 GPUs. Our skip loss is an exact global per-token mean, independent of accumulation and world size. Under
the reading of the released trainer in docs/released-differences.md ("Skip-loss weight"), the trainer
multiplies the model's whole loss by the number of processes (to undo its cross-device token averaging of the
LM loss), so a penalty added inside the model's forward acts like ``processes x alpha`` in our units. That
reading could not be checked against the released model's own forward, so the experiment configs offer both
values and the training entry point says which one it uses (`report_alpha`):

    released_alpha:
      face_value: 1.0e-4     # the README's number
      processes: 8           # the released run's world size
      use: reproduce         # reproduce (= face_value x processes) | face (= face_value)
    loss:
      alpha: ${released_alpha:${released_alpha.face_value},${released_alpha.processes},${released_alpha.use}}
"""

from __future__ import annotations

USES = ("reproduce", "face")
KEY = "released_alpha"


def released_alpha(face_value: float, processes: int, use: str) -> float:
    """The skip-loss weight in our normalisation for a released alpha (the ``${released_alpha:...}`` resolver).

    Args:
        face_value: The alpha the release states (its README), >= 0.
        processes: Number of training processes (GPUs) of the released run, >= 1.
        use: ``"reproduce"``: ``face_value * processes`` (the released behaviour under our reading of its
            trainer, docs/released-differences.md); ``"face"``: ``face_value`` unchanged.

    Returns:
        The alpha to use, a float.

    Raises:
        ValueError: On a ``use`` outside `USES`, a negative face value or fewer than 1 process; the message
            names the ``released_alpha.*`` key.
    """
    face_value, processes = float(face_value), int(processes)
    if use not in USES:
        raise ValueError(f"{KEY}.use must be one of {list(USES)}, got {use!r}")
    if face_value < 0:
        raise ValueError(f"{KEY}.face_value must be >= 0, got {face_value}")
    if processes < 1:
        raise ValueError(f"{KEY}.processes must be >= 1, got {processes}")
    return face_value * processes if use == "reproduce" else face_value


def describe_alpha(block: dict | None, alpha: float) -> str | None:
    """One line saying which alpha a run with a ``released_alpha`` block uses, or None without one.

    Args:
        block: the ``released_alpha`` block ({face_value, processes, use}) or None.
        alpha: the run's ``loss.alpha`` (a ``skip.alpha`` given is already translated into it).

    Raises:
        ValueError: If ``alpha`` does not equal the value the block selects (the block would then be
            misleading, e.g. after a command-line ``loss.alpha=...`` override).
    """
    if block is None:
        return None
    face, processes, use = float(block["face_value"]), int(block["processes"]), str(block["use"])
    chosen = released_alpha(face, processes, use)
    alpha = float(alpha)
    if abs(alpha - chosen) > 1e-12 * max(1.0, abs(chosen)):
        raise ValueError(
            f"loss.alpha={alpha:g} but {KEY}.use={use} selects {chosen:g}; set {KEY}.use (or "
            f"{KEY}.face_value) instead of overriding loss.alpha, or remove the {KEY} block"
        )
    other = released_alpha(face, processes, "face" if use == "reproduce" else "reproduce")
    if use == "reproduce":
        return (
            f"loss.alpha={chosen:g}: {KEY}.use=reproduce, the released alpha {face:g} x {processes} processes "
            f"(its trainer scales the model loss by the world size; an inference, see "
            f"docs/released-differences.md). Face value: {KEY}.use=face -> {other:g}."
        )
    return (
        f"loss.alpha={chosen:g}: {KEY}.use=face, the released README's value taken as is. If the released "
        f"trainer scaled the skip term by its {processes} processes (docs/released-differences.md), the "
        f"released behaviour is {KEY}.use=reproduce -> {other:g}."
    )


def report_alpha(block: dict | None, alpha: float) -> str | None:
    """Print (and return) `describe_alpha`'s line; called by `src.train` before anything heavy is loaded."""
    line = describe_alpha(block, alpha)
    if line is not None:
        print(line, flush=True)
    return line
