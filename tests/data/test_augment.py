"""Batch augmentation: identity when neutral, real changes otherwise, reproducible from the seed."""

from __future__ import annotations

import pytest
import torch

from fmtransfer.data.augment import RandomAffine
from fmtransfer.errors import ConfigError


def test_neutral_settings_are_identity():
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(RandomAffine()(x), x, atol=1e-5)


def test_changes_images_reproducibly():
    x = torch.zeros(8, 1, 16, 16)
    x[:, :, 6:10, 6:10] = 1.0
    aug = RandomAffine(degrees=20, translate=0.2, scale=(0.7, 1.2))
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    b = aug(x)
    assert torch.equal(a, b) and a.shape == x.shape
    assert not torch.allclose(a, x)
    assert (a[0] != a[1]).any()  # each image draws its own transform


def test_hflip():
    x = torch.arange(16.0).view(1, 1, 1, 16).expand(2, 1, 4, 16).contiguous()
    assert torch.allclose(RandomAffine(hflip=1.0)(x), x.flip(-1), atol=1e-4)


@pytest.mark.parametrize("kw", [{"scale": (1.2, 0.8)}, {"translate": 1.5}, {"padding": "wrap"}])
def test_bad_settings(kw):
    with pytest.raises(ConfigError, match="augment"):
        RandomAffine(**kw)
