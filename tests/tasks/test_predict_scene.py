"""``predict scene.enabled=true`` end to end on a tiny exported model: sequences per site, reused predictions,
metrics.json with the fraction skipped, the time saved and the verified agreement."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from fmtransfer.errors import DataError
from fmtransfer.tasks.predict import predict
from tests.conftest import make_cfg
from tests.fixtures import pattern, save_image

pytestmark = pytest.mark.slow

DATA = ["data=mnist_global", "data.limit=300"]


@pytest.fixture
def sequence(tmp_path):
    """Two cameras: each shows one pattern three times (the last two with faint noise), then another pattern."""
    rng = np.random.default_rng(0)
    rows = []
    for site, (first, second) in {"cam1": (0, 1), "cam2": (2, 3)}.items():
        scene = pattern(first, 28, rng)
        frames = [scene] + [np.clip(scene + rng.integers(0, 3, scene.shape), 0, 255).astype(np.uint8)
                            for _ in range(2)] + [pattern(second, 28, rng)]
        for t, img in enumerate(frames):
            save_image(img, tmp_path / "seq" / f"{site}_{t}.png")
            rows.append((f"{site}_{t}.png", site, str(t)))
    with open(tmp_path / "seq" / "frames.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "camera", "t"])
        w.writerows(rows[::-1])
    return tmp_path / "seq" / "frames.csv"


SCENE = ["scene.enabled=true", "scene.path_column=file", "scene.site_column=camera", "scene.order_column=t"]


def test_scene_skips_repeats_and_reports_agreement(onnx_model, sequence, tmp_path):
    run = tmp_path / "run"
    # min_confidence 0: the tiny smoke model is unsure of everything, and unsure predictions are never reused
    result = predict(make_cfg("predict", [f"model={onnx_model}", f"input={sequence}", *SCENE, "scene.verify=true",
                                          "scene.min_confidence=0"], run))
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["path"].rsplit("/", 1)[-1] for r in rows] == [f"cam{s}_{t}.png" for s in (2, 1) for t in range(4)]
    reused = {r["path"].rsplit("/", 1)[-1]: r["reused_from"].rsplit("/", 1)[-1] for r in rows}
    assert reused == {"cam1_0.png": "", "cam1_1.png": "cam1_0.png", "cam1_2.png": "cam1_0.png", "cam1_3.png": "",
                      "cam2_0.png": "", "cam2_1.png": "cam2_0.png", "cam2_2.png": "cam2_0.png", "cam2_3.png": ""}
    by_path = {r["path"]: r for r in rows}
    for r in rows:
        if r["reused_from"]:
            source = by_path[r["reused_from"]]
            assert [r["prediction"], r["confidence"]] == [source["prediction"], source["confidence"]]
            assert r["full_prediction"] == r["prediction"]  # faint noise: the model agrees
    metrics = json.loads((run / "metrics.json").read_text())
    scene = metrics["scene"]
    assert scene["skipped"] == 4 and scene["processed"] == 4 and scene["skipped_fraction"] == 0.5
    assert scene["verify"] == {"verified": 4, "agreement": 1.0, "disagreements": 0}
    assert scene["model_ms_per_frame"] > 0 and scene["change_test_seconds"] > 0
    assert result.metrics["scene"] == scene and result.outputs["metrics"] == run / "metrics.json"


def test_scene_needs_a_sequence_manifest(onnx_model, sequence, tmp_path):
    with pytest.raises(DataError, match="needs a CSV manifest"):
        predict(make_cfg("predict", [f"model={onnx_model}", f"input={sequence.parent}", *SCENE], tmp_path / "r1"))
    with pytest.raises(DataError, match=r"lacks the column\(s\) \['site'\]"):
        predict(make_cfg("predict", [f"model={onnx_model}", f"input={sequence}", "scene.enabled=true",
                                     "scene.path_column=file", "scene.order_column=t"], tmp_path / "r2"))
