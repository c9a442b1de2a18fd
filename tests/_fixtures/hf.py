"""Tiny Hugging Face models built from config (random weights, no Hub), the one builder for the
tests that seal and serve them: a BERT (classifier or base model) and a GPT-2 LM, each saved with
``save_pretrained`` (one file or sharded with ``max_shard_size``) and, when asked, with a real
tokenizer (BERT WordPiece over :data:`BERT_WORDS`, GPT-2 byte-level BPE over printable ASCII).

Each test names only what it needs (seed, positions, labels, shards...); everything else is the
same small shape everywhere. transformers is imported when a model is built: the test modules
``pytest.importorskip`` it first."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

#: The BERT tokenizer's words after its five special tokens ([PAD] 0 ... [MASK] 4): "hello" is 5,
#: "sealed" 6, "world" 7, and vocab.txt holds "sealed\nworld".
BERT_WORDS = ("hello", "sealed", "world", "model", "the", "secret", "weights", "##s", "text")
#: Printable ASCII as GPT-2's byte-level alphabet writes it (space is "Ġ"), a few merges.
GPT2_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("o", "n"))


def bert_tokenizer(directory: Path) -> None:
    """A WordPiece tokenizer over :data:`BERT_WORDS`: ``vocab.txt`` plus what ``save_pretrained``
    writes (``tokenizer.json``, ``tokenizer_config.json``)."""
    import transformers

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BERT_WORDS]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}).save_pretrained(directory)


def gpt2_tokenizer(directory: Path, **options: Any) -> int:
    """A byte-level BPE tokenizer (``<|endoftext|>`` last); returns its vocabulary size.
    ``options`` go to ``GPT2Tokenizer`` (``chat_template``, ``add_bos_token``...)."""
    import transformers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = [chr(b) for b in range(33, 127)] + ["Ġ"]
    assert set(alphabet) <= set(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    for a, b in GPT2_MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = list(GPT2_MERGES)
    transformers.GPT2Tokenizer(vocab=vocab, merges=merges, **options).save_pretrained(directory)
    return len(vocab)


def save_tiny(
    model: Any,
    directory: Path,
    *,
    max_shard_size: str | None = None,
    tokenizer: Callable[[Path], object] | None = None,
) -> None:
    """``save_pretrained`` (sharded when ``max_shard_size`` is given), then the tokenizer's
    files. Also used to save a second copy of one model (one file and sharded)."""
    options = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **options)
    if tokenizer is not None:
        tokenizer(directory)


def tiny_bert(
    directory: Path,
    *,
    seed: int,
    base: bool = False,
    labels: Mapping[int, str] | None = None,
    max_shard_size: str | None = None,
    tokenizer: bool = False,
    **config: Any,
) -> Any:
    """A 2-layer BERT sequence classifier over 3 labels (``base``: the bare ``BertModel``) saved
    in ``directory``; returns the model (eval mode). ``labels`` names the classes (id2label),
    ``config`` overrides BertConfig fields (vocab_size, max_position_embeddings...)."""
    import torch
    import transformers

    names: dict[str, Any] = {}
    if labels:
        names = {"id2label": dict(labels), "label2id": {v: k for k, v in labels.items()}}
    settings = {
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
        "num_labels": 3,
        **names,
        **config,
    }
    torch.manual_seed(seed)
    cls = transformers.BertModel if base else transformers.BertForSequenceClassification
    model = cls(transformers.BertConfig(**settings)).eval()
    save_tiny(
        model,
        directory,
        max_shard_size=max_shard_size,
        tokenizer=bert_tokenizer if tokenizer else None,
    )
    return model


def tiny_gpt2(
    directory: Path,
    *,
    seed: int,
    max_shard_size: str | None = None,
    tokenizer: bool = False,
    tokenizer_options: Mapping[str, Any] | None = None,
    generation: Mapping[str, Any] | None = None,
    **config: Any,
) -> Any:
    """A 2-layer GPT-2 LM saved in ``directory``; returns the model (eval mode). ``tokenizer``
    saves :func:`gpt2_tokenizer` too (given ``tokenizer_options``) and sizes the vocabulary to
    it (``<|endoftext|>`` as bos and eos); ``generation`` sets the saved generation defaults;
    ``config`` overrides GPT2Config fields (vocab_size, n_positions, bos/eos_token_id...)."""
    import torch
    import transformers

    settings: dict[str, Any] = {
        "vocab_size": 128,
        "n_positions": 64,
        "n_embd": 32,
        "n_layer": 2,
        "n_head": 2,
    }
    if tokenizer:
        vocab = gpt2_tokenizer(directory, **(tokenizer_options or {}))
        settings.update(vocab_size=vocab, bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**settings, **config})).eval()
    for name, value in (generation or {}).items():
        setattr(model.generation_config, name, value)
    save_tiny(model, directory, max_shard_size=max_shard_size)
    return model
