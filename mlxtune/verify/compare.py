"""What a hop is compared on: the rendered prompt (byte for byte), the end of turn (declared and obeyed), the
teacher-forced next tokens and loss on the reference answers, and free-running greedy replies."""

from __future__ import annotations

import difflib

import numpy as np

REPLY_MARKER = "\x01REPLY\x01"


def end_of_turn(tokenizer, template: str | None) -> dict:
    """What ends an assistant turn in training's rendering: the text the template writes after a reply (up to its
    whitespace) and its special-token ids. A plain-text run ends on the EOS token training appended."""
    if template is None:
        eos = tokenizer.eos_token_id
        return {"text": tokenizer.eos_token or "", "ids": [eos] if eos is not None else []}
    from mlxtune.data.template import render_chat

    with_reply = render_chat(tokenizer, [{"role": "user", "content": "x"},
                                         {"role": "assistant", "content": REPLY_MARKER}], template)
    after = with_reply.split(REPLY_MARKER, 1)[1].strip() if REPLY_MARKER in with_reply else ""
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    # Chat markers are often added tokens flagged special without being listed among the special tokens.
    special |= {i for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()
                if getattr(t, "special", False)}
    ids = [t for t in tokenizer.encode(after, add_special_tokens=False) if t in special] if after else []
    return {"text": after, "ids": ids}


def rendering_difference(expected: str, actual: str) -> dict:
    """Where two prompt texts part, with a little context, and a line diff."""
    position = next((i for i, (a, b) in enumerate(zip(expected, actual)) if a != b), min(len(expected), len(actual)))
    start = max(0, position - 30)
    diff = list(difflib.unified_diff(expected.splitlines(keepends=True), actual.splitlines(keepends=True),
                                     "training", "hop", n=1, lineterm=""))
    return {"position": position, "training": expected[start:position + 30], "hop": actual[start:position + 30],
            "diff": "".join(line if line.endswith("\n") else line + "\n" for line in diff[:40])}


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def teacher_forced(examples, reference: list[np.ndarray], hop: list[np.ndarray]) -> dict:
    """On each supervised token (predicted from the tokens before it): does the hop's top token equal the
    reference's, the loss of each, and the largest log-probability difference."""
    agree = total = 0
    loss_reference = loss_hop = 0.0
    largest = 0.0
    for example, ref_logits, hop_logits in zip(examples, reference, hop):
        targets = np.nonzero(example.supervised)[0]
        targets = targets[targets > 0]
        if not len(targets):
            continue
        ref_lp, hop_lp = _log_softmax(ref_logits[targets - 1]), _log_softmax(hop_logits[targets - 1])
        agree += int((ref_lp.argmax(-1) == hop_lp.argmax(-1)).sum())
        total += len(targets)
        ids = example.ids[targets]
        loss_reference -= float(ref_lp[np.arange(len(ids)), ids].sum())
        loss_hop -= float(hop_lp[np.arange(len(ids)), ids].sum())
        largest = max(largest, float(np.abs(ref_lp - hop_lp).max()))
    if not total:
        return {"tokens": 0, "agreement": None, "loss_reference": None, "loss": None, "loss_delta": None,
                "max_logprob_diff": None}
    return {"tokens": total, "agreement": agree / total, "loss_reference": loss_reference / total,
            "loss": loss_hop / total, "loss_delta": (loss_hop - loss_reference) / total, "max_logprob_diff": largest}


def greedy_agreement(probe: str, reference, hop, decode) -> tuple[float, dict | None]:
    """The share of the reference's greedy reply the hop reproduces before the two part (1.0: the same reply,
    ending the same way), and where they part (None when they don't). Tokens where the hop gives them, else text."""
    if reference.tokens is not None and hop.tokens is not None:
        ours, theirs, show = reference.tokens, hop.tokens, decode
    else:  # text from a server: bytes that are no UTF-8 character (U+FFFD) are left out on both sides, since a
        # streaming detokenizer emits them differently from a whole decode (and holds back one cut off at the end)
        ours, theirs = reference.text.replace("\ufffd", ""), hop.text.replace("\ufffd", "")
        show = lambda piece: piece  # noqa: E731
    if ours == theirs and reference.stopped == hop.stopped:
        return 1.0, None
    position = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    unit = "token" if show is decode else "char"

    def rest(items, stopped):
        return show(items[position:position + 8]) + (" ⏹" if stopped and len(items) - position <= 8 else "")

    return position / max(len(ours), len(theirs), 1), {
        "probe": probe, unit: position, "agreed": show(ours[:position])[-40:],
        "reference": rest(ours, reference.stopped), "hop": rest(theirs, hop.stopped)}


def finetune_kept(loss_base: float | None, forced: dict) -> float | None:
    """The share of the finetune's loss gain (base → reference, on the supervised tokens) the hop keeps; None when
    the finetune gained too little on these tokens for a share to mean anything (under 0.01 nats per token)."""
    if loss_base is None or forced.get("loss") is None:
        return None
    gain = loss_base - forced["loss_reference"]
    return (loss_base - forced["loss"]) / gain if gain > 0.01 else None
