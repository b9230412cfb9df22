"""Tiny untrained classifiers to adapt: structure and bookkeeping, not accuracy."""

from __future__ import annotations

import pytest

from fmtransfer.data import Preprocess
from fmtransfer.models import Classifier, create_backbone
from fmtransfer.models.backbone import BackboneSpec
from fmtransfer.models.classifier import model_meta


def tiny(name: str = "test_resnet", classes=("0", "1", "2")) -> tuple[Classifier, dict]:
    spec = BackboneSpec(name=name, in_chans=1, img_size=[16, 16])
    model = Classifier(create_backbone(spec), len(classes))
    meta = model_meta(model, spec, task="classification", classes=list(classes),
                      preprocess=Preprocess((16, 16), 1, (0.5,), (0.5,)))
    meta["weights_sha256"] = "ab" * 32
    return model.eval(), meta


@pytest.fixture
def cnn():
    return tiny("test_resnet")


@pytest.fixture
def vit():
    return tiny("test_vit")
