"""The Hugging Face hub: download a snapshot, check it, convert/quantize it to MLX into the model library (`pull`)."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from mlxtune.errors import UsageError
from mlxtune.library import ModelEntry, check_entry_name, library_dir, read_entry, write_entry
from mlxtune.model_config import (
    DEFAULT_GROUP_SIZE,
    DEFAULT_QUANTIZE,
    DTYPE_TAGS,
    check_architecture,
    check_dtype,
    check_model_dir,
    check_quantization,
    config_dtype,
    directory_size,
    read_config,
    weights_dtype,
)
from mlxtune.storage import clean_stale, staged, translate
from mlxtune.ui import quiet_stdout

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Only what MLX needs: never pickled weights (*.bin, *.pt) and never code (*.py) unless remote code is allowed.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def is_hub_id(text: str) -> bool:
    return bool(HUB_ID.match(text)) and not text.startswith((".", "/", "~"))


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


def check_remote_code(path: Path, config: dict, trust_remote_code: bool) -> None:
    code = sorted(p.name for p in path.glob("*.py"))
    if (config.get("auto_map") or code) and not trust_remote_code:
        raise UsageError(
            f"{path} asks to run its own Python code ({', '.join(code) or 'auto_map in config.json'})",
            "review that code, then pass --trust-remote-code if you trust it",
        )


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
    dtype = check_dtype(dtype)

    local = Path(str(reference)).expanduser()
    if name is not None and (local.exists() or HUB_ID.match(str(reference))):
        # Before any download or conversion: is this name taken by something else?
        existing = existing_entry(library_dir() / name, str(local.resolve()) if local.exists() else str(reference),
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
    source_dtype = config_dtype(config)
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
    existing = existing_entry(dest, source, force, console)
    if existing is not None:
        return existing

    library_dir().mkdir(parents=True, exist_ok=True)
    # Converted into a staging copy, swapped in only when complete: a failed or killed pull never costs the old
    # entry (a killed one leaves a hidden copy that the next pull of this name removes).
    with staged(dest, overwrite=True, need=2 * directory_size(source_dir)) as staging:
        try:
            if already_quantized:
                _link_tree(source_dir, staging)
            else:
                with console.status(f"converting {source} to MLX ({'not quantized' if quantize == 'none' else quantize + '-bit'})"):
                    _convert(source_dir, staging, quantize, group_size, target_dtype, trust_remote_code)
            entry = describe_entry(staging, name, source, revision, architecture)
        except Exception as exc:
            # Weights that don't load (cut-off download, wrong shapes, not safetensors): the input's fault.
            raise input_fault(exc, dest, f"could not convert {source}",
                              "its weight files may be incomplete or corrupt; download it again or check the "
                              "directory (the library is unchanged)") from None
        write_entry(staging, entry)
    entry.path = str(dest)
    return entry


def input_fault(exc: Exception, dest: Path, message: str, hint: str) -> Exception:
    """What a failed conversion into `dest` raises: a storage failure as it is (disk full, …), our own UsageError
    as it is, anything else as the input's fault, one line."""
    if isinstance(exc, UsageError) or translate(exc, dest) is not None:
        return exc
    return UsageError(f"{message}: {type(exc).__name__}: {exc}".splitlines()[0], hint)


def existing_entry(dest: Path, source: str, force: bool, console,
                   identify: Callable[[dict | None], dict] | None = None) -> ModelEntry | None:
    """The entry at `dest` when it already holds `source` (nothing to do); a UsageError when it holds something
    else and `force` is off; None when `dest` is free or may be replaced.

    `identify(recorded)` gives the source file's size and sha256 (importers.stores.fingerprint; `recorded` is the
    entry's, whose digest it may reuse): when the entry recorded one, the content decides, not the path: the same
    file copied elsewhere (another clone's venv) is the same source, a changed file at the same path is not."""
    clean_stale(dest)  # a killed pull's staging copy; an old entry a killed swap had moved aside is put back
    if force or not (dest.exists() or dest.is_symlink()):
        return None
    existing = read_entry(dest) if dest.is_dir() else None
    recorded = existing.extra.get("fingerprint") if existing else None
    if identify and recorded:
        same = _content(recorded) == _content(identify(recorded))
    else:
        same = existing is not None and existing.source == source
    if same:
        elsewhere = "" if existing.source == source else f", the same file as {existing.source}"
        console.print(f"{dest.name} is already in the library ({dest}{elsewhere}); --force to convert again")
        return existing
    if existing and existing.source == source:
        what = f"holds an earlier version of {source} (the file has changed since)"
    else:
        what = f"holds {existing.source}" if existing else "exists and is not a model pulled by mlxtune"
    raise UsageError(f"{dest.name} is already in the library and {what} ({dest})",
                     "pass --force to replace it, or choose another --name")


def _content(fingerprint: dict) -> tuple:
    return fingerprint.get("size"), fingerprint.get("sha256")


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


def describe_entry(path: Path, name: str, source: str, revision: str | None, architecture: str) -> ModelEntry:
    from mlx_lm.utils import get_total_parameters, load_model

    model, config = load_model(path, lazy=True)
    quantization = config.get("quantization")
    if quantization:
        quantization = {"bits": quantization.get("bits"), "group_size": quantization.get("group_size")}
    return ModelEntry(
        name=name, path=str(path), architecture=architecture, parameters=int(get_total_parameters(model)),
        quantization=quantization, dtype=weights_dtype(path, config), size_bytes=directory_size(path), source=source,
        revision=revision, created=datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
