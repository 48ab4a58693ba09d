"""Models: resolve `--model` references, pull from the Hugging Face hub, convert/quantize to MLX, keep a library.

A reference is a library name (`mlxtune models`), a local model directory, or a hub id `org/name`; hub ids are
pulled on first use (downloaded, converted, quantized with the `pull` defaults) and reused from the library after.
The library lives in `$MLXTUNE_HOME/models/<name>-<quantization>/`, one MLX model directory per entry with an
`mlxtune.json` that says where it came from.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import os
import pkgutil
import re
import shutil
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from mlxtune.errors import UsageError
from mlxtune.paths import mlxtune_home
from mlxtune.storage import clean_stale, staged, translate

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what MLX needs: never pickled weights (*.bin, *.pt) and never code (*.py) unless remote code is allowed.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]
METADATA = "mlxtune.json"

# The base model `mlxtune lora` uses when no --model is given: a small instruct model whose 4-bit QLoRA fits
# an 8 GB Mac with room for batch 4 x 1024 tokens (see configs/mac-8gb-qwen2.5-1.5b-qlora.yaml).
DEFAULT_BASE_MODEL = "Qwen/Qwen2.5-1.5B-Instruct"
DEFAULT_QUANTIZE = "4"
DEFAULT_GROUP_SIZE = 64
QUANTIZE_CHOICES = ("4", "8", "none")
GROUP_SIZES = (32, 64, 128)
DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
DTYPE_TAGS = {v: k for k, v in DTYPES.items()}


@dataclass
class ModelEntry:
    """One model in the library."""

    name: str
    path: str
    architecture: str
    parameters: int
    quantization: dict | None  # {"bits": 4, "group_size": 64} or None
    dtype: str
    size_bytes: int
    source: str
    revision: str | None = None
    created: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def quantization_label(self) -> str:
        if not self.quantization:
            return DTYPE_TAGS.get(self.dtype, self.dtype)
        return f"{self.quantization['bits']}-bit g{self.quantization['group_size']}"

    def to_dict(self) -> dict:
        return {**asdict(self), "quantization_label": self.quantization_label}


def library_dir() -> Path:
    return mlxtune_home() / "models"


# ----------------------------------------------------------------------------------------------- references


def resolve_model(reference: str | os.PathLike | None, console=None) -> Path:
    """A local MLX-loadable directory for `reference` (library name, directory, or hub id pulled on demand)."""
    if reference is None or str(reference).strip() == "":
        raise UsageError("no model given", "pass --model with a library name, a local directory or a hub id")
    text = str(reference)
    path = Path(text).expanduser()
    if path.exists():
        return check_model_dir(path)
    entry = find_entry(text)
    if entry is not None:
        return Path(entry.path)
    if HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        pulled = [e for e in list_models() if e.source == text]
        if pulled:  # any quantization the user already has beats a new download
            return Path(pulled[0].path)
        return Path(pull(text, console=console).path)
    known = [e.name for e in list_models()]
    close = difflib.get_close_matches(text, known, n=3)
    raise UsageError(
        f"model not found: {text}",
        (f"did you mean {', '.join(close)}? " if close else "")
        + "give a library name (`mlxtune models`), a local model directory, or a Hugging Face repo id org/name",
    )


def check_model_dir(path: Path) -> Path:
    if not path.is_dir():
        raise UsageError(f"model path is not a directory: {path}", "give the directory that holds config.json")
    config = path / "config.json"
    if not config.is_file():
        raise UsageError(f"no config.json in {path}", "point --model at a Hugging Face or MLX model directory")
    read_config(path)
    if not any(path.glob("*.safetensors")):
        raise UsageError(f"no .safetensors weights in {path}",
                         "mlxtune never loads pickled weights; use a repo that ships safetensors")
    return path.resolve()


def read_config(path: Path) -> dict:
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config}: invalid JSON ({exc})", "re-download or fix the model's config.json") from None


def model_name(path: Path) -> str:
    return Path(path).name


def text_config(config: dict) -> dict:
    """The language model's part of a config (multimodal configs nest it under `text_config`)."""
    return config.get("text_config") or config


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def without_quantization(config: dict) -> dict:
    """A copy of `config` describing the same model with float weights."""
    return {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}


def check_quantization(quantize: str, group_size: int) -> str:
    """`quantize` normalised ("4", "8" or "none"); a UsageError for a value or group size we can't write."""
    quantize = str(quantize).lower()
    if quantize not in QUANTIZE_CHOICES:
        raise UsageError(f"--quantize {quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}",
                         "4 or 8 bits per weight, or none to keep full precision")
    if group_size not in GROUP_SIZES:
        raise UsageError(f"--group-size {group_size} is not one of {GROUP_SIZES}",
                         f"smaller groups are more accurate; {DEFAULT_GROUP_SIZE} is the default")
    return quantize


# ------------------------------------------------------------------------------------------------ the hub


def download(repo_id: str, revision: str | None = None, allow_remote_code: bool = False) -> Path:
    """Snapshot of `repo_id` in the Hugging Face cache (resumable; HF_TOKEN, HF_HOME, HF_HUB_OFFLINE honoured).

    huggingface_hub's own timeouts (10 s by default, HF_HUB_ETAG_TIMEOUT / HF_HUB_DOWNLOAD_TIMEOUT) keep a dead
    network from hanging us; offline, a cached snapshot is returned without any network call.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    patterns = HUB_PATTERNS + (["*.py"] if allow_remote_code else [])
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError:
        raise UsageError(
            f"{repo_id} is not in the local Hugging Face cache and the hub can't be reached",
            f"connect and run `mlxtune pull {repo_id}`, or pass --model with a local model directory",
        ) from None
    except GatedRepoError:
        raise UsageError(f"{repo_id} is gated", "accept its license on huggingface.co and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise UsageError(f"{repo_id} has no revision {revision!r}", "check --revision") from None
    except RepositoryNotFoundError:
        raise UsageError(f"{repo_id} was not found on the hub",
                         "check the spelling; private repos need HF_TOKEN") from None
    except Exception as exc:  # network and HTTP errors
        raise UsageError(f"could not fetch {repo_id}: {type(exc).__name__}: {exc}".splitlines()[0],
                         "check your network and HF_TOKEN, or pass a local model directory") from None
    return Path(local)


# --------------------------------------------------------------------------------------------- checks


def supported_architectures() -> list[str]:
    import mlx_lm.models
    from mlx_lm.utils import MODEL_REMAPPING

    names = {m.name for m in pkgutil.iter_modules(mlx_lm.models.__path__)}
    return sorted(names | set(MODEL_REMAPPING))


def check_architecture(config: dict, where: Path) -> str:
    """The model type, if mlx-lm has a model for it; otherwise a UsageError naming the close supported ones."""
    from mlx_lm.utils import MODEL_REMAPPING

    model_type = config.get("model_type")
    if not model_type:
        raise UsageError(f"{where / 'config.json'}: no model_type", "is this a causal language model directory?")
    module = MODEL_REMAPPING.get(model_type, model_type)
    if importlib.util.find_spec(f"mlx_lm.models.{module}") is None:
        close = difflib.get_close_matches(model_type, supported_architectures(), n=4, cutoff=0.5)
        raise UsageError(
            f"{where}: architecture {model_type!r} is not supported by mlx-lm",
            (f"close supported ones: {', '.join(close)}; " if close else "")
            + "see `python -c 'import mlxtune.models as m; print(m.supported_architectures())'`",
        )
    return model_type


def check_remote_code(path: Path, config: dict, trust_remote_code: bool) -> None:
    code = sorted(p.name for p in path.glob("*.py"))
    if (config.get("auto_map") or code) and not trust_remote_code:
        raise UsageError(
            f"{path} asks to run its own Python code ({', '.join(code) or 'auto_map in config.json'})",
            "review that code, then pass --trust-remote-code if you trust it",
        )


# ----------------------------------------------------------------------------------------------- pull


def entry_name(source_name: str, quantize: str, group_size: int, dtype: str) -> str:
    if quantize == "none":
        tag = DTYPE_TAGS.get(dtype, dtype)
    else:
        tag = f"{quantize}bit" + ("" if group_size == DEFAULT_GROUP_SIZE else f"-g{group_size}")
    return f"{source_name}-{tag}"


def pull(reference: str, quantize: str = DEFAULT_QUANTIZE, group_size: int = DEFAULT_GROUP_SIZE,
         dtype: str | None = None, revision: str | None = None, trust_remote_code: bool = False,
         name: str | None = None, force: bool = False, console=None) -> ModelEntry:
    """Put `reference` (hub id or local Hugging Face / MLX directory) into the library, converted and quantized.

    `quantize` is "4", "8" or "none"; `dtype` ("bf16", "f16", "f32" or the long names) is the precision of the
    unquantized tensors, default the model's own. Already-quantized MLX models are stored as they are.
    """
    from rich.console import Console

    console = console or Console(stderr=True)
    if name is not None:
        check_entry_name(name)  # first: a name that escapes the library must never reach a file operation
    quantize = check_quantization(quantize, group_size)
    dtype = DTYPES.get(dtype, dtype) if dtype else None
    if dtype is not None and dtype not in DTYPE_TAGS:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}",
                         "or leave it out to keep the model's own precision")

    local = Path(str(reference)).expanduser()
    if name is not None and (local.exists() or HUB_ID.match(str(reference))):
        # Before any download or conversion: is this name taken by something else?
        existing = _existing_entry(library_dir() / name, str(local.resolve()) if local.exists() else str(reference),
                                   force, console)
        if existing is not None:
            return existing
    if local.exists():
        source_dir, source = check_model_dir(local), str(local.resolve())
    elif HUB_ID.match(str(reference)):
        source = str(reference)
        with console.status(f"fetching {source} from the Hugging Face hub"):
            source_dir = download(source, revision, allow_remote_code=trust_remote_code)
        check_model_dir(source_dir)
    else:
        raise UsageError(f"{reference}: no such directory, and not a hub id like org/name",
                         "give a local model directory or a Hugging Face repo id such as Qwen/Qwen2.5-0.5B-Instruct")

    config = read_config(source_dir)
    check_remote_code(source_dir, config, trust_remote_code)
    architecture = check_architecture(config, source_dir)
    already_quantized = "quantization" in config
    source_dtype = _config_dtype(config)
    if already_quantized:
        if quantize != "none" and (config["quantization"].get("bits") != int(quantize)
                                   or config["quantization"].get("group_size") != group_size):
            console.print(f"[yellow]note:[/] {source} is already quantized "
                          f"({config['quantization'].get('bits')}-bit); stored as it is")
        quantize = str(config["quantization"].get("bits"))
        group_size = config["quantization"].get("group_size", DEFAULT_GROUP_SIZE)
    target_dtype = dtype or source_dtype
    name = check_entry_name(name) if name is not None else entry_name(Path(source).name, quantize, group_size,
                                                                      target_dtype)
    dest = library_dir() / name
    existing = _existing_entry(dest, source, force, console)
    if existing is not None:
        return existing

    library_dir().mkdir(parents=True, exist_ok=True)
    # Converted into a staging copy, swapped in only when complete: a failed or killed pull never costs the old
    # entry (a killed one leaves a hidden copy that the next pull of this name removes).
    with staged(dest, overwrite=True, need=2 * _size(source_dir)) as staging:
        try:
            if already_quantized:
                _link_tree(source_dir, staging)
            else:
                with console.status(f"converting {source} to MLX ({'not quantized' if quantize == 'none' else quantize + '-bit'})"):
                    _convert(source_dir, staging, quantize, group_size, target_dtype, trust_remote_code)
            entry = _describe(staging, name, source, revision, architecture)
        except Exception as exc:
            if translate(exc, dest) is not None:
                raise
            # Weights that don't load (cut-off download, wrong shapes, not safetensors): the input's fault.
            raise UsageError(f"could not convert {source}: {type(exc).__name__}: {exc}".splitlines()[0],
                             "its weight files may be incomplete or corrupt; download it again or check the "
                             "directory (the library is unchanged)") from None
        (staging / METADATA).write_text(json.dumps(entry.to_dict(), indent=2) + "\n", encoding="utf-8")
    entry.path = str(dest)
    return entry


def _existing_entry(dest: Path, source: str, force: bool, console) -> ModelEntry | None:
    """The entry at `dest` when it already holds `source` (nothing to do); a UsageError when it holds something
    else and `force` is off; None when `dest` is free or may be replaced."""
    clean_stale(dest)  # a killed pull's staging copy; an old entry a killed swap had moved aside is put back
    if force or not (dest.exists() or dest.is_symlink()):
        return None
    existing = read_entry(dest) if dest.is_dir() else None
    if existing is not None and existing.source == source:
        console.print(f"{dest.name} is already in the library ({dest}); --force to convert again")
        return existing
    what = f"holds {existing.source}" if existing else "exists and is not a model pulled by mlxtune"
    raise UsageError(f"{dest.name} is already in the library and {what} ({dest})",
                     "pass --force to replace it, or choose another --name")


ENTRY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")


def check_entry_name(name: str) -> str:
    """`name` if it is a plain library entry name (one path component inside the library), else a UsageError."""
    if not ENTRY_NAME.fullmatch(str(name)) or name in (".", ".."):
        raise UsageError(f"--name {name!r} is not a plain model name",
                         "use letters, digits, '.', '_', '+' or '-' (no '/', no leading '.'), "
                         "e.g. --name my-model-4bit")
    return name


def _convert(source_dir: Path, out: Path, quantize: str, group_size: int, dtype: str | None,
             trust_remote_code: bool) -> None:
    from mlx_lm.convert import convert

    from mlxtune.backend import check_blas

    check_blas()
    with quiet_stdout():
        convert(str(source_dir), str(out), quantize=quantize != "none",
                q_group_size=group_size if quantize != "none" else None,
                q_bits=int(quantize) if quantize != "none" else None, dtype=dtype,
                trust_remote_code=trust_remote_code)


@contextlib.contextmanager
def quiet_stdout():
    """mlx-lm prints [INFO] lines on stdout; keep stdout clean for --json (MLXTUNE_VERBOSE=1 shows them)."""
    if os.environ.get("MLXTUNE_VERBOSE"):
        with contextlib.redirect_stdout(sys.stderr):
            yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        yield


def base_source(path: Path) -> str:
    """Where a model directory came from: the hub id or directory recorded by `pull`, else the path itself."""
    entry = read_entry(path)
    return entry.source if entry else str(path)


def _link_tree(source: Path, dest: Path) -> None:
    """Copy a model directory by hard links where possible (hub blobs are immutable), else by copying."""
    dest.mkdir(parents=True)
    for item in source.iterdir():
        real = item.resolve()
        if real.is_file():
            try:
                os.link(real, dest / item.name)
            except OSError:
                shutil.copy2(real, dest / item.name)


def _config_dtype(config: dict) -> str:
    dtype = config.get("torch_dtype") or config.get("dtype") or text_config(config).get("dtype")
    return dtype if dtype in DTYPE_TAGS else "float16"


def _describe(path: Path, name: str, source: str, revision: str | None, architecture: str) -> ModelEntry:
    from mlx_lm.utils import get_total_parameters, load_model

    model, config = load_model(path, lazy=True)
    quantization = config.get("quantization")
    if quantization:
        quantization = {"bits": quantization.get("bits"), "group_size": quantization.get("group_size")}
    return ModelEntry(
        name=name, path=str(path), architecture=architecture, parameters=int(get_total_parameters(model)),
        quantization=quantization, dtype=_weights_dtype(path, config), size_bytes=_size(path), source=source,
        revision=revision, created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def _weights_dtype(path: Path, config: dict) -> str:
    """The floating dtype stored in the weights (read from the safetensors headers, not the config's claim)."""
    import struct

    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, meta in header.items():
            if key != "__metadata__" and meta["dtype"] in names and not key.endswith((".scales", ".biases")):
                return names[meta["dtype"]]
    return _config_dtype(config)


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -------------------------------------------------------------------------------------------- library


def read_entry(path: Path) -> ModelEntry | None:
    meta = Path(path) / METADATA
    try:
        data = json.loads(meta.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    data.pop("quantization_label", None)
    known = set(ModelEntry.__dataclass_fields__)
    entry = ModelEntry(**{k: v for k, v in data.items() if k in known})
    entry.path = str(Path(path).resolve())  # the library may have moved with MLXTUNE_HOME
    return entry


def list_models() -> list[ModelEntry]:
    """Library entries, newest first."""
    root = library_dir()
    if not root.is_dir():
        return []
    entries = [read_entry(p) for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted((e for e in entries if e is not None), key=lambda e: e.created, reverse=True)


def find_entry(name: str) -> ModelEntry | None:
    if "/" in name or name.startswith("."):
        return None
    path = library_dir() / name
    return read_entry(path) if path.is_dir() else None


def _require_entry(name: str) -> ModelEntry:
    entry = find_entry(name)
    if entry is None:
        close = difflib.get_close_matches(name, [e.name for e in list_models()], n=3)
        raise UsageError(f"no model named {name!r} in the library ({library_dir()})",
                         f"did you mean {', '.join(close)}?" if close else "`mlxtune models` lists them")
    return entry


def remove_model(name: str) -> ModelEntry:
    entry = _require_entry(name)
    path = library_dir() / name
    if path.is_symlink():  # an entry linked in from elsewhere: remove the link, never what it points at
        path.unlink()
    else:
        shutil.rmtree(path)
    return entry


def model_info(reference: str) -> dict:
    """Config summary and estimated memory (inference, LoRA at default settings) of a library entry or directory."""
    from mlxtune.plan import estimate_memory

    entry = find_entry(reference)
    local = Path(reference).expanduser()
    if entry is None and not local.exists():
        entry = _require_entry(reference)  # neither a library name nor a directory: say what the library has
    path = Path(entry.path) if entry else check_model_dir(local)
    config = read_config(path)
    text = text_config(config)
    summary = {
        "name": entry.name if entry else path.name,
        "path": str(path),
        "architecture": config.get("model_type"),
        "layers": text.get("num_hidden_layers"),
        "hidden_size": text.get("hidden_size"),
        "attention_heads": text.get("num_attention_heads"),
        "kv_heads": text.get("num_key_value_heads", text.get("num_attention_heads")),
        "vocab_size": text.get("vocab_size"),
        "context_length": text.get("max_position_embeddings"),
        "quantization": config.get("quantization"),
        "size_bytes": _size(path),
        "has_chat_template": _has_chat_template(path),
        "source": entry.source if entry else str(path),
    }
    context = min(summary["context_length"] or 4096, 4096)
    summary["memory"] = estimate_memory(config, weight_bytes=_weight_bytes(path), context=context,
                                        seq_len=min(context, 1024))
    return summary


def _weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def _has_chat_template(path: Path) -> bool:
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False


# ---------------------------------------------------------------------------------------------- loading


def load_model(path: Path, adapter_path: Path | None = None):
    """(model, tokenizer, config) through mlx-lm (with an adapter when given), with its errors turned into ours."""
    from mlx_lm.utils import load

    from mlxtune.backend import check_blas

    check_blas()
    check_architecture(read_config(path), Path(path))
    model, tokenizer, config = load(str(path), return_config=True,
                                    adapter_path=str(adapter_path) if adapter_path else None)
    return model, tokenizer, config
