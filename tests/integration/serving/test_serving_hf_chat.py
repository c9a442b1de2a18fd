"""Chat models through the generate extension: ``messages`` rendered by the sealed chat template
(issue 16, item 3), over real HTTP.

One tiny GPT-2 built from config (random weights, no Hub) whose tokenizer carries a chat
template (saved by ``save_pretrained`` as ``chat_template.jinja``) and adds a BOS token, as
Llama-style chat tokenizers do: the template writes the BOS itself, so the rendered text must be
tokenized without special tokens, as ``apply_chat_template`` does. Sealed and served by one
in-process server; every answer is compared with plain transformers on the same machine, in the
same process: exactly equal. A model without a chat template is refused in
``test_serving_hf_text.py`` (its GPT-2 has none).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from serving_helpers import assert_protocol_error, running_server
from test_serving_hf_text import _generate, _stream

import sealtorch
from _fixtures.hf import gpt2_tokenizer, tiny_gpt2
from sealtorch.keys import write_key_file
from sealtorch.serving.server import SealedModelSource, ServerSettings
from sealtorch.serving.text import build_tokenizer

transformers = pytest.importorskip("transformers")

MAX_TOKENS = 40
#: A Llama-style template: the BOS token first, one turn per message, the assistant's turn open;
#: its own refusal for a system message that is not the first.
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('a system message may only come first') }}{% endif %}"
    "<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CONVERSATIONS = [
    [{"role": "user", "content": "the cat sat on"}],
    [
        {"role": "system", "content": "Answer in rhymes."},
        {"role": "user", "content": "Once upon a time"},
        {"role": "assistant", "content": "in the hat"},
        {"role": "user", "content": "and then?"},
    ],
    [{"role": "user", "content": ""}],
]


@dataclass(frozen=True)
class Served:
    url: str
    model: Any
    tokenizer: Any


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    root = tmp_path_factory.mktemp("hf-chat")
    key = root / "models.key"
    write_key_file(key)
    directory = root / "chat"
    tiny_gpt2(
        directory,
        seed=17,
        tokenizer=True,
        tokenizer_options={"chat_template": TEMPLATE, "add_bos_token": True},
        n_positions=128,
    )
    assert (directory / "chat_template.jinja").read_text() == TEMPLATE
    sealtorch.encrypt_model(directory, root / "chat.sealed", model_id="chat", key=key)
    settings = ServerSettings(port=0, max_tokens=MAX_TOKENS, max_body_bytes=64 * 1024)
    with running_server([SealedModelSource(root / "chat.sealed", key=key)], settings) as server:
        assert server.url is not None
        yield Served(
            url=server.url,
            model=transformers.AutoModelForCausalLM.from_pretrained(directory).eval(),
            tokenizer=transformers.AutoTokenizer.from_pretrained(directory),
        )


@pytest.fixture(scope="module")
def client(served: Served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served.url, timeout=120) as c:
        yield c


def _plain_chat(served: Served, messages: list[dict[str, str]], **kwargs: Any) -> str:
    """What plain transformers generates for the conversation."""
    tokenizer = served.tokenizer
    encoded = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt"
    )
    with torch.inference_mode():
        out = served.model.generate(
            **encoded, pad_token_id=served.model.generation_config.eos_token_id, **kwargs
        )
    new = out[0, encoded["input_ids"].shape[-1] :]
    text: str = tokenizer.decode(new, skip_special_tokens=True)
    return text


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["user", "turns", "empty"])
def test_chat_generation_equals_plain_transformers(
    client: httpx.Client, served: Served, messages: list[dict[str, str]]
) -> None:
    tokenizer = served.tokenizer
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    bos = tokenizer.bos_token_id
    # the template writes the BOS; tokenizing its text with special tokens would double it
    assert ids[0] == bos
    assert ids[1] != bos
    assert tokenizer(rendered)["input_ids"][:2] == [bos, bos]

    expected = _plain_chat(served, messages, max_new_tokens=20, do_sample=False)
    assert expected
    document = _generate(client, messages, "chat", max_tokens=20)
    assert set(document) == {"model_name", "model_version", "text_output", "finish_reason"}
    assert document["text_output"] == expected
    events = _stream(client, messages, "chat", max_tokens=20)
    assert "".join(e["text_output"] for e in events) == expected
    assert events[-1]["text_output"] == ""
    assert events[-1]["finish_reason"] == document["finish_reason"]
    # the raw prompt is another request: text_input is tokenized as given (BOS added)
    raw = _generate(client, rendered, "chat", max_tokens=20)["text_output"]
    encoded = tokenizer(rendered, return_tensors="pt")
    with torch.inference_mode():
        out = served.model.generate(
            **encoded, max_new_tokens=20, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    assert raw == tokenizer.decode(
        out[0, encoded["input_ids"].shape[-1] :], skip_special_tokens=True
    )


def test_chat_parameters_apply_as_for_text(client: httpx.Client, served: Served) -> None:
    messages = CONVERSATIONS[1]
    full = _plain_chat(served, messages, max_new_tokens=30, do_sample=False)
    stop = full[6:8]
    document = _generate(client, messages, "chat", max_tokens=30, stop=stop)
    assert document["text_output"] == full[: full.find(stop)]
    assert document["finish_reason"] == "stop"
    parameters = {"max_tokens": 12, "temperature": 0.9, "top_k": 20, "seed": 5}
    sampled = _generate(client, messages, "chat", **parameters)["text_output"]
    torch.manual_seed(5)
    assert sampled == _plain_chat(
        served, messages, max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20
    )


def test_metadata_is_unchanged_by_the_chat_template(client: httpx.Client) -> None:
    metadata = client.get("/v2/models/chat").json()
    assert [(i["name"], i["datatype"]) for i in metadata["inputs"]] == [
        ("input_ids", "INT64"),
        ("attention_mask", "INT64"),
        ("text", "BYTES"),
    ]


USER = {"role": "user", "content": "the cat"}
BAD_CHAT: list[tuple[dict[str, Any], str]] = [
    ({"text_input": "a", "messages": [USER]}, "exactly one of text_input"),
    ({"parameters": {"max_tokens": 2}}, "exactly one of text_input"),
    ({"messages": "the cat"}, "messages must be a non-empty list"),
    ({"messages": {"0": USER}}, "messages must be a non-empty list"),
    ({"messages": []}, "messages must be a non-empty list"),
    ({"messages": None}, "messages must be a non-empty list"),
    ({"messages": ["the cat"]}, "messages[0] must be a JSON object"),
    ({"messages": [USER, {"role": "tool", "content": "x"}]}, "messages[1].role must be one of"),
    ({"messages": [{"role": "developer", "content": "x"}]}, "role must be one of"),
    ({"messages": [{"role": "User", "content": "x"}]}, "role must be one of"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "role must be one of"),
    ({"messages": [{"content": "x"}]}, "role must be one of"),
    ({"messages": [{**USER, "name": "bob"}]}, "unknown key 'name'"),
    ({"messages": [{**USER, "tool_calls": []}]}, "unknown key 'tool_calls'"),
    ({"messages": [{**USER, "chat_template": "{{ 7 * 7 }}"}]}, "unknown key 'chat_template'"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content must be a string"),
    ({"messages": [{"role": "user", "content": None}]}, "content must be a string"),
    ({"messages": [{"role": "user"}]}, "content must be a string"),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]},
        "content must be a string",
    ),
    ({"messages": [{"role": "user", "content": "\udc80"}]}, "not valid Unicode"),
    ({"text_input": "\udc80"}, "not valid Unicode"),
    ({"messages": [USER] * 257}, "more than 256 messages"),
    ({"messages": [USER], "chat_template": "{{ 7 * 7 }}"}, "unknown field 'chat_template'"),
    ({"messages": [USER], "tools": [{"type": "function"}]}, "unknown field 'tools'"),
    ({"messages": [USER], "documents": []}, "unknown field 'documents'"),
    ({"messages": [USER], "add_generation_prompt": False}, "unknown field"),
    ({"messages": [USER], "parameters": {"chat_template": "x"}}, "unknown parameter"),
    ({"messages": [USER], "parameters": {"tools": []}}, "unknown parameter"),
    ({"messages": [USER], "parameters": {"max_tokens": 41}}, "max_tokens"),
    # the template's own refusal, one line
    (
        {"messages": [USER, {"role": "system", "content": "x"}]},
        "refuses these messages: 'a system message may only come first'",
    ),
    # within the count, beyond the model's 128 positions
    ({"messages": [USER] * 256}, "128 positions"),
    ({"messages": [{"role": "user", "content": "x" * 120}]}, "128 positions"),
]


@pytest.mark.parametrize("route", ["generate", "generate_stream"])
def test_bad_chat_requests_are_refused_and_change_nothing(
    client: httpx.Client, served: Served, route: str
) -> None:
    before = _generate(client, CONVERSATIONS[0], "chat", max_tokens=10)
    for body, reason in BAD_CHAT:
        raw = json.dumps(body).encode()
        response = client.post(
            f"/v2/models/chat/{route}", content=raw, headers={"content-type": "application/json"}
        )
        error = assert_protocol_error(response, 400)
        assert reason in error, (body, error)
        assert "\n" not in error
    huge = {"messages": [{"role": "user", "content": "a" * 100_000}]}
    assert_protocol_error(client.post(f"/v2/models/chat/{route}", json=huge), 413)
    assert _generate(client, CONVERSATIONS[0], "chat", max_tokens=10) == before


def test_the_sealed_chat_template_is_read_as_transformers_reads_it(tmp_path: Path) -> None:
    def files(directory: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in directory.iterdir()}

    saved = tmp_path / "saved"
    gpt2_tokenizer(saved, chat_template=TEMPLATE)
    ours = build_tokenizer(files(saved), "gpt2")
    assert ours.chat_template == TEMPLATE
    # an older save: the template inside tokenizer_config.json; chat_template.jinja wins over it
    older = files(saved)
    del older["chat_template.jinja"]
    config = json.loads(older["tokenizer_config.json"])
    older["tokenizer_config.json"] = json.dumps({**config, "chat_template": "{{ 'old' }}"}).encode()
    assert build_tokenizer(older, "gpt2").chat_template == "{{ 'old' }}"
    both = {**older, "chat_template.jinja": TEMPLATE.encode()}
    assert build_tokenizer(both, "gpt2").chat_template == TEMPLATE
    # vocabulary files only (no tokenizer.json): from_pretrained reads the template too
    bpe = json.loads(older.pop("tokenizer.json"))["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    vocabulary = {
        **older,
        "vocab.json": json.dumps(bpe["vocab"]).encode(),
        "merges.txt": "\n".join(["#version: 0.2", *merges]).encode(),
        "chat_template.jinja": TEMPLATE.encode(),
    }
    built = build_tokenizer(vocabulary, "gpt2")
    assert built.chat_template == TEMPLATE
    assert built("the cat")["input_ids"] == ours("the cat")["input_ids"]
    # no template anywhere: none
    del vocabulary["chat_template.jinja"]
    vocabulary["tokenizer_config.json"] = json.dumps(config).encode()
    assert build_tokenizer(vocabulary, "gpt2").chat_template is None
