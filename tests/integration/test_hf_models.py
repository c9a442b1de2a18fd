"""Hugging Face models end to end: built from config (tiny, random weights, no Hub), saved with
``save_pretrained`` (one file and sharded), sealed with the CLI, loaded with
``sealtorch.load_model``: bit-identical weights and logits to plain ``from_pretrained`` of the
same directory in the same process (same threads), tied weights tied, tokenizer files carried.
And the host's attacks on the sealed set of a sharded model."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import sealtorch
from _fixtures.hf import tiny_bert, tiny_gpt2
from sealtorch.cli import cli
from sealtorch.errors import ConfigError, IntegrityError, PayloadError

transformers = pytest.importorskip("transformers")

KEY_LINE = "sealtorch-data-key-v1:AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"


def run(*args: str | Path) -> str:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "model.key"
    path.write_text(KEY_LINE + "\n")
    path.chmod(0o600)
    return path


bert = partial(tiny_bert, seed=1, tokenizer=True)
gpt2 = partial(
    tiny_gpt2,
    seed=2,
    bos_token_id=0,
    eos_token_id=0,
    generation={"max_new_tokens": 6, "repetition_penalty": 1.3},
)


def assert_same_model(sealed: torch.nn.Module, plain: torch.nn.Module, vocab: int) -> None:
    assert type(sealed) is type(plain)
    assert not sealed.training
    ours, theirs = sealed.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype, name
        assert torch.equal(ours[name], tensor), name
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (3, 12), generator=generator)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = plain(input_ids=ids, attention_mask=mask).logits
        got = sealed(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shard", [None, "40KB"], ids=["one-file", "sharded"])
def test_gpt2_seal_and_load(tmp_path: Path, key_file: Path, shard: str | None) -> None:
    directory = tmp_path / "gpt2"
    gpt2(directory, max_shard_size=shard)
    assert "lm_head.weight" not in json.dumps(
        json.loads((directory / "model.safetensors.index.json").read_text())
        if shard
        else list(__import__("safetensors.torch").torch.load_file(directory / "model.safetensors"))
    )
    shards = sorted(directory.glob("model-*.safetensors"))
    output = run(
        "encrypt", directory, "-o", tmp_path / "gpt2.sealed", "--model-id", "gpt2",
        "--key-file", key_file,
    )  # fmt: skip
    if shard:
        assert len(shards) > 1
        assert f"files        {len(shards)} (a sealed set" in output
        assert len(list(tmp_path.glob("gpt2.sealed.*-of-*"))) == len(shards) - 1
    plain = transformers.AutoModelForCausalLM.from_pretrained(directory).eval()
    sealed = sealtorch.load_model(tmp_path / "gpt2.sealed", key=key_file)
    # The tie GPT-2's checkpoint leaves out is restored as a tie, not a copy.
    assert sealed.lm_head.weight.data_ptr() == sealed.transformer.wte.weight.data_ptr()
    assert_same_model(sealed, plain, vocab=128)
    # The sealed generation_config.json is the model's generation defaults, as from_pretrained's.
    assert sealed.generation_config.to_dict() == plain.generation_config.to_dict()
    assert sealed.generation_config.max_new_tokens == 6
    with torch.no_grad():
        assert torch.equal(
            sealed.generate(torch.tensor([[5, 6]])), plain.generate(torch.tensor([[5, 6]]))
        )
    # Greedy generation is the same token for token.
    prompt = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        expected = plain.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        got = sealed.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("shard", [None, "20KB"], ids=["one-file", "sharded"])
def test_bert_classifier_seal_and_load(tmp_path: Path, key_file: Path, shard: str | None) -> None:
    directory = tmp_path / "bert"
    bert(directory, max_shard_size=shard)
    run(
        "encrypt", directory, "-o", tmp_path / "bert.sealed", "--model-id", "bert",
        "--key-file", key_file, "--max-file-size", "64KiB",
    )  # fmt: skip
    assert list(tmp_path.glob("bert.sealed.*-of-*"))
    plain = transformers.AutoModelForSequenceClassification.from_pretrained(directory).eval()
    sealed = sealtorch.load_model(tmp_path / "bert.sealed", key=key_file)
    assert_same_model(sealed, plain, vocab=9)
    # Nothing in the clear: no tensor name, no vocabulary, no config in any sealed file.
    for path in tmp_path.glob("bert.sealed*"):
        data = path.read_bytes()
        for secret in (b"classifier", b"attention", b"sealed\nworld", b"BertForSequence"):
            assert secret not in data
    # The owner gets the directory back: config and tokenizer byte for byte, loadable weights.
    run("decrypt", tmp_path / "bert.sealed", "--key-file", key_file, "-o", tmp_path / "back")
    for name in ("config.json", "vocab.txt", "tokenizer_config.json", "tokenizer.json"):
        assert (tmp_path / "back" / name).read_bytes() == (directory / name).read_bytes()
    again = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "back")
    assert_same_model(again.eval(), plain, vocab=9)
    text = "hello sealed world"
    expected = transformers.AutoTokenizer.from_pretrained(directory)(text)["input_ids"]
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "back")(text)["input_ids"] == (
        expected
    )
    assert expected[0] == 2
    assert expected[-1] == 3
    assert 1 not in expected  # every word known: the sealed tokenizer kept its vocabulary
    assert len(expected) == 5


def test_explicit_transformers_arch_and_refusals(tmp_path: Path, key_file: Path) -> None:
    directory = tmp_path / "bert"
    bert(directory)
    key = key_file
    # Another class the Auto tables build for this config: the base model (classifier dropped
    # is "unexpected" weights: refused at sealing time).
    with pytest.raises(PayloadError, match="do not match transformers:BertModel"):
        sealtorch.encrypt_model(
            directory, tmp_path / "x.sealed", model_id="b", key=key, arch="transformers:BertModel"
        )
    for arch, message in (
        ("transformers:GPT2LMHeadModel", "not a class that AutoModel"),
        ("transformers:PreTrainedModel", "not a class that AutoModel"),
        ("torchvision:resnet18", "rebuilt from its config"),
    ):
        with pytest.raises((ConfigError, PayloadError), match=message):
            sealtorch.encrypt_model(
                directory, tmp_path / "x.sealed", model_id="b", key=key, arch=arch
            )
    with pytest.raises(ConfigError, match="takes no architecture kwargs"):
        sealtorch.encrypt_model(
            directory,
            tmp_path / "x.sealed",
            model_id="b",
            key=key,
            arch="transformers:BertForSequenceClassification",
            arch_kwargs={"num_labels": 2},
        )
    assert not list(tmp_path.glob("x.sealed*"))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"auto_map": {"AutoModel": "modeling_evil.Evil"}}, "trust_remote_code"),
        ({"model_type": "evil"}, "does not know"),
        ({"attn_implementation": "kernels-community/evil"}, "eager or sdpa"),
        ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantized"),
    ],
)
def test_hostile_configs_are_refused(
    tmp_path: Path, key_file: Path, edit: dict[str, object], message: str
) -> None:
    directory = tmp_path / "bert"
    bert(directory)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(ConfigError, match=message):
        sealtorch.encrypt_model(directory, tmp_path / "x.sealed", model_id="b", key=key_file)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("modeling_evil.py", "never carries code"),
        ("pytorch_model.bin", "does not list"),
        ("notes.exe", "does not know how to carry"),
    ],
)
def test_unsealable_directory_contents(
    tmp_path: Path, key_file: Path, name: str, message: str
) -> None:
    directory = tmp_path / "bert"
    bert(directory)
    (directory / name).write_bytes(b"x")
    with pytest.raises(PayloadError, match=message):
        sealtorch.encrypt_model(directory, tmp_path / "x.sealed", model_id="b", key=key_file)


def test_pickle_only_checkpoints_are_refused(tmp_path: Path, key_file: Path) -> None:
    directory = tmp_path / "old"
    directory.mkdir()
    (directory / "config.json").write_text('{"model_type": "bert"}')
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(PayloadError, match="never unpickles"):
        sealtorch.encrypt_model(directory, tmp_path / "x.sealed", model_id="b", key=key_file)


# -- the host attacks the sealed set ----------------------------------------------------------


@pytest.fixture
def sealed_gpt2(tmp_path: Path, key_file: Path) -> list[Path]:
    directory = tmp_path / "gpt2"
    gpt2(directory, max_shard_size="40KB")
    run(
        "encrypt", directory, "-o", tmp_path / "gpt2.sealed", "--model-id", "gpt2",
        "--key-file", key_file,
    )  # fmt: skip
    return [tmp_path / "gpt2.sealed", *sorted(tmp_path.glob("gpt2.sealed.*-of-*"))]


def _refused(first: Path, key: Path, match: str) -> None:
    with pytest.raises((IntegrityError, ConfigError), match=match):
        sealtorch.load_model(first, key=key)


def test_set_attacks_are_refused(sealed_gpt2: list[Path], key_file: Path, tmp_path: Path) -> None:
    first, second, third = sealed_gpt2[0], sealed_gpt2[1], sealed_gpt2[2]
    originals = {path: path.read_bytes() for path in sealed_gpt2}

    def restore() -> None:
        for path, data in originals.items():
            path.write_bytes(data)

    second.write_bytes(originals[third])
    third.write_bytes(originals[second])
    _refused(first, key_file, "swapped or duplicated")
    restore()
    third.unlink()
    _refused(first, key_file, "is missing")
    restore()
    third.write_bytes(originals[second])
    _refused(first, key_file, "swapped or duplicated")
    restore()
    third.write_bytes(originals[third][:-100])
    _refused(first, key_file, "truncated")
    restore()
    flipped = bytearray(originals[third])
    flipped[-40] ^= 0x80
    third.write_bytes(bytes(flipped))
    _refused(first, key_file, "failed authentication")
    restore()
    # Another version of the same model: re-sealed, each file taken from one or the other.
    other = tmp_path / "v2"
    other.mkdir()
    run(
        "encrypt", tmp_path / "gpt2", "-o", other / "gpt2.sealed", "--model-id", "gpt2",
        "--key-file", key_file,
    )  # fmt: skip
    shutil.copyfile(other / second.name, second)
    _refused(first, key_file, "belongs to another sealed set")
    restore()
    assert sealtorch.load_model(first, key=key_file) is not None


# -- memory -------------------------------------------------------------------------------------

_SEAL_RSS = textwrap.dedent(
    """
    import json, resource, sys
    import sealtorch, sealtorch.api, transformers
    from sealtorch.payloads import hf, hf_arch
    from transformers.models.gpt2 import modeling_gpt2
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sealtorch.encrypt_model(sys.argv[1], sys.argv[2], model_id="big", key=bytes(range(32)))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"before_kib": before, "after_kib": after}))
    """
)


def test_sealing_streams_with_bounded_memory(tmp_path: Path) -> None:
    """Sealing a ~100 MB sharded model raises the sealing process's peak RSS by far less than
    the model's size (tensors are read from the input files piece by piece)."""
    directory = tmp_path / "big"
    subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import sys, torch, transformers; torch.manual_seed(0); "
                "transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50000, "
                "n_embd=256, n_layer=4, n_head=4, n_positions=128))"
                ".save_pretrained(sys.argv[1], max_shard_size='30MB')"
            ),
            str(directory),
        ],
        check=True,
        capture_output=True,
    )
    model_size = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
    assert model_size > 60e6
    result = subprocess.run(
        [sys.executable, "-c", _SEAL_RSS, str(directory), str(tmp_path / "big.sealed")],
        check=True,
        capture_output=True,
        text=True,
    )
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    growth = (rss["after_kib"] - rss["before_kib"]) * 1024
    print(f"model {model_size / 1e6:.0f} MB, sealing peak RSS growth {growth / 1e6:.1f} MB")
    assert growth < model_size / 4
    shards = list(directory.glob("model-*.safetensors"))
    assert len(shards) >= 2
    assert len(list(tmp_path.glob("big.sealed*"))) == len(shards)


# -- what a sealed file may name is data: checked again when loading ----------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"auto_map": {"AutoModelForCausalLM": "evil.Model"}}, "trust_remote_code"),
        ({"model_type": "not-a-model"}, "does not know"),
        ({"_attn_implementation": "kernels-community/flash"}, "eager or sdpa"),
    ],
)
def test_loading_refuses_hostile_configs(edit: dict[str, object], message: str) -> None:
    """A key holder could seal anything; the loading side still builds only what it allows."""
    from sealtorch.payloads.hf_arch import load_transformers_model

    config = {"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 16}
    with pytest.raises(PayloadError, match=message):
        load_transformers_model(
            "transformers:GPT2LMHeadModel", json.dumps({**config, **edit}).encode(), {}
        )


def test_loading_refuses_classes_outside_the_auto_tables() -> None:
    from sealtorch.payloads.hf_arch import load_transformers_model

    config = json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8, "n_head": 2}).encode()
    for name in ("Trainer", "pipeline", "GPT2DoubleHeadsModel", "BertModel"):
        with pytest.raises(PayloadError, match="not a class that AutoModel"):
            load_transformers_model(f"transformers:{name}", config, {})


def test_wrong_or_missing_weights_are_refused_when_loading(tmp_path: Path) -> None:
    from sealtorch.payloads.hf_arch import load_transformers_model

    directory = tmp_path / "gpt2"
    model = gpt2(directory)
    config = (directory / "config.json").read_bytes()
    state_dict = {k: v.clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    del state_dict["transformer.h.0.mlp.c_fc.weight"]
    with pytest.raises(PayloadError, match="do not match"):
        load_transformers_model("transformers:GPT2LMHeadModel", config, state_dict)
