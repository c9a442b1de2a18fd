"""Text generation: tokens/s through the sealed server's generate extension vs plain
transformers ``model.generate`` on the same model, in the same process.

A GPT-2 built from config (random weights, no Hub) with a byte-level BPE tokenizer is saved
with ``save_pretrained``, sealed, and served by the inference server (``SealedModelSource``,
the code path of ``sealtorch serve``) on a loopback socket. Each round generates greedily
from the same prompts, once with ``POST /v2/models/gpt2/generate`` (HTTP, JSON, tokenizing and
decoding included) and once with plain ``tokenizer`` + ``model.generate`` + ``decode`` on the
plain directory's model, interleaved (never at the same time), best of several rounds. Both
produce the same tokens (checked), so the tokens/s ratio is the time ratio. Also measured:
the stream (``generate_stream``, one server-sent event per piece) against the same baseline.
The ratio reported is the median over rounds of each round's time ratio (both sides measured
within the same round, prompt by prompt), which drift on a shared machine cancels out of;
the best tokens/s of each side are in the details. Issue #16's target: sealed / plain >= 0.98.
"""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch

import sealtorch
from benchmarks._harness import Context, Result, result
from sealtorch.keys import DataKey

KEY = DataKey(bytes(range(32)))
PROMPTS = ("The sealed model", "Once upon a time in", "Attested inference is")
_MERGES = (("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "a"), ("i", "n"), ("e", "r"))


def _build(directory: Path, *, embd: int, layers: int) -> None:
    import transformers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    for a, b in _MERGES:
        vocab[a + b] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer_class: Any = transformers.GPT2Tokenizer  # merges as pairs, which it takes
    tokenizer_class(vocab=vocab, merges=list(_MERGES)).save_pretrained(directory)
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=len(vocab),
        n_positions=512,
        n_embd=embd,
        n_layer=layers,
        n_head=embd // 64,
        bos_token_id=len(vocab) - 1,
        eos_token_id=len(vocab) - 1,
    )
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)


@contextmanager
def _server(sealed: Path, max_tokens: int) -> Iterator[str]:
    from sealtorch.serving.server import InferenceServer, SealedModelSource, ServerSettings

    server = InferenceServer(
        ServerSettings(port=0, max_tokens=max_tokens),
        [SealedModelSource(sealed, key=KEY, name="gpt2")],
    )
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            server.run()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    while not server.ready.wait(0.05):
        if errors or not thread.is_alive():
            raise RuntimeError(f"the server stopped while loading: {errors!r}")
    try:
        assert server.url is not None
        yield server.url
    finally:
        server.stop()
        thread.join(60)


def _plain(model: Any, tokenizer: Any, prompt: str, tokens: int) -> tuple[str, int]:
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(
            **encoded,
            max_new_tokens=tokens,
            do_sample=False,
            pad_token_id=model.generation_config.eos_token_id,
        )
    new = out[0, encoded["input_ids"].shape[-1] :]
    return tokenizer.decode(new, skip_special_tokens=True), len(new)


def _sealed(client: httpx.Client, prompt: str, tokens: int) -> str:
    body = {"text_input": prompt, "parameters": {"max_tokens": tokens}}
    response = client.post("/v2/models/gpt2/generate", json=body)
    response.raise_for_status()
    return str(response.json()["text_output"])


def _streamed(client: httpx.Client, prompt: str, tokens: int) -> str:
    body = {"text_input": prompt, "parameters": {"max_tokens": tokens}}
    pieces = []
    with client.stream("POST", "/v2/models/gpt2/generate_stream", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data: "):
                pieces.append(json.loads(line[6:])["text_output"])
    return "".join(pieces)


def run(ctx: Context) -> list[Result]:
    import transformers

    embd, layers, tokens, rounds = (256, 4, 48, 3) if ctx.quick else (768, 6, 128, 7)
    directory = ctx.workdir / "gpt2"
    _build(directory, embd=embd, layers=layers)
    sealed = ctx.workdir / "gpt2.sealed"
    sealtorch.encrypt_model(directory, sealed, model_id="gpt2", key=KEY)
    model: Any = transformers.AutoModelForCausalLM.from_pretrained(directory)
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)

    best = {"plain": float("inf"), "sealed": float("inf"), "stream": float("inf")}
    ratios: dict[str, list[float]] = {"sealed": [], "stream": []}
    generated = 0
    with _server(sealed, tokens) as url, httpx.Client(base_url=url, timeout=600) as client:
        expected = {}
        for prompt in PROMPTS:  # warm-up, and the texts every run must give
            expected[prompt], _ = _plain(model, tokenizer, prompt, tokens)
            if _sealed(client, prompt, tokens) != expected[prompt]:
                raise RuntimeError("the sealed server generated other text than transformers")
            if _streamed(client, prompt, tokens) != expected[prompt]:
                raise RuntimeError("the stream's text differs from transformers'")
        labels = ["plain", "sealed", "stream"]
        for round_ in range(rounds):
            spent = dict.fromkeys(labels, 0.0)
            count = 0
            for index, prompt in enumerate(PROMPTS):
                # Interleaved per prompt, in a rotating order: drift on a shared machine
                # hits every side alike.
                shift = (round_ + index) % len(labels)
                for label in labels[shift:] + labels[:shift]:
                    begin = time.perf_counter()
                    if label == "plain":
                        text, n = _plain(model, tokenizer, prompt, tokens)
                        count += n
                    elif label == "sealed":
                        text = _sealed(client, prompt, tokens)
                    else:
                        text = _streamed(client, prompt, tokens)
                    spent[label] += time.perf_counter() - begin
                    if text != expected[prompt]:
                        raise RuntimeError(f"{label} generated other text")
            generated = count
            for label in labels:
                best[label] = min(best[label], spent[label])
            for label in ratios:  # tokens/s ratio of this round: the inverse time ratio
                ratios[label].append(spent["plain"] / spent[label])
    rate = {label: generated / seconds for label, seconds in best.items()}
    ratio = {label: statistics.median(values) for label, values in ratios.items()}
    details = {
        "model": f"GPT-2 n_embd={embd} n_layer={layers} (random weights)",
        "tokens_per_round": generated,
        "prompts": len(PROMPTS),
        "tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "round_ratios": {k: [round(r, 3) for r in v] for k, v in ratios.items()},
    }
    return [
        result(
            "generate/sealed-vs-plain",
            "tokens/s, sealed server / plain generate",
            ratio["sealed"],
            "x",
            ">= 0.98",
            **details,
        ),
        result(
            "generate/stream-vs-plain",
            "tokens/s, sealed generate_stream / plain generate",
            ratio["stream"],
            "x",
            None,
            **details,
        ),
        result("generate/plain", "tokens/s, plain generate", rate["plain"], "tokens/s"),
    ]
