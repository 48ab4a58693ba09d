"""Tokenized datasets cached on disk, keyed by everything that changes the tokens: a second run starts at once."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from mlxtune.data.template import TokenizedExample
from mlxtune.paths import cache_dir, mlxtune_home

FORMAT_VERSION = 2  # 2: warnings in the metadata; Alpaca prompts joined with one newline


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    # mlx-lm's TokenizerWrapper keeps the Hugging Face tokenizer in the private `_tokenizer` (no public accessor);
    # tests/test_mlx_lm_private.py fails clearly if an upgrade renames it. A plain HF tokenizer is used as it is.
    backend = getattr(tokenizer, "_tokenizer", tokenizer)
    fast = getattr(backend, "backend_tokenizer", None)
    body = fast.to_str() if fast is not None else json.dumps(sorted(backend.get_vocab().items()))
    extra = f"{tokenizer.bos_token}|{tokenizer.eos_token}|{getattr(tokenizer, 'chat_template', None)}"
    return hashlib.sha256((body + extra).encode("utf-8")).hexdigest()


def cache_key(files: dict[str, Path], tokenizer, settings: dict) -> str:
    parts = {
        "version": FORMAT_VERSION,
        "files": {split: file_digest(path) for split, path in sorted(files.items())},
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "settings": settings,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode("utf-8")).hexdigest()[:32]


def _path(key: str) -> Path:
    return cache_dir("tokenized") / f"{key}.npz"


def save_cached(key: str, splits: dict[str, list[TokenizedExample]], meta: dict) -> str | None:
    """Save the tokenized splits for the next run. The cache is optional: when it can't be written (a full disk or
    read-only MLXTUNE_HOME) nothing is left behind and the returned note says so; the run goes on without it."""
    arrays = {"meta": np.array(json.dumps(meta))}
    for split, examples in splits.items():
        arrays[f"{split}_ids"] = np.concatenate([e.ids for e in examples]) if examples else np.zeros(0, np.int32)
        arrays[f"{split}_supervised"] = (np.concatenate([e.supervised for e in examples]) if examples
                                         else np.zeros(0, bool))
        arrays[f"{split}_lengths"] = np.array([len(e) for e in examples], np.int64)
        arrays[f"{split}_sources"] = np.array([e.source for e in examples], dtype=str)
    tmp = None
    try:
        path = _path(key)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
        tmp.unlink(missing_ok=True)  # numpy opens the name as it finds it: a planted link is removed, not followed
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as error:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        reason = error.strerror or type(error).__name__
        return (f"the tokenized data could not be cached in {mlxtune_home() / 'tokenized'} ({reason}): training without "
                "the cache (the next run tokenizes again)")
    return None


def load_cached(key: str) -> tuple[dict[str, list[TokenizedExample]], dict] | None:
    path = _path(key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            splits = {}
            for split in meta["splits"]:
                ids, supervised = data[f"{split}_ids"], data[f"{split}_supervised"]
                bounds = np.cumsum(np.concatenate([[0], data[f"{split}_lengths"]]))
                sources = data[f"{split}_sources"].tolist()
                splits[split] = [
                    TokenizedExample(ids[a:b], supervised[a:b], source)
                    for a, b, source in zip(bounds[:-1], bounds[1:], sources)
                ]
    except (OSError, ValueError, KeyError, json.JSONDecodeError):
        return None  # a damaged cache entry is simply rebuilt
    return splits, meta
