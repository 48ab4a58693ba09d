"""A SentencePiece-vocabulary GGUF (stories260K, written by our own GGUF export as llama.cpp's converter would):
imported, it splits text into llama.cpp's ids and, at float32, continues a prompt with llama.cpp's greedy tokens."""

from __future__ import annotations

import mlx.core as mx
import pytest

from conftest import MODEL

llama_cpp = pytest.importorskip("llama_cpp", reason="interop suite: pip install -e '.[interop]'")

TEXTS = ["Once upon a time", "  two leading spaces", "Hello\nworld  with  spaces", "émigré 123 café", "emoji 😀!",
         "中文", "tabs\tand\n\nnewlines\t", "Tom and Lily went to the park."]


def test_sentencepiece_gguf_round_trip(tmp_path, monkeypatch):
    from mlx_lm.generate import generate_step
    from mlx_lm.utils import load

    from mlxtune.export.gguf import export_gguf
    from mlxtune.export.source import open_source
    from mlxtune.importers import pull_gguf

    monkeypatch.setenv("MLXTUNE_HOME", str(tmp_path / "home"))
    with open_source(MODEL) as source:
        gguf_file = export_gguf(source, tmp_path / "stories260K.gguf", "f32")
    entry = pull_gguf(str(gguf_file))
    model, tokenizer = load(entry.path)
    llama = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=256, n_threads=2, verbose=False)
    for text in TEXTS:
        assert tokenizer.encode(text, add_special_tokens=False) == llama.tokenize(text.encode(), add_bos=False,
                                                                                 special=True), text
    ids = llama.tokenize(b"Once upon a time", add_bos=True)
    assert tokenizer.encode("Once upon a time") == ids  # the add-BOS flag came along
    theirs = []
    for token in llama.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        if len(theirs) == 32 or token == llama.token_eos():
            break
        theirs.append(token)
    model.set_dtype(mx.float32)
    ours = [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=len(theirs))]
    assert len(theirs) >= 16 and ours == theirs
