"""A model directory's facts, read without loading it: config.json, its helpers, and the quantization choices.

The small module the rest of the package depends on for "what is this model": `plan`, `fuse`, `export/` and the
loaders import from here, never from the hub or library modules.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import pkgutil
import struct
from pathlib import Path

from mlxtune.errors import UsageError

DEFAULT_QUANTIZE = "4"
DEFAULT_GROUP_SIZE = 64
QUANTIZE_CHOICES = ("4", "8", "none")
GROUP_SIZES = (32, 64, 128)
DTYPES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}
DTYPE_TAGS = {v: k for k, v in DTYPES.items()}


def read_config(path: Path) -> dict:
    config = Path(path) / "config.json"
    try:
        return json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{config}: invalid JSON ({exc})", "re-download or fix the model's config.json") from None


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


def config_dtype(config: dict) -> str:
    """The float dtype a config claims for its weights (float16 when it says nothing we know)."""
    dtype = config.get("torch_dtype") or config.get("dtype") or text_config(config).get("dtype")
    return dtype if dtype in DTYPE_TAGS else "float16"


def weights_dtype(path: Path, config: dict) -> str:
    """The floating dtype stored in the weights (read from the safetensors headers, not the config's claim)."""
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    for file in sorted(Path(path).glob("*.safetensors")):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))  # safetensors: 8-byte little-endian header length
            header = json.loads(f.read(length))
        for key, meta in header.items():
            if key != "__metadata__" and meta["dtype"] in names and not key.endswith((".scales", ".biases")):
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
    module = MODEL_REMAPPING.get(model_type, model_type)
    if importlib.util.find_spec(f"mlx_lm.models.{module}") is None:
        close = difflib.get_close_matches(model_type, supported_architectures(), n=4, cutoff=0.5)
        raise UsageError(
            f"{where}: architecture {model_type!r} is not supported by mlx-lm",
            (f"close supported ones: {', '.join(close)}; " if close else "")
            + "see `python -c 'import mlxtune.model_config as m; print(m.supported_architectures())'`",
        )
    return model_type
