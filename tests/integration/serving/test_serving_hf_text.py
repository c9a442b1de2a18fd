"""Hugging Face models served as text in, text out, over real HTTP (issue 16, item 3).

Tiny models built from config (random weights, no Hub) with real tokenizers, saved with
``save_pretrained`` (the classifier also sharded), sealed, and served by one in-process server:
a BERT classifier (text in, labels out), a BERT base model (embeddings), and a GPT-2 with 128
positions (tensor inference, the generate extension, streaming). Every answer is compared with
plain transformers on the same machine, in the same process (same threads): exactly equal.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from serving_helpers import assert_protocol_error, by_name, output_tensor, running_server

import sealtorch
from _fixtures.hf import bert_tokenizer, gpt2_tokenizer, save_tiny, tiny_bert, tiny_gpt2
from sealtorch.keys import write_key_file
from sealtorch.payloads.manifest import TensorSpec
from sealtorch.serving.generate import StopFilter
from sealtorch.serving.server import SealedModelSource, ServerSettings

transformers = pytest.importorskip("transformers")

LABELS = {0: "negative", 1: "neutral", 2: "positive"}
MAX_TOKENS = 40
PROMPTS = ["the cat sat on", "Once upon a time", "in the hat"]


@dataclass(frozen=True)
class Served:
    url: str
    grpc: str
    root: Path
    bert: Any
    bert_tokenizer: Any
    encoder: Any
    gpt2: Any
    gpt2_tokenizer: Any


#: The BERTs' shape: 24 positions (long texts are truncated), named labels.
BERT = {"vocab_size": 32, "max_position_embeddings": 24, "labels": LABELS, "tokenizer": True}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("hf-text")
    key = root / "models.key"
    write_key_file(key)

    bert = tiny_bert(root / "bert", seed=11, **BERT)
    save_tiny(bert, root / "bert-sharded", max_shard_size="20KB", tokenizer=bert_tokenizer)
    assert len(list((root / "bert-sharded").glob("model-*.safetensors"))) > 1
    tiny_bert(root / "encoder", seed=12, base=True, **BERT)

    gpt2_dir = root / "gpt2"
    gpt2 = tiny_gpt2(
        gpt2_dir,
        seed=13,
        tokenizer=True,
        n_positions=128,  # a warm-up of 224 tokens could not run
        generation={"repetition_penalty": 1.2},  # sealed generation defaults apply
    )
    sharded = root / "gpt2-sharded"
    save_tiny(gpt2, sharded, max_shard_size="20KB", tokenizer=gpt2_tokenizer)
    assert len(list(sharded.glob("model-*.safetensors"))) > 1

    names = ("bert", "bert-sharded", "encoder", "gpt2", "gpt2-sharded")
    for name in names:
        sealtorch.encrypt_model(root / name, root / f"{name}.sealed", model_id=name, key=key)
    sources = [SealedModelSource(root / f"{name}.sealed", key=key) for name in names]

    settings = ServerSettings(port=0, grpc_port=0, max_tokens=MAX_TOKENS, max_body_bytes=64 * 1024)
    with running_server(sources, settings) as server:
        assert server.url is not None
        assert server.grpc_url is not None
        yield Served(
            url=server.url,
            grpc=server.grpc_url.removeprefix("grpc://"),
            root=root,
            bert=transformers.AutoModelForSequenceClassification.from_pretrained(
                root / "bert"
            ).eval(),
            bert_tokenizer=transformers.AutoTokenizer.from_pretrained(root / "bert"),
            encoder=transformers.AutoModel.from_pretrained(root / "encoder").eval(),
            gpt2=transformers.AutoModelForCausalLM.from_pretrained(gpt2_dir).eval(),
            gpt2_tokenizer=transformers.AutoTokenizer.from_pretrained(gpt2_dir),
        )


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=120) as c:
        yield c


def _text(*texts: str, name: str = "text") -> dict[str, Any]:
    return {"name": name, "datatype": "BYTES", "shape": [len(texts)], "data": list(texts)}


def _infer(client: httpx.Client, model: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def _plain_generate(served: Served, prompt: str, **kwargs: Any) -> str:
    tokenizer = served.gpt2_tokenizer
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = served.gpt2.generate(
            **encoded, pad_token_id=served.gpt2.generation_config.eos_token_id, **kwargs
        )
    text: str = tokenizer.decode(out[0, encoded["input_ids"].shape[-1] :], skip_special_tokens=True)
    return text


#: A prompt: a text (``text_input``) or a chat conversation (``messages``).
Prompt = str | list[dict[str, str]]


def _request(prompt: Prompt, parameters: dict[str, Any]) -> dict[str, Any]:
    field = "text_input" if isinstance(prompt, str) else "messages"
    return {field: prompt, "parameters": parameters}


def _generate(
    client: httpx.Client, prompt: Prompt, model: str = "gpt2", **parameters: Any
) -> dict[str, Any]:
    response = client.post(f"/v2/models/{model}/generate", json=_request(prompt, parameters))
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def _stream(
    client: httpx.Client, prompt: Prompt, model: str = "gpt2", **parameters: Any
) -> list[dict[str, Any]]:
    events = []
    body = _request(prompt, parameters)
    with client.stream("POST", f"/v2/models/{model}/generate_stream", json=body) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line:
                assert line.startswith("data: "), line
                events.append(json.loads(line[len("data: ") :]))
    return events


# -- metadata ------------------------------------------------------------------------------------


def test_metadata_follows_the_config(client: httpx.Client, served: Served) -> None:
    ids = {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}
    mask = {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}
    types = {"name": "token_type_ids", "datatype": "INT64", "shape": [-1, -1]}
    text = {"name": "text", "datatype": "BYTES", "shape": [-1]}
    gpt2 = client.get("/v2/models/gpt2").json()
    assert gpt2["inputs"] == [ids, mask, text]  # GPT-2 has no token types
    vocab = len(served.gpt2_tokenizer)
    assert gpt2["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, -1, vocab]}]
    bert = client.get("/v2/models/bert").json()
    assert bert["inputs"] == [ids, mask, types, text]
    assert [(o["name"], o["shape"]) for o in bert["outputs"]] == [
        ("logits", [-1, 3]),
        ("probabilities", [-1, 3]),
    ]
    encoder = client.get("/v2/models/encoder").json()
    assert [(o["name"], o["shape"]) for o in encoder["outputs"]] == [
        ("last_hidden_state", [-1, -1, 32]),
        ("pooler_output", [-1, 32]),
        ("embeddings", [-1, 32]),
    ]
    assert "generate" in client.get("/v2").json()["extensions"]


# -- tensors and text in ------------------------------------------------------------------------


def test_gpt2_tensor_inference_returns_logits_without_a_cache(
    client: httpx.Client, served: Served
) -> None:
    ids = torch.tensor([[5, 9, 40, 2], [7, 7, 1, 0]])
    body = {
        "inputs": [
            {
                "name": "input_ids",
                "datatype": "INT64",
                "shape": [2, 4],
                "data": ids.flatten().tolist(),
            }
        ]
    }
    response = client.post("/v2/models/gpt2/infer", json=body)
    assert_protocol_error(response, 400)  # attention_mask is an input too
    body["inputs"].append(
        {"name": "attention_mask", "datatype": "INT64", "shape": [2, 4], "data": [1] * 8}
    )
    logits = output_tensor(by_name(_infer(client, "gpt2", body))["logits"])
    with torch.inference_mode():
        expected = served.gpt2(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(logits, expected)


@pytest.mark.parametrize("model", ["bert", "bert-sharded"])
def test_bert_text_in_labels_out_as_plain_transformers(
    client: httpx.Client, served: Served, model: str
) -> None:
    texts = ["hello sealed world", "the secret weights", "text", "hello hello model models"]
    document = _infer(
        client,
        model,
        {
            "inputs": [_text(*texts)],
            "outputs": [
                {"name": "logits", "parameters": {"classification": 1}},
                {"name": "probabilities"},
            ],
        },
    )
    outputs = by_name(document)
    encoded = served.bert_tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        logits = served.bert(**encoded).logits
    expected = [LABELS[int(i)] for i in logits.argmax(-1)]
    assert [entry.split(":")[2] for entry in outputs["logits"]["data"]] == expected
    assert torch.equal(output_tensor(outputs["probabilities"]), logits.softmax(-1))
    # the same as transformers' own pipeline, one text at a time
    pipeline = transformers.pipeline(
        "text-classification", model=served.bert, tokenizer=served.bert_tokenizer
    )
    assert [r["label"] for r in pipeline(texts)] == expected
    # the raw logits, exact
    raw = _infer(client, model, {"inputs": [_text(*texts)], "outputs": [{"name": "logits"}]})
    assert torch.equal(output_tensor(by_name(raw)["logits"]), logits)


def test_long_text_is_truncated_to_the_models_positions(
    client: httpx.Client, served: Served
) -> None:
    text = " ".join(["hello"] * 100)
    raw = _infer(client, "bert", {"inputs": [_text(text)], "outputs": [{"name": "logits"}]})
    encoded = served.bert_tokenizer([text], truncation=True, max_length=24, return_tensors="pt")
    assert encoded["input_ids"].shape[-1] == 24
    with torch.inference_mode():
        assert torch.equal(output_tensor(by_name(raw)["logits"]), served.bert(**encoded).logits)


def test_base_model_text_in_embeddings_out(client: httpx.Client, served: Served) -> None:
    texts = ["hello world", "the sealed model weights"]
    outputs = by_name(_infer(client, "encoder", {"inputs": [_text(*texts)]}))
    encoded = served.bert_tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        out = served.encoder(**encoded)
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    mean = (out.last_hidden_state * mask).sum(1) / mask.sum(1)
    assert torch.equal(output_tensor(outputs["embeddings"]), mean)
    assert torch.equal(output_tensor(outputs["pooler_output"]), out.pooler_output)
    assert torch.equal(output_tensor(outputs["last_hidden_state"]), out.last_hidden_state)


def test_sequences_longer_than_the_models_positions_are_refused(client: httpx.Client) -> None:
    body = {
        "inputs": [
            {"name": name, "datatype": "INT64", "shape": [1, 129], "data": [1] * 129}
            for name in ("input_ids", "attention_mask")
        ]
    }
    error = assert_protocol_error(client.post("/v2/models/gpt2/infer", json=body), 400)
    assert "at most 128" in error


def test_vocabulary_only_tokenizers_are_built_as_transformers_builds_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    from sealtorch.errors import PayloadError
    from sealtorch.serving.text import build_tokenizer

    directory = tmp_path / "bert"
    bert_tokenizer(directory)
    (directory / "tokenizer.json").unlink()  # vocab.txt and tokenizer_config.json only
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    ours = build_tokenizer(files, "bert")
    assert list(scratch.iterdir()) == []  # the private directory is gone
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    texts = ["hello sealed world", "the secret weights text", "unknown words here"]
    assert ours(texts, padding=True)["input_ids"] == theirs(texts, padding=True)["input_ids"]
    assert ours("hello sealed")["input_ids"] == [2, 5, 6, 3]  # the vocabulary, not [UNK]s
    # a tokenizer that names remote code is refused
    remote = dict(files)
    remote["tokenizer_config.json"] = json.dumps({"auto_map": {"AutoTokenizer": "x.Y"}}).encode()
    with pytest.raises(PayloadError, match="auto_map"):
        build_tokenizer(remote, "bert")
    # a class name from the file is only looked up in transformers' own table
    config = json.loads(files["tokenizer_config.json"])
    for named in ("subprocess.Popen", "os:system", "AutoTokenizer"):
        hostile = dict(files)
        hostile["tokenizer_config.json"] = json.dumps({**config, "tokenizer_class": named}).encode()
        built = build_tokenizer(hostile, "bert")
        assert type(built).__name__ == "BertTokenizer"
        assert built("hello sealed")["input_ids"] == [2, 5, 6, 3]
    # no tokenizer files: no tokenizer (token ids only)
    assert build_tokenizer({"config.json": b"{}"}, "bert") is None


def test_bad_text_inputs_are_refused(client: httpx.Client) -> None:
    cases = [
        {"inputs": [_text("hello"), {"name": "input_ids", "datatype": "INT64", "shape": [1, 1],
                                     "data": [5]}]},
        {"inputs": [{"name": "text", "datatype": "INT64", "shape": [1], "data": [5]}]},
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1], "data": ["x"]}]},
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]},
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": ["\udc80"]}]},
    ]  # fmt: skip
    for body in cases:
        raw = json.dumps(body).encode()
        response = client.post(
            "/v2/models/bert/infer", content=raw, headers={"content-type": "application/json"}
        )
        assert_protocol_error(response, 400)
    # GPT-2 has no padding token: one text per request
    error = assert_protocol_error(
        client.post("/v2/models/gpt2/infer", json={"inputs": [_text("a", "bb")]}), 400
    )
    assert "padding" in error
    assert _infer(client, "gpt2", {"inputs": [_text("the cat")]})["outputs"]


def test_text_over_grpc_with_the_triton_client(served: Served) -> None:
    import numpy as np
    import tritonclient.grpc as grpcclient

    texts = ["hello sealed world", "the secret"]
    client = grpcclient.InferenceServerClient(served.grpc)
    try:
        text = grpcclient.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
        result = client.infer(
            "bert", [text], outputs=[grpcclient.InferRequestedOutput("logits", class_count=1)]
        )
        labels = [entry.decode().split(":")[2] for entry in result.as_numpy("logits").ravel()]
    finally:
        client.close()
    encoded = served.bert_tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.inference_mode():
        logits = served.bert(**encoded).logits
    assert labels == [LABELS[int(i)] for i in logits.argmax(-1)]


# -- generate ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["gpt2", "gpt2-sharded"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_generation_equals_plain_generate(
    client: httpx.Client, served: Served, prompt: str, model: str
) -> None:
    document = _generate(client, prompt, model, max_tokens=20)
    assert set(document) == {"model_name", "model_version", "text_output", "finish_reason"}
    assert document["model_name"] == model
    expected = _plain_generate(served, prompt, max_new_tokens=20, do_sample=False)
    assert expected
    assert document["text_output"] == expected
    # the stream's pieces make the same text; its last event says why it ended
    events = _stream(client, prompt, model, max_tokens=20)
    assert all(e["model_name"] == model for e in events)
    assert "".join(e["text_output"] for e in events) == expected
    assert events[-1]["text_output"] == ""
    assert events[-1]["finish_reason"] == document["finish_reason"]
    assert all("finish_reason" not in e for e in events[:-1])


def test_max_tokens_bounds_the_generation(client: httpx.Client, served: Served) -> None:
    document = _generate(client, PROMPTS[0], max_tokens=3)
    assert document["text_output"] == _plain_generate(
        served, PROMPTS[0], max_new_tokens=3, do_sample=False
    )
    assert document["finish_reason"] == "length"
    default = _generate(client, PROMPTS[0])  # 16 tokens unless asked
    assert default["text_output"] == _plain_generate(
        served, PROMPTS[0], max_new_tokens=16, do_sample=False
    )


def test_stop_strings_end_the_text_before_them(client: httpx.Client, served: Served) -> None:
    full = _plain_generate(served, PROMPTS[1], max_new_tokens=30, do_sample=False)
    stop = full[8:10]
    expected = full[: full.find(stop)]
    document = _generate(client, PROMPTS[1], max_tokens=30, stop=[stop, "never there"])
    assert document["text_output"] == expected
    assert document["finish_reason"] == "stop"
    events = _stream(client, PROMPTS[1], max_tokens=30, stop=stop)
    assert "".join(e["text_output"] for e in events) == expected
    assert events[-1]["finish_reason"] == "stop"


def test_sampling_with_a_seed_is_reproducible(client: httpx.Client, served: Served) -> None:
    parameters = {"max_tokens": 12, "temperature": 0.9, "top_k": 20, "top_p": 0.95, "seed": 42}
    first = _generate(client, PROMPTS[2], **parameters)["text_output"]
    assert _generate(client, PROMPTS[2], **parameters)["text_output"] == first
    torch.manual_seed(42)
    assert first == _plain_generate(
        served, PROMPTS[2], max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, top_p=0.95
    )
    events = _stream(client, PROMPTS[2], **parameters)
    assert "".join(e["text_output"] for e in events) == first
    others = {
        _generate(client, PROMPTS[2], **{**parameters, "seed": s})["text_output"] for s in range(5)
    }
    assert len(others) > 1


BAD_GENERATE = [
    (b"not json", "not valid JSON"),
    (b"[]", "JSON object"),
    (b'{"parameters": {}}', "text_input"),
    (b'{"text_input": ""}', "text_input"),
    (b'{"text_input": 5}', "text_input"),
    (b'{"text_input": "a", "extra": 1}', "unknown field"),
    (b'{"text_input": "a", "parameters": []}', "parameters"),
    (b'{"text_input": "a", "parameters": {"beams": 4}}', "unknown parameter"),
    (b'{"text_input": "a", "parameters": {"max_tokens": 0}}', "max_tokens"),
    (b'{"text_input": "a", "parameters": {"max_tokens": true}}', "max_tokens"),
    (b'{"text_input": "a", "parameters": {"max_tokens": 41}}', "max_tokens"),
    (b'{"text_input": "a", "parameters": {"max_tokens": 2.5}}', "max_tokens"),
    (b'{"text_input": "a", "parameters": {"temperature": -1}}', "temperature"),
    (b'{"text_input": "a", "parameters": {"temperature": "hot"}}', "temperature"),
    (b'{"text_input": "a", "parameters": {"top_p": 0.5}}', "temperature above 0"),
    (b'{"text_input": "a", "parameters": {"temperature": 1, "top_p": 1.5}}', "top_p"),
    (b'{"text_input": "a", "parameters": {"temperature": 1, "top_k": 0}}', "top_k"),
    (b'{"text_input": "a", "parameters": {"seed": 3}}', "temperature above 0"),
    (b'{"text_input": "a", "parameters": {"temperature": 1, "seed": -3}}', "seed"),
    (b'{"text_input": "a", "parameters": {"stop": 5}}', "stop"),
    (b'{"text_input": "a", "parameters": {"stop": [""]}}', "stop"),
    (b'{"text_input": "a", "parameters": {"stream": "yes"}}', "stream"),
    (b'{"text_input": "\xff"}', "not valid JSON"),
]


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_bad_generate_requests_are_refused_and_change_nothing(
    client: httpx.Client, served: Served, route: str
) -> None:
    before = _generate(client, PROMPTS[0], max_tokens=10)
    for body, reason in BAD_GENERATE:
        response = client.post(
            f"/v2/models/gpt2/{route}", content=body, headers={"content-type": "application/json"}
        )
        assert reason in assert_protocol_error(response, 400), body
    # a prompt too long for the model's 128 positions
    long = {"text_input": "x" * 120, "parameters": {"max_tokens": 20}}
    error = assert_protocol_error(client.post(f"/v2/models/gpt2/{route}", json=long), 400)
    assert "128 positions" in error
    # not a causal LM; unknown model; too large a body
    assert_protocol_error(client.post(f"/v2/models/bert/{route}", json={"text_input": "a"}), 400)
    assert_protocol_error(client.post(f"/v2/models/nope/{route}", json={"text_input": "a"}), 404)
    huge = {"text_input": "a" * 100_000}
    assert_protocol_error(client.post(f"/v2/models/gpt2/{route}", json=huge), 413)
    assert _generate(client, PROMPTS[0], max_tokens=10) == before


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_messages_need_a_sealed_chat_template(client: httpx.Client, route: str) -> None:
    body = {"messages": [{"role": "user", "content": "the cat"}]}
    error = assert_protocol_error(client.post(f"/v2/models/gpt2/{route}", json=body), 400)
    assert "no chat template" in error
    assert "text_input" in error
    assert "chat_template" in error
    assert "\n" not in error
    assert _generate(client, "the cat", max_tokens=2)["text_output"] is not None


def test_a_stream_whose_client_leaves_stops_and_frees_its_place(client: httpx.Client) -> None:
    body = {"text_input": PROMPTS[0], "parameters": {"max_tokens": MAX_TOKENS}}
    with client.stream("POST", "/v2/models/gpt2/generate_stream", json=body) as response:
        assert response.status_code == 200
        first = next(response.iter_lines())
        assert first.startswith("data: ")
    # the server finishes (or cancels) that generation and counts nothing in flight
    deadline = time.monotonic() + 60
    while True:
        metrics = client.get("/metrics").text
        if "sealtorch_inference_in_flight 0.0" in metrics:
            break
        assert time.monotonic() < deadline, metrics
        time.sleep(0.05)
    assert _generate(client, PROMPTS[0], max_tokens=4)["text_output"] is not None


def test_stop_filter_holds_back_what_may_start_a_stop_string() -> None:
    out: list[str] = []
    f = StopFilter(["END", "xyz"], out.append)
    for piece in ["abc E", "N", "D more"]:
        f.feed(piece)
    f.close()
    assert "".join(out) == "abc "
    assert f.stopped
    out.clear()
    f = StopFilter(["END"], out.append)
    for piece in ["EN", "d E", "N"]:
        f.feed(piece)
    f.close()
    assert out == ["ENd ", "EN"]


# -- serve-side interface --------------------------------------------------------------------------


def test_serve_side_inputs_override_the_sealed_declaration(served: Served) -> None:
    # a second server on the same sealed file, told other inputs than the sealed defaults
    source = SealedModelSource(
        served.root / "gpt2.sealed",
        key=served.root / "models.key",
        inputs=[
            TensorSpec(name="input_ids", datatype="INT64", shape=(-1, -1)),
            TensorSpec(name="prompt", datatype="BYTES", shape=(-1,)),
        ],
    )
    with running_server([source]) as server, httpx.Client(base_url=server.url) as c:
        metadata = c.get("/v2/models/gpt2").json()
        assert [i["name"] for i in metadata["inputs"]] == ["input_ids", "prompt"]
        body = {"inputs": [_text("the cat", name="prompt")]}
        response = c.post("/v2/models/gpt2/infer", json=body)
        assert response.status_code == 200, response.text


def test_serve_refuses_an_interface_per_model_mismatch(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sealtorch.cli import cli

    key = tmp_path / "k.key"
    write_key_file(key)
    spec = '[{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]}]'
    cases = [
        (["--inputs", spec, "--inputs", spec], "given 2 times for 1 models"),
        (["--inputs", "{}"], "non-empty JSON list"),
        (["--outputs", '[{"name": "x", "datatype": "NOPE", "shape": [1]}]'], "datatype"),
        (["--inputs", "[1"], "not valid JSON"),
    ]
    for extra, message in cases:
        result = CliRunner().invoke(
            cli, ["serve", str(tmp_path / "m.sealed"), "--key-file", str(key), *extra]
        )
        assert result.exit_code == 2, result.output
        assert message in result.output, result.output
