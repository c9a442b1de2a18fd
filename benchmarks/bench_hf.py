"""Hugging Face models: a sharded ``save_pretrained`` checkpoint sealed into a sealed set vs the
plain directory loaded with ``from_pretrained``.

A GPT-2 built from config (random weights, no Hub): ~200 MB with ``--quick``, ~2 GB otherwise,
saved in shards. Each load runs in a fresh process with a warm page cache (best of several,
interleaved so that drift on a shared machine hits both alike; imports untimed), ending with
every weight page touched, as inference would. Measured:

* load time, sealed (read, authenticate, decrypt on every core, build, tie) / plain
  ``from_pretrained`` - issue #16's target is <= 1.5x - with the split (decrypt, build) and
  the same load decrypting on one thread;
* the fresh-memory floor: a fresh process writing one byte per page of a model-sized anonymous
  buffer (as the decrypted weights need). ``from_pretrained`` maps the page cache and never
  pays it; on a VM whose host reclaims freed guest memory (free page reporting) it costs
  seconds per GB, and bounds the sealed load from below whatever the decryption speed;
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
from typing import cast

import sealtorch
from benchmarks._harness import Context, Result, result
from sealtorch.keys import DataKey
from sealtorch.sealed.parallel import decrypt_threads

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

timings = {}

def sealed():
    loaded = sealtorch.api.load_sealed_model(path, key=bytes.fromhex(key_hex))
    timings.update(loaded.timings)
    return loaded.module

loaders = {
    "sealed": sealed,
    "sealed-1-thread": sealed,  # SEALTORCH_DECRYPT_THREADS=1 set by the parent
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
print(json.dumps({"seconds": elapsed, "growth": growth, "timings": timings,
                  "digest": digest.hexdigest()}))
"""

_FLOOR = r"""
import json, sys, time
from sealtorch.sealed.reader import allocate_plaintext
size = int(sys.argv[1])
start = time.perf_counter()
buffer = allocate_plaintext(size)
view = memoryview(buffer)
for position in range(0, size, 4096):
    view[position] = 1
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _child(method: str, path: Path) -> dict[str, object]:
    env = dict(os.environ)
    env.pop("SEALTORCH_DECRYPT_THREADS", None)
    if method == "sealed-1-thread":
        env["SEALTORCH_DECRYPT_THREADS"] = "1"
    command = (
        [sys.executable, "-c", _FLOOR, str(path)]
        if method == "floor"
        else [sys.executable, "-c", _CHILD, method, str(path), KEY.material.hex()]
    )
    done = subprocess.run(command, capture_output=True, text=True, check=True, cwd=_REPO, env=env)
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
    runs: list[tuple[str, Path]] = [
        ("plain", plain),
        ("sealed", sealed),
        ("sealed-1-thread", sealed),
        ("floor", Path(str(model_size))),
    ]
    samples: dict[str, list[dict[str, object]]] = {method: [] for method, _ in runs}
    for _ in range(repeat):  # interleaved, so drift on a shared machine hits all alike
        for method, path in runs:
            samples[method].append(_child(method, path))
    name = f"hf/gpt2-{model_size / 1e6:.0f}MB-{shards}-shards"
    sealed_s, plain_s, one_thread_s, floor_s = (
        min(float(str(r["seconds"])) for r in samples[m])
        for m in ("sealed", "plain", "sealed-1-thread", "floor")
    )
    best = min(samples["sealed"], key=lambda r: float(str(r["seconds"])))
    split = cast(dict[str, float], best["timings"])
    # Peak RSS: the worst run of each.
    sealed_rss, plain_rss = (
        max(int(str(r["growth"])) for r in samples[m]) for m in ("sealed", "plain")
    )
    digests = {str(r["digest"]) for m in samples if m != "floor" for r in samples[m]}
    return [
        result(
            name,
            "load time, sealed set / plain from_pretrained",
            sealed_s / plain_s,
            "x",
            "<= 1.5",
            sealed_seconds=sealed_s,
            plain_seconds=plain_s,
            decrypt_seconds=split.get("decrypt"),
            build_seconds=split.get("build"),
            decrypt_threads=decrypt_threads(),
            cpu_count=os.cpu_count(),
        ),
        result(
            name,
            "load time, sealed decrypting on 1 thread / on every core",
            one_thread_s / sealed_s,
            "x",
            one_thread_seconds=one_thread_s,
        ),
        result(
            name,
            "fresh-memory floor (fault in model-sized memory) / plain from_pretrained",
            floor_s / plain_s,
            "x",
            floor_seconds=floor_s,
            sealed_minus_floor_seconds=sealed_s - floor_s,
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
