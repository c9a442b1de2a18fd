"""Hugging Face models: a sharded ``save_pretrained`` checkpoint sealed into a sealed set vs the
plain directory loaded with ``from_pretrained``.

A GPT-2 built from config (random weights, no Hub): ~200 MB with ``--quick``, ~2 GB otherwise,
saved in shards. Each load runs in a fresh process with a warm page cache (best of several,
interleaved so that drift on a shared machine hits both alike; imports untimed), ending with
every weight page touched, as inference would. Measured:

* load time, sealed (read, authenticate, decrypt, build, tie) / plain ``from_pretrained`` -
  issue #16's target is <= 1.5x;
* peak RSS growth while loading, sealed / plain, and sealed / model size (target <= 1.1x the
  model size: the decrypted weights are the model's tensors, nothing is copied);
* sealing speed (streamed from the shards) and that the loaded weights are bit-identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import sealtorch
from benchmarks._harness import Context, Result, result
from sealtorch.keys import DataKey

KEY = DataKey(bytes(range(32)))
GB = 1e9
_REPO = Path(__file__).resolve().parents[1]

_BUILD = r"""
import sys, torch, transformers
torch.manual_seed(0)
embd, layers, shard = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
config = transformers.GPT2Config(vocab_size=50257, n_positions=1024, n_embd=embd,
                                 n_layer=layers, n_head=embd // 64)
transformers.GPT2LMHeadModel(config).save_pretrained(sys.argv[1], max_shard_size=shard)
"""

_CHILD = r"""
import hashlib, json, sys, time
import torch, transformers
import sealtorch, sealtorch.api, sealtorch.payloads.hf_arch
from transformers.models.gpt2 import modeling_gpt2
method, path, key_hex = sys.argv[1], sys.argv[2], sys.argv[3]

def status(field):  # kB values from /proc/self/status, in bytes
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)

def touch(model):
    for tensor in model.state_dict().values():
        if tensor.numel():
            tensor.reshape(-1).view(torch.uint8)[::4096].sum()

loaders = {
    "sealed": lambda: sealtorch.load_model(path, key=bytes.fromhex(key_hex)),
    "plain": lambda: transformers.AutoModelForCausalLM.from_pretrained(path),
}
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # reset the peak RSS (VmHWM) to the current RSS
before = status("VmRSS")
start = time.perf_counter()
model = loaders[method]()
touch(model)
elapsed = time.perf_counter() - start
growth = status("VmHWM") - before
digest = hashlib.sha256()
for name, tensor in model.state_dict().items():
    digest.update(name.encode())
    digest.update(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
print(json.dumps({"seconds": elapsed, "growth": growth,
                  "digest": digest.hexdigest()}))
"""


def _child(method: str, path: Path) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, method, str(path), KEY.material.hex()],
        capture_output=True,
        text=True,
        check=True,
        cwd=_REPO,
    )
    data: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return data


def run(ctx: Context) -> list[Result]:
    try:
        from transformers.models.gpt2 import modeling_gpt2  # noqa: F401
    except ImportError:  # pragma: no cover - the hf extra is in dev
        return []
    from sealtorch.payloads.hf_arch import parse_config

    parse_config({"model_type": "gpt2"})  # imports untimed, as in the load children
    embd, layers, shard = (768, 2, "100MB") if ctx.quick else (1536, 16, "500MB")
    plain = ctx.workdir / "gpt2"
    subprocess.run(
        [sys.executable, "-c", _BUILD, str(plain), str(embd), str(layers), shard],
        check=True,
        capture_output=True,
        cwd=_REPO,
    )
    model_size = sum(p.stat().st_size for p in plain.glob("*.safetensors"))
    shards = len(list(plain.glob("model-*.safetensors")))
    sealed = ctx.workdir / "gpt2.sealed"
    start = time.perf_counter()
    info = sealtorch.encrypt_model(plain, sealed, model_id="gpt2", key=KEY)
    seal_seconds = time.perf_counter() - start

    repeat = 3 if ctx.quick else 5
    samples: dict[str, list[dict[str, object]]] = {"plain": [], "sealed": []}
    for _ in range(repeat):  # interleaved, so drift on a shared machine hits both alike
        for method, path in (("plain", plain), ("sealed", sealed)):
            samples[method].append(_child(method, path))
    name = f"hf/gpt2-{model_size / 1e6:.0f}MB-{shards}-shards"
    sealed_s, plain_s = (
        min(float(str(r["seconds"])) for r in samples[m]) for m in ("sealed", "plain")
    )
    # Peak RSS: the worst run of each.
    sealed_rss, plain_rss = (
        max(int(str(r["growth"])) for r in samples[m]) for m in ("sealed", "plain")
    )
    digests = {str(r["digest"]) for m in samples for r in samples[m]}
    return [
        result(
            name,
            "load time, sealed set / plain from_pretrained",
            sealed_s / plain_s,
            "x",
            "<= 1.5",
            sealed_seconds=sealed_s,
            plain_seconds=plain_s,
            cpu_count=os.cpu_count(),
        ),
        result(
            name,
            "peak RSS growth while loading, sealed / plain",
            sealed_rss / max(plain_rss, 1),
            "x",
            sealed_bytes=sealed_rss,
            plain_bytes=plain_rss,
        ),
        result(
            name,
            "peak RSS growth while loading, sealed / model size",
            sealed_rss / model_size,
            "x",
            "<= 1.1",
            model_bytes=model_size,
        ),
        result(
            name,
            "sealing speed (streamed from the shards into a sealed set)",
            info.plaintext_size / seal_seconds / GB,
            "GB/s",
            files=info.file_count,
        ),
        result(
            name,
            "weights bit-identical to from_pretrained (1 = yes)",
            float(len(digests) == 1),
            "",
            ">= 1",
        ),
    ]
