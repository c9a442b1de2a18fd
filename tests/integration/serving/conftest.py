"""Sealed test models (once per session) and a live inference server serving them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import serving_factories
import timm
import torch
from serving_helpers import MAX_BODY, SealedSet, running_server

import sealtorch
from sealtorch._demo.pretrained import (
    EFFICIENTNET_ARCH,
    IMAGENET_PREPROCESS,
    efficientnet_lite0_state_dict,
    imagenet_labels,
)
from sealtorch.keys import write_key_file
from sealtorch.serving.server import InferenceServer, SealedModelSource, ServerSettings

MLP_LABELS = ("ant", "bee", "cat", "dog")
#: The test factories the sealed models name; servers allow them, as a deployment would.
ALLOWED_ARCHS = ("serving_factories:tiny_classifier", "serving_factories:sleeper")


@pytest.fixture(scope="session")
def sealed_set(tmp_path_factory: pytest.TempPathFactory) -> SealedSet:
    directory = tmp_path_factory.mktemp("serving")
    key_file = directory / "models.key"
    key = write_key_file(key_file)

    state_dict = efficientnet_lite0_state_dict()
    labels = tuple(imagenet_labels())
    lite0 = directory / "lite0.sealed"
    sealtorch.encrypt_model(
        state_dict,
        lite0,
        model_id="efficientnet-lite0",
        key=key,
        arch=EFFICIENTNET_ARCH,
        labels=labels,
        preprocess=IMAGENET_PREPROCESS,
    )
    reference = timm.create_model("efficientnet_lite0", pretrained=False)
    reference.load_state_dict(state_dict)
    reference.eval()

    types = directory / "types.sealed"
    sealtorch.encrypt_model(
        serving_factories.exported_all_types(), types, model_id="types", key=key
    )

    torch.manual_seed(0)
    mlp_reference = serving_factories.tiny_classifier().eval()
    mlp = directory / "mlp.sealed"
    sealtorch.encrypt_model(
        mlp_reference,
        mlp,
        model_id="tiny-mlp",
        key=key,
        arch="serving_factories:tiny_classifier",
        inputs=[{"name": "features", "datatype": "FP32", "shape": [-1, 6]}],
        outputs=[{"name": "logits", "datatype": "FP32", "shape": [-1, 4]}],
        labels=MLP_LABELS,
        metadata={"version": "3"},
    )

    sleeper = directory / "sleeper.sealed"
    sealtorch.encrypt_model(
        serving_factories.sleeper(),
        sleeper,
        model_id="sleeper",
        key=key,
        arch="serving_factories:sleeper",
        inputs=[{"name": "x", "datatype": "FP32", "shape": [-1, 2]}],
        outputs=[{"name": "y", "datatype": "FP32", "shape": [-1, 2]}],
    )
    return SealedSet(
        directory=directory,
        key_file=key_file,
        lite0=lite0,
        types=types,
        mlp=mlp,
        sleeper=sleeper,
        lite0_reference=reference,
        mlp_reference=mlp_reference,
        labels=labels,
    )


@pytest.fixture(scope="session")
def server(sealed_set: SealedSet) -> Iterator[InferenceServer]:
    """One server for the session: lite0 (image model), types (torch.export), tiny-mlp."""
    sources = [
        SealedModelSource(path, key=sealed_set.key_file, allowed_archs=ALLOWED_ARCHS)
        for path in (sealed_set.lite0, sealed_set.types, sealed_set.mlp)
    ]
    settings = ServerSettings(port=0, workers=2, max_body_bytes=MAX_BODY, max_images=8)
    with running_server(sources, settings) as running:
        yield running


@pytest.fixture(scope="session")
def base_url(server: InferenceServer) -> str:
    assert server.url is not None
    return server.url


@pytest.fixture
def sealed_dir(sealed_set: SealedSet) -> Path:
    return sealed_set.directory
