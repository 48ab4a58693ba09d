"""`mlxtune verify RUN`: does every place the tuned model is handed to render, stop and answer like the model
that was evaluated (base + adapter)? One row per hop, verify.json in the run directory."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mlxtune.data.template import tokenize_record
from mlxtune.errors import UsageError
from mlxtune.runs import VERIFY_FILE, open_run
from mlxtune.train.checkpoint import atomic_write_text
from mlxtune.verify.compare import (end_of_turn, finetune_kept, greedy_agreement, rendering_difference,
                                    teacher_forced)
from mlxtune.verify.hops import Unsupported
from mlxtune.verify.probes import build_probes, feature_probes

HOPS = ("fused", "fused-q8", "fused-q4", "gguf", "ollama", "lmstudio", "serve")
# Re-quantized copies are not something the user has until they make one (`fuse -q`): checked on request
# (`--requantize 8,4`); a q4 copy of a 4-bit base can lose most of a short finetune (docs/VERIFY.md).
REQUANTIZED = {"8": "fused-q8", "4": "fused-q4"}
DEFAULT_HOPS = tuple(h for h in HOPS if h not in REQUANTIZED.values())
MAX_NEW_TOKENS = 32
SAMPLES = 4

# What each kind of hop must keep, measured after short LoRA runs on stories260K and SmolLM2-135M-Instruct
# (docs/VERIFY.md): teacher-forced top-token agreement on the reference answers, |Δ loss| in nats per supervised
# token, the mean share of each greedy reply reproduced before parting, and the share of the finetune's loss gain
# (base → base + adapter) the hop keeps. A hop that computes in float32 as the reference does matches exactly;
# rounded weights (half precision, 8 bits) move near-ties, so their greedy replies may part from the reference's.
# 4 bits move the top token itself on small models (stories260K, width 64: 71% agreement while 90% of the
# finetune's gain survives), so a q4 hop is judged on the gain it keeps; its agreement is shown, not judged.
THRESHOLDS = {
    "exact": {"agreement": 1.0, "loss_delta": 1e-4, "greedy": 1.0},
    "f32": {"agreement": 0.99, "loss_delta": 1e-3, "greedy": 0.9},
    "half": {"agreement": 0.9, "loss_delta": 1e-2, "greedy": 0.3},
    "q8": {"agreement": 0.9, "loss_delta": 2e-2, "greedy": 0.25},
    "q4": {"kept": 0.75},
}


@dataclass
class HopResult:
    name: str
    source: str
    template: str  # which template the hop renders with, in words
    precision: str  # the threshold class: exact | f32 | half | q8 | q4
    rendering: dict  # {"ok", "detail", "difference"?}
    stopping: dict  # {"ok", "detail"}
    teacher_forced: dict | None  # agreement, losses, loss_delta, kept (share of the finetune's gain), ...
    # {"same": identical replies, "probes", "prefix": mean share agreed before parting, "first_divergence"}
    greedy: dict
    thresholds: dict
    # feature probe name ("tool call", "thinking on", ...) → {"status": same | differs | unsupported, "detail"}
    features: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


@dataclass
class VerifyResult:
    run: str
    checkpoint: str
    template: str
    end_of_turn: dict
    probes: list[str]
    hops: list[HopResult]
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    files: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(hop.ok for hop in self.hops)

    def to_dict(self) -> dict:
        return {**{k: v for k, v in asdict(self).items() if k != "hops"}, "ok": self.ok,
                "hops": [hop.to_dict() for hop in self.hops]}


@dataclass
class _Reference:
    probes: list
    rendered: list
    generations: list
    examples: list  # TokenizedExample, teacher-forced
    logits: list
    end_of_turn: dict
    features: list  # (feature probe, its rendering by the reference)
    loss_base: float | None = None  # the base model's loss on the examples' supervised tokens


def _reference(ref, run, samples: int, max_tokens: int) -> _Reference:
    chat = ref.format.kind == "template"
    probes = build_probes(run, samples, chat)
    if not probes:
        raise UsageError(f"no probes: {run.path}'s held-out data has no usable record", "check the run's --data")
    features = []
    for probe in feature_probes(ref.format.template) if chat else []:
        try:
            features.append((probe, ref.render(probe)))
        except UsageError:  # the template names the feature but can't render this probe: nothing to compare
            pass
    rendered = [ref.render(p) for p in probes]
    generations = [ref.greedy(r, max_tokens) for r in rendered]
    examples, logits = [], []
    for probe, generation in zip(probes, generations):
        answer = probe.answer if probe.answer is not None else generation.text
        if not answer.strip():
            continue
        example = tokenize_record(probe.record(answer), ref.tokenizer, ref.format.template, False)
        examples.append(example)
        logits.append(ref.logits(example.ids.tolist()))
    return _Reference(probes, rendered, generations, examples, logits,
                      end_of_turn(ref.tokenizer, ref.format.template), features)


def _base_loss(run, checkpoint: str, reference: _Reference) -> float | None:
    """The base model's loss on the reference examples: what "the finetune's gain" is measured from."""
    import mlx.core as mx

    from mlxtune.runs import open_for_inference
    from mlxtune.ui import quiet_stdout

    with quiet_stdout():
        base = open_for_inference(run.path, checkpoint, adapter=False, float32_on_cpu=True)
    logits = [np.array(base.model(mx.array(e.ids.tolist())[None])[0].astype(mx.float32)) for e in reference.examples]
    del base
    return teacher_forced(reference.examples, reference.logits, logits)["loss"]


def _check_rendering(hop, reference: _Reference) -> tuple[dict, list]:
    rendered, failures = [], []
    for probe, expected in zip(reference.probes, reference.rendered):
        try:
            actual = hop.render(probe)
        except UsageError as exc:
            return {"ok": False, "detail": exc.message}, []
        rendered.append(actual)
        if actual.text is not None and actual.text != expected.text:
            failures.append((probe.name, rendering_difference(expected.text, actual.text)))
        elif actual.ids != expected.ids:
            failures.append((probe.name, {"detail": f"same text, other tokens: {expected.ids[:12]}… vs "
                                                    f"{actual.ids[:12]}…"}))
    if failures:
        name, difference = failures[0]
        return {"ok": False, "detail": f"{len(failures)} of {len(rendered)} prompts differ from training's "
                                       f"rendering (first: {name})", "difference": difference}, rendered
    return {"ok": True, "detail": f"{len(rendered)} prompts byte-identical to training's"}, rendered


def _check_stopping(hop, reference: _Reference, rendered: list) -> dict:
    eot = reference.end_of_turn
    stops = hop.stops()
    shown = repr(eot["text"]) + (f" (id {', '.join(map(str, eot['ids']))})" if eot["ids"] else "")
    needs_string = getattr(hop, "modelfile", None) is not None
    if needs_string:  # Ollama: the Modelfile's stops are what it applies; the GGUF's ids alone vary by reader
        declared = eot["text"] in stops.strings or not eot["text"]
        where = f"Modelfile stops {stops.strings}"
    else:
        declared = bool(eot["ids"]) and set(eot["ids"]) <= stops.ids or bool(eot["text"]) and eot["text"] in \
            stops.strings
        where = f"stop ids {sorted(stops.ids)}" + (f", strings {stops.strings}" if stops.strings else "")
    if not declared:
        return {"ok": False, "detail": f"end of turn {shown} is not in the stop set ({where})"}
    if not eot["ids"] or not rendered or not hop.gives_logits:
        return {"ok": True, "detail": f"end of turn {shown} in the stop set ({where})"}
    forced = hop.greedy(rendered[0], 4, force=eot["ids"][-1])
    if not forced.stopped or forced.tokens:
        return {"ok": False, "detail": f"end of turn {shown} is declared but generation ran on past it "
                                       f"({forced.text[:40]!r})"}
    return {"ok": True, "detail": f"end of turn {shown} in the stop set ({where}); generation stops on it"}


def _check_features(hop, reference: _Reference) -> dict:
    """How the hop takes each feature probe: rendered the same, rendered differently, or not taken at all."""
    found = {}
    for probe, expected in reference.features:
        try:
            actual = hop.render(probe)
        except Unsupported as exc:
            found[probe.name] = {"status": "unsupported", "detail": str(exc)}
            continue
        except UsageError as exc:
            found[probe.name] = {"status": "differs", "detail": exc.message}
            continue
        if actual.text is not None and actual.text != expected.text:
            found[probe.name] = {"status": "differs", "detail": "renders differently from training's template",
                                 "difference": rendering_difference(expected.text, actual.text)}
        else:
            found[probe.name] = {"status": "same", "detail": "byte-identical to training's template"}
    return found


def check_hop(hop, precision: str, reference: _Reference, decode, max_tokens: int) -> HopResult:
    rendering, rendered = _check_rendering(hop, reference)
    features = _check_features(hop, reference) if rendered else {}
    stopping = _check_stopping(hop, reference, rendered) if rendered else {"ok": False, "detail": "not rendered"}
    forced = None
    if rendered and hop.gives_logits:
        forced = teacher_forced(reference.examples, reference.logits,
                                [hop.logits(e.ids.tolist()) for e in reference.examples])
        forced["kept"] = finetune_kept(reference.loss_base, forced)
    same, shares, divergence = 0, [], None
    for probe, rendering_, expected in zip(reference.probes, rendered, reference.generations):
        share, parted = greedy_agreement(probe.name, expected, hop.greedy(rendering_, max_tokens, probe=probe),
                                         decode)
        same += parted is None
        shares.append(share)
        divergence = divergence or parted
    greedy = {"same": same, "probes": len(rendered), "prefix": sum(shares) / len(shares) if shares else 0.0,
              "first_divergence": divergence}
    thresholds = THRESHOLDS[precision]
    problems = []
    if not rendering["ok"]:
        problems.append(f"rendering: {rendering['detail']}")
    if not stopping["ok"]:
        problems.append(f"stopping: {stopping['detail']}")
    for name, feature in features.items():
        if feature["status"] == "differs":
            problems.append(f"{name}: {feature['detail']}")
    if forced and forced["agreement"] is not None:
        if forced["agreement"] < thresholds.get("agreement", 0):
            problems.append(f"teacher-forced agreement {forced['agreement']:.1%} < {thresholds['agreement']:.0%}")
        if abs(forced["loss_delta"]) > thresholds.get("loss_delta", float("inf")):
            problems.append(f"loss differs by {forced['loss_delta']:+.2e} (> {thresholds['loss_delta']:g})")
        if forced["kept"] is not None and forced["kept"] < thresholds.get("kept", float("-inf")):
            problems.append(f"keeps {forced['kept']:.0%} of the finetune's loss gain (< {thresholds['kept']:.0%})")
    if rendered and greedy["prefix"] < thresholds.get("greedy", 0):
        problems.append(f"greedy replies agree on {greedy['prefix']:.0%} of their tokens before parting "
                        f"(< {thresholds['greedy']:.0%})")
    return HopResult(hop.name, hop.source, hop.template_name, precision, rendering, stopping, forced, greedy,
                     thresholds, features, problems)


def _unchecked(name: str, source: str, problem: str) -> HopResult:
    return HopResult(name, source, "—", "—", {"ok": False, "detail": problem}, {"ok": False, "detail": "not checked"},
                     None, {"same": 0, "probes": 0, "prefix": 0.0, "first_divergence": None}, {}, {}, [problem])


def exports_beside(run_path: Path) -> dict[str, list[Path]]:
    """The exports `mlxtune export RUN` writes by default: RUN-<outtype>.gguf, the RUN-ollama folder, and
    LM Studio's mlxtune/RUN folder."""
    from mlxtune.export import lmstudio_models_dir

    name = run_path.name
    ggufs = sorted(p for p in run_path.parent.glob(f"{name}-*.gguf") if not p.name.endswith("-lora.gguf"))
    ollama = [p for p in [run_path.parent / f"{name}-ollama"] if (p / "Modelfile").is_file()]
    lmstudio = [p for p in [lmstudio_models_dir() / "mlxtune" / name] if p.is_dir()]
    return {"gguf": ggufs, "ollama": ollama, "lmstudio": lmstudio}


def _precision_of_mlx(path: Path) -> str:
    from mlxtune.model_config import read_config, weights_dtype

    config = read_config(path)
    bits = (config.get("quantization") or {}).get("bits")
    if bits:
        return "q8" if bits >= 8 else "q4"
    return "exact" if weights_dtype(path, config) == "float32" else "half"


def selected_hops(hops: list[str] | None, requantize: list[str] = ()) -> list[str]:
    """`hops` (default: every hop the user has, DEFAULT_HOPS) plus the re-quantized fused hops `requantize` names."""
    unknown = [h for h in hops or [] if h not in HOPS]
    if unknown:
        raise UsageError(f"unknown hop {unknown[0]!r}", f"choose from {', '.join(HOPS)}")
    bad = [bits for bits in requantize if str(bits) not in REQUANTIZED]
    if bad:
        raise UsageError(f"--requantize {bad[0]}: not a bit width verify re-quantizes to",
                         f"choose from {','.join(REQUANTIZED)}")
    chosen = list(hops or DEFAULT_HOPS)
    extra = [REQUANTIZED[str(bits)] for bits in requantize if REQUANTIZED[str(bits)] not in chosen]
    if not hops:  # in HOPS order: fused, its re-quantized copies, then the exports
        return [h for h in HOPS if h in chosen + extra]
    return chosen + extra


def verify_run(run_dir: str | Path, *, hops: list[str] | None = None, requantize: list[str] = (), checkpoint: str = "last",
               fused: str | Path | None = None, gguf: list[str | Path] = (), ollama: list[str | Path] = (),
               lmstudio: list[str | Path] = (), serve: str | Path | None = None, samples: int = SAMPLES, max_tokens: int = MAX_NEW_TOKENS,
               console=None) -> VerifyResult:
    """Check every hop in `hops` (default: the fused model, the exports found and serve; `requantize` adds fused
    copies re-quantized to those bit widths) against base + adapter; write verify.json into the run.

    The fused hops fuse into a temporary directory unless `fused` names a fused model; GGUF, Ollama and LM Studio
    hops check `gguf`/`ollama`/`lmstudio` or, by default, the exports beside the run (LM Studio: its models
    folder's mlxtune/RUN); the serve hop serves `serve` (default: the run)."""
    from mlxtune.storage import temp_dir
    from mlxtune.verify.hops import LlamaCppHop, LmStudioHop, MlxHop, OllamaHop, ServeHop, lmstudio_target

    hops = selected_hops(hops, requantize)
    run = open_run(run_dir)
    run.adapter_dir(checkpoint)
    for given in [fused, *gguf, *ollama, serve]:
        if given is not None and not Path(given).exists():
            raise UsageError(f"not found: {given}", "give an existing fused folder, .gguf file, Ollama folder or run")
    found = exports_beside(run.path)
    gguf_files = [Path(p) for p in gguf] or found["gguf"]
    ollama_dirs = [Path(p) for p in ollama] or found["ollama"]
    lmstudio_models = [lmstudio_target(p) for p in lmstudio] or [lmstudio_target(p) for p in found["lmstudio"]]

    def say(text: str) -> None:
        if console is not None:
            console.print(f"[dim]{text}[/]", highlight=False)

    say(f"reference: {run.path} (base + adapter, {checkpoint})")
    ref = MlxHop("reference", run.path, checkpoint)
    reference = _reference(ref, run, samples, max_tokens)
    decode = ref.tokenizer.decode
    ref.close()  # only its tokenizer is needed from here: one model in memory at a time
    reference.loss_base = _base_loss(run, checkpoint, reference)
    # llama.cpp's context must hold the longest teacher-forced example and the longest prompt plus its reply.
    context = max([len(e.ids) for e in reference.examples] + [len(r.ids) + max_tokens for r in reference.rendered]) + 8
    results: list[HopResult] = []
    temp = temp_dir("mlxtune-verify-")
    try:
        plan: list[tuple[str, object]] = []
        for name in hops:
            if name == "fused":
                plan.append((name, fused))
            elif name in ("fused-q8", "fused-q4"):
                plan.append((name, None))
            elif name == "gguf":
                plan += [(f"gguf {p.name}", p) for p in gguf_files]
            elif name == "ollama":
                plan += [(f"ollama {p.name}", p) for p in ollama_dirs]
            elif name == "lmstudio":
                plan += [(f"lmstudio {p.parent.parent.name}/{p.parent.name}" if kind == "gguf" else f"lmstudio {p.name} (MLX)",
                          (p, kind)) for p, kind in lmstudio_models]
            elif name == "serve":
                plan.append((name, serve or run.path))
        for name, target in plan:
            say(f"checking {name}")
            started = time.perf_counter()
            try:
                if name.startswith("fused"):
                    if target is None:
                        from mlxtune.fuse import fuse_run

                        target = temp / name
                        fuse_run(run.path, target, checkpoint, quantize=name.partition("-q")[2] or "none")
                    hop, precision = MlxHop(name, target), _precision_of_mlx(Path(target))
                elif name.startswith("gguf"):
                    hop = LlamaCppHop(name, target, context)
                    precision = {"f32": "f32", "q8_0": "q8"}.get(hop.outtype, "half")
                elif name.startswith("ollama"):
                    hop = OllamaHop(name, target, context)
                    precision = {"f32": "f32", "q8_0": "q8"}.get(hop.outtype, "half")
                elif name.startswith("lmstudio"):
                    target, kind = target
                    if kind == "mlx":  # LM Studio's MLX engine: mlx-lm with the tokenizer's own template
                        hop, precision = MlxHop(name, target), _precision_of_mlx(Path(target))
                    else:
                        hop = LmStudioHop(name, target, context)
                        precision = {"f32": "f32", "q8_0": "q8"}.get(hop.outtype, "half")
                else:
                    hop, precision = ServeHop(name, target, checkpoint), "exact"
            except (UsageError, RuntimeError, ValueError, OSError) as exc:  # not a model this hop can load
                message = exc.message if isinstance(exc, UsageError) else f"{type(exc).__name__}: {exc}"
                results.append(_unchecked(name, str(target), f"could not load: {message}"))
                continue
            try:
                results.append(check_hop(hop, precision, reference, decode, max_tokens))
            except (UsageError, RuntimeError, ValueError, OSError) as exc:  # this hop broke; the others still report
                results.append(_unchecked(name, hop.source, f"could not check: {type(exc).__name__}: {exc}"))
            else:
                results[-1].seconds = time.perf_counter() - started
            finally:
                hop.close()
                if name.startswith("fused") and Path(target).is_relative_to(temp):
                    shutil.rmtree(target, ignore_errors=True)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    result = VerifyResult(str(run.path), checkpoint, ref.template_name, reference.end_of_turn,
                          [p.name for p in reference.probes], results)
    result.files = {"verify": str(run.path / VERIFY_FILE)}
    atomic_write_text(run.path / VERIFY_FILE, json.dumps(result.to_dict(), indent=2, ensure_ascii=False) + "\n")
    from mlxtune.eval.evaluate import refresh_report

    report = refresh_report(run.path)  # the run's report.html gets (or updates) its verify section
    if report is not None:
        result.files["report"] = str(report)
    return result


# The exports `export --verify` checks, each by the hop of the same name; on by default for a run (each costs one
# load of the exported model and the probes: seconds on small models). hf and gguf-adapter have no hop of their own.
VERIFIED_FORMATS = ("gguf", "ollama", "lmstudio")


def verify_by_default(run_or_model, fmt: str) -> bool:
    """`export` verifies a run's gguf, ollama and lmstudio exports unless told not to; the GGUF ones only where
    llama.cpp's Python binding is installed (the export itself doesn't need it)."""
    import importlib.util

    from mlxtune.runs import is_run_dir

    if fmt not in VERIFIED_FORMATS or not is_run_dir(run_or_model):
        return False
    return fmt == "lmstudio" or importlib.util.find_spec("llama_cpp") is not None


def verify_export(run_dir, fmt: str, path, checkpoint: str = "last", console=None) -> VerifyResult:
    """The hop an export wrote (`mlxtune export RUN --verify`), checked against base + adapter."""
    from mlxtune.runs import is_run_dir

    if fmt not in VERIFIED_FORMATS:
        raise UsageError(f"--verify checks {', '.join(VERIFIED_FORMATS)} exports, not {fmt}",
                         f"leave out --verify, or check the fused model: mlxtune verify {run_dir} --hops fused")
    if not is_run_dir(run_dir):
        raise UsageError(f"--verify needs a run: {run_dir} is a model (nothing to compare it with)",
                         "leave out --verify")
    return verify_run(run_dir, hops=[fmt], checkpoint=checkpoint, console=console, **{fmt: [path]})
