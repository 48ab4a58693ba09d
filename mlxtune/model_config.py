"""A model directory's facts, read without loading it: config.json, its helpers, and the quantization choices.

The small module the rest of the package depends on for "what is this model": `plan`, `fuse`, `export/` and the
loaders import from here, never from the hub or library modules.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import pkgutil
import re
import struct
from pathlib import Path

from mlxtune.errors import UsageError

DEFAULT_QUANTIZE = "4"
DEFAULT_GROUP_SIZE = 64
QUANTIZE_CHOICES = ("4", "8", "none")
GROUP_SIZES = (32, 64, 128)
DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
DTYPE_TAGS = {v: k for k, v in DTYPES.items()}
DEFAULT_MAX_SEQ_LENGTH = 2048  # the default --max-seq-length, unless the model's context is shorter
# A safetensors JSON header describes tensors in a few KB (a 70B model's: ~100 KB); a length past this is a file
# that isn't safetensors (a pickle renamed, random bytes) or is damaged, and is refused before anything is read.
MAX_SAFETENSORS_HEADER = 100_000_000
MODEL_TYPE = re.compile(r"[a-z][a-z0-9_]*")  # a module name of mlx_lm.models: no path, no dunder
CONTEXT_KEYS = ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length", "max_sequence_length")


def read_config(path: Path) -> dict:
    config = Path(path) / "config.json"
    hint = "re-download or fix the model's config.json"
    try:
        values = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"{config}: invalid JSON ({str(exc).splitlines()[0][:200]})", hint) from None
    except FileNotFoundError:
        raise UsageError(f"no config.json in {path}", "point --model at a Hugging Face or MLX model directory") from None
    except IsADirectoryError:
        raise UsageError(f"{config} is a directory, not a file", hint) from None
    if not isinstance(values, dict) or not isinstance(values.get("text_config") or {}, dict):
        raise UsageError(f"{config}: expected a JSON object of settings, got {type(values).__name__}", hint)
    return values


def read_safetensors_header(path: Path) -> dict:
    """name → {"dtype", "shape", ...} from a .safetensors file's JSON header (no tensor is read); a file that isn't
    safetensors (a pickle renamed, a header length past the file, bad JSON) is a one-line UsageError."""
    path = Path(path)
    hint = "re-download the model; mlxtune reads only safetensors weights (never pickles)"
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise UsageError(f"{path}: not a safetensors file ({size} bytes, too short for a header)", hint)
            (length,) = struct.unpack("<Q", prefix)  # safetensors: 8-byte little-endian header length
            if length > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise UsageError(f"{path}: not a safetensors file (header length {length:,} for a file of "
                                 f"{size:,} bytes)", hint)
            header = json.loads(handle.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UsageError(f"{path}: not a safetensors file (its header is not JSON)", hint) from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a safetensors file", hint) from None
    tensors = {k: v for k, v in header.items() if k != "__metadata__"} if isinstance(header, dict) else None
    if tensors is None or not all(isinstance(v, dict) and isinstance(v.get("dtype"), str)
                                  and isinstance(v.get("shape"), list)
                                  and all(isinstance(n, int) and n >= 0 for n in v["shape"])
                                  for v in tensors.values()):
        raise UsageError(f"{path}: not a safetensors file (its header doesn't describe tensors)", hint)
    return tensors


def check_weights_match(path: Path, config: dict) -> None:
    """The config's block count against the weights' (read from the headers, before anything loads): a config.json
    claiming more blocks than the weights hold would otherwise be planned, and built, at its claimed size."""
    path = Path(path)
    text = text_config(config)
    for key in ("num_hidden_layers", "hidden_size", "vocab_size"):
        value = text.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise UsageError(f"{path / 'config.json'}: {key} must be a whole number of at least 1, got {value!r}",
                             "fix or re-download the model's config.json")
    blocks = set()
    for file in sorted(path.glob("*.safetensors")):
        for name in read_safetensors_header(file):
            match = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
            if match:
                blocks.add(int(match.group(1)))
    claimed = text.get("num_hidden_layers")
    if blocks and isinstance(claimed, int) and claimed > len(blocks):
        raise UsageError(f"{path / 'config.json'} says num_hidden_layers {claimed:,}, but the weights hold "
                         f"{len(blocks):,} blocks", "fix num_hidden_layers in config.json, or re-download the model")


def context_length(config: dict) -> int | None:
    """The model's context window (max_position_embeddings or its other names), None when the config has none."""
    text = text_config(config)
    for key in CONTEXT_KEYS:
        value = text.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def max_seq_length_for(config: dict) -> int:
    """The default --max-seq-length for a model: 2048, or its context window when that is shorter."""
    return min(DEFAULT_MAX_SEQ_LENGTH, context_length(config) or DEFAULT_MAX_SEQ_LENGTH)


def check_model_dir(path: Path) -> Path:
    """`path` resolved, if it is a model directory MLX can load (config.json and safetensors weights)."""
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


def check_dtype(dtype: str | None, default: str = "the model's own precision") -> str | None:
    """`dtype` as its long name ("float16"), None when not given; a UsageError for one we can't write."""
    dtype = DTYPES.get(dtype, dtype) if dtype else None
    if dtype is not None and dtype not in DTYPE_TAGS:
        raise UsageError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}", f"or leave it out for {default}")
    return dtype


def config_dtype(config: dict) -> str:
    """The float dtype a config claims for its weights (float16 when it says nothing we know)."""
    dtype = config.get("torch_dtype") or config.get("dtype") or text_config(config).get("dtype")
    return dtype if dtype in DTYPE_TAGS else "float16"


def weights_dtype(path: Path, config: dict) -> str:
    """The floating dtype stored in the weights (read from the safetensors headers, not the config's claim)."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    for file in sorted(Path(path).glob("*.safetensors")):
        for key, meta in read_safetensors_header(file).items():
            if meta["dtype"] in names and not key.endswith((".scales", ".biases")):
                return names[meta["dtype"]]
    return config_dtype(config)


def directory_size(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def weight_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))


def has_chat_template(path: Path) -> bool:
    path = Path(path)
    if (path / "chat_template.jinja").is_file() or (path / "chat_template.json").is_file():
        return True
    try:
        return bool(json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8")).get("chat_template"))
    except (OSError, json.JSONDecodeError):
        return False


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
    if not isinstance(model_type, str) or not MODEL_TYPE.fullmatch(model_type):
        raise UsageError(f"{where / 'config.json'}: model_type {model_type!r} is not an architecture name",
                         "it names an mlx-lm model module, like llama or qwen2; fix or re-download config.json")
    module = MODEL_REMAPPING.get(model_type, model_type)
    if importlib.util.find_spec(f"mlx_lm.models.{module}") is None:
        close = difflib.get_close_matches(model_type, supported_architectures(), n=4, cutoff=0.5)
        raise UsageError(
            f"{where}: architecture {model_type!r} is not supported by mlx-lm",
            (f"close supported ones: {', '.join(close)}; " if close else "")
            + "see `python -c 'import mlxtune.model_config as m; print(m.supported_architectures())'`",
        )
    return model_type
