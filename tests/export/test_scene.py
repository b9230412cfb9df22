"""Process only when the scene changed: signatures, the change gate's per-site state, the sequence manifest and
predict_sequence over a stand-in model (no training, no ONNX)."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

import numpy as np
import pytest

from fmtransfer.errors import ConfigError, DataError
from fmtransfer.export.predict import predict_sequence
from fmtransfer.export.scene import (
    ChangeGate,
    SceneSettings,
    agreement,
    distance,
    read_sequence,
    scene_summary,
    scene_warnings,
    signature,
)
from tests.fixtures import save_image


def _scene(seed: int, size: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).random((size, size)).astype(np.float32)


def test_signature_is_standardised_and_blind_to_brightness_and_contrast():
    img = _scene(0)
    sig = signature(img, 8)
    assert sig.shape == (64,) and abs(sig.mean()) < 1e-5 and abs(sig.std() - 1) < 1e-4
    assert distance(sig, signature(img * 0.6 + 0.1, 8)) < 1e-3
    np.testing.assert_allclose(signature((img * 255).round().astype(np.uint8), 8), sig, atol=0.02)  # uint8 input
    rgb = np.repeat(img[:, :, None], 3, axis=2)
    np.testing.assert_allclose(signature(rgb, 8), sig, atol=1e-5)  # colour: the channel mean


def test_signature_is_the_block_mean_where_blocks_divide_and_an_area_average_elsewhere():
    img = _scene(3)  # 32x32: 4x4 blocks
    blocks = img.reshape(8, 4, 8, 4).mean(axis=(1, 3)).ravel()
    expected = (blocks - blocks.mean()) / blocks.std()
    np.testing.assert_allclose(signature(img, 8), expected, atol=1e-4)
    odd = np.random.default_rng(4).random((21, 13)).astype(np.float32)  # 2.625 x 1.625 pixels per cell
    odd_sig = signature(odd, 8)
    # a cell's value is the mean of the area it covers: a constant image gives the same value everywhere, and
    # the whole image's mean is kept by the averaging
    ones = np.ones((21, 13), np.float32)
    assert np.abs(signature(ones, 8)).max() < 1e-4 and odd_sig.shape == (64,)
    tilted = np.tile(np.arange(13, dtype=np.float32), (21, 1))  # a ramp along the width: cells must rise with it
    assert np.all(np.diff(signature(tilted, 8).reshape(8, 8), axis=1) > 0)


def test_signature_of_a_flat_image_is_not_blown_up_from_noise():
    flat = np.full((32, 32), 0.5, np.float32)
    assert not signature(flat).any()
    faint = flat + np.random.default_rng(0).normal(0, 0.001, flat.shape).astype(np.float32)
    assert distance(signature(faint), signature(flat)) < 0.1  # a standardised faint noise would be ~1.4 away


def test_signature_averages_pixel_noise_but_sees_a_real_change():
    img = _scene(0)
    noisy = np.clip(img + np.random.default_rng(1).normal(0, 0.03, img.shape), 0, 1)
    assert distance(signature(img), signature(noisy)) < 0.2 < distance(signature(img), signature(_scene(2)))


def test_distance_bounds_and_shapes():
    sig = signature(_scene(0))
    assert distance(sig, sig) == 0
    assert distance(sig, -sig) == pytest.approx(2.0, abs=1e-4)  # anti-correlated: the largest distance
    with pytest.raises(DataError, match="different sizes"):
        distance(sig, signature(_scene(0), 4))
    with pytest.raises(DataError, match="image"):
        signature(np.zeros((2, 2, 2, 2)))


def _vec(value: float) -> np.ndarray:
    return np.array([value, 0.0], dtype=np.float32)  # distance of two _vec: |a - b| / sqrt(2)


def test_gate_reuses_the_last_processed_frame_of_the_same_site_only():
    gate = ChangeGate(threshold=0.25, max_skips=10)
    assert gate.decide("a", _vec(0)) is None  # first of a
    assert gate.decide("b", _vec(0)) is None  # first of b: another site's state is not used
    assert gate.decide("a", _vec(0.1)) == 0
    assert gate.decide("b", _vec(5)) is None  # b changed
    assert gate.decide("b", _vec(5.1)) == 3  # b's last processed is now frame 3
    assert gate.decide("a", _vec(0)) == 0
    assert gate.changes[0] is None and gate.changes[2] == pytest.approx(0.1 / np.sqrt(2))


def test_gate_compares_with_the_last_processed_frame_not_the_previous_one():
    gate = ChangeGate(threshold=0.25, max_skips=100)
    step = 0.3  # each step 0.21 from the previous frame, under the threshold
    decisions = [gate.decide("a", _vec(i * step)) for i in range(6)]
    # frame 2 is 0.42 from frame 0 (the last processed): processed, although only 0.21 from frame 1
    assert decisions == [None, 0, None, 2, None, 4]


def test_gate_processes_after_max_skips_in_a_row():
    gate = ChangeGate(threshold=0.25, max_skips=2)
    assert [gate.decide("a", _vec(0)) for _ in range(7)] == [None, 0, 0, None, 3, 3, None]
    never = ChangeGate(threshold=0.25, max_skips=0)
    assert [never.decide("a", _vec(0)) for _ in range(3)] == [None, None, None]
    strict = ChangeGate(threshold=0.0, max_skips=5)  # threshold 0: even identical frames are processed
    assert [strict.decide("a", _vec(0)) for _ in range(2)] == [None, None]


def _manifest(path, rows, columns=("path", "site", "order")):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        w.writerows(rows)
    return path


def test_read_sequence_groups_sites_and_sorts_numbers_as_numbers(tmp_path):
    src = _manifest(tmp_path / "m.csv", [("x10.png", "s1", "10"), ("y.png", "s2", "1"), ("x2.png", "s1", "2"),
                                         ("x2b.png", "s1", "2"), ("/abs/x1.png", "s1", "1")])
    frames = read_sequence(src, SceneSettings())
    assert [(f.site, f.order) for f in frames] == [("s1", "1"), ("s1", "2"), ("s1", "2"), ("s1", "10"), ("s2", "1")]
    assert frames[1].path == tmp_path / "x2.png" and frames[2].path == tmp_path / "x2b.png"  # ties: file order
    assert str(frames[0].path) == "/abs/x1.png"


def test_read_sequence_sorts_timestamps_as_text_and_takes_configured_columns(tmp_path):
    src = _manifest(tmp_path / "m.csv", [("b.png", "cam", "2026-01-02T00:00"), ("a.png", "cam", "2026-01-01T23:00")],
                    columns=("file", "camera", "time"))
    frames = read_sequence(src, SceneSettings(path_column="file", site_column="camera", order_column="time"))
    assert [f.path.name for f in frames] == ["a.png", "b.png"]


def test_read_sequence_bad_input(tmp_path):
    with pytest.raises(DataError, match="lacks the column"):
        read_sequence(_manifest(tmp_path / "a.csv", [("x.png", "1")], columns=("path", "order")), SceneSettings())
    with pytest.raises(DataError, match="line 3: empty"):
        read_sequence(_manifest(tmp_path / "b.csv", [("x.png", "s", "1"), ("y.png", "", "2")]), SceneSettings())
    with pytest.raises(DataError, match="lists no images"):
        read_sequence(_manifest(tmp_path / "c.csv", []), SceneSettings())
    with pytest.raises(DataError, match="NaN"):
        read_sequence(_manifest(tmp_path / "d.csv", [("x.png", "s", "nan")]), SceneSettings())
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="needs a CSV manifest"):
        read_sequence(tmp_path / "folder", SceneSettings())


@pytest.mark.parametrize("node, match", [({"threshold": -1}, "threshold"), ({"threshold": float("nan")}, "threshold"),
                                         ({"max_skips": True}, "max_skips"), ({"max_skips": -1}, "max_skips"),
                                         ({"size": 1}, "size"), ({"verify": "yes"}, "verify"),
                                         ({"site_column": ""}, "site_column"), ({"treshold": 0.2}, "unknown key")])
def test_settings_refuse_bad_values(node, match):
    with pytest.raises(ConfigError, match=match):
        SceneSettings.from_dict(node)


def test_summary_and_agreement_arithmetic():
    s = scene_summary([None, 0, 0, None], gate_seconds=0.01, model_seconds=2.0, n_model=2)
    assert s["skipped"] == 2 and s["skipped_fraction"] == 0.5 and s["model_seconds_avoided"] == pytest.approx(2.0)
    assert s["seconds_saved"] == pytest.approx(1.99)
    a = agreement([None, 0, 0, None], np.array([1, 1, 1, 2]), np.array([1, 1, 0, 2]), classification=True)
    assert a == {"verified": 2, "agreement": 0.5, "disagreements": 1}
    r = agreement([None, 0], np.array([1.0, 1.0]), np.array([1.0, 1.5]), classification=False)
    assert r["max_abs_diff"] == pytest.approx(0.5)


def test_scene_warnings_say_when_the_gate_does_not_pay_or_changes_answers():
    paying = scene_summary([None, 0, 0, None], gate_seconds=0.01, model_seconds=2.0, n_model=2)
    assert scene_warnings(paying) == []
    losing = scene_summary([None, None, 0, None], gate_seconds=0.5, model_seconds=0.3, n_model=3)
    assert len(scene_warnings(losing)) == 1 and "scene.enabled=false" in scene_warnings(losing)[0]
    checked = {**paying, "verify": {"verified": 2, "agreement": 0.98, "disagreements": 1}}
    assert len(scene_warnings(checked)) == 1 and "0.980" in scene_warnings(checked)[0]
    assert scene_warnings(checked, min_agreement=0.97) == []
    with pytest.raises(ConfigError, match=r"scene.min_agreement=1.5: expected a share in \[0, 1\]"):
        SceneSettings(min_agreement=1.5)


@dataclass
class _BrightnessModel:
    """A stand-in for OnnxModel: class 'bright' when the mean input is above 0.5; counts the frames it runs."""

    meta: dict = field(default_factory=lambda: {
        "task": "classification", "preprocess": {"channels": 1, "image_size": [8, 8], "mean": [0.0], "std": [1.0]}})
    classes: list = field(default_factory=lambda: ["dark", "bright"])
    seen: int = 0
    calls: int = 0

    def run(self, x, batch_size=256):
        self.seen += len(x)
        self.calls += 1
        m = x.reshape(len(x), -1).mean(1)
        return np.stack([0.5 - m, m - 0.5], axis=1).astype(np.float32) * 10


def _frames(tmp_path):
    """Site a: a scene, a noisy repeat, a brighter repeat (the model's answer flips), another scene; site b: one
    scene twice."""
    rng = np.random.default_rng(0)
    base = (rng.random((16, 16)) * 0.5 * 255).astype(np.uint8)  # mean ~0.25: dark
    brighter = np.clip(base.astype(np.float32) * 2.6, 0, 255).astype(np.uint8)  # same scene, mean ~0.65: bright
    noisy = np.clip(base + rng.integers(0, 4, base.shape), 0, 255).astype(np.uint8)
    other = (rng.random((16, 16)) * 255).astype(np.uint8)
    images = {"a0": base, "a1": noisy, "a2": brighter, "a3": other, "b0": base, "b1": base}
    for name, arr in images.items():
        save_image(arr[:, :, None], tmp_path / f"{name}.png")
    rows = [(f"{n}.png", n[0], n[1]) for n in images]
    return _manifest(tmp_path / "seq.csv", rows[::-1])  # reversed: the order column puts them back


def test_predict_sequence_reuses_predictions_and_verifies_them(tmp_path):
    frames = read_sequence(_frames(tmp_path), SceneSettings())
    model = _BrightnessModel()
    skipped = []
    with pytest.warns(UserWarning, match=r"agree with the model's own on 0.667 .* under scene.min_agreement=0.99"):
        header, rows, summary = predict_sequence(model, frames, SceneSettings(verify=True), 4, skipped)
    assert any("min_agreement" in w for w in summary["warnings"])
    by_name = {r[0].rsplit("/", 1)[-1]: dict(zip(header, r, strict=True)) for r in rows}
    # sites in the order they first appear (b: the file is reversed), frames by the order column
    assert [n for n in by_name] == ["b0.png", "b1.png", "a0.png", "a1.png", "a2.png", "a3.png"]
    assert by_name["a1.png"]["reused_from"].endswith("a0.png") and by_name["a2.png"]["reused_from"].endswith("a0.png")
    assert by_name["a3.png"]["reused_from"] == "" and by_name["b1.png"]["reused_from"].endswith("b0.png")
    assert by_name["a2.png"]["prediction"] == "dark" and by_name["a2.png"]["full_prediction"] == "bright"
    assert summary["skipped"] == 3 and summary["processed"] == 3 and summary["sites"] == 2
    assert summary["verify"] == {"verified": 3, "agreement": pytest.approx(2 / 3), "disagreements": 1}
    assert model.seen == 6  # 3 processed + 3 verified


def test_predict_sequence_runs_the_model_only_on_changed_frames(tmp_path):
    frames = read_sequence(_frames(tmp_path), SceneSettings())
    model = _BrightnessModel()
    header, rows, summary = predict_sequence(model, frames, SceneSettings(), 64, [])
    assert model.seen == 3 and "full_prediction" not in header and "verify" not in summary
    assert summary["model_ms_per_frame"] is not None and summary["change_test_seconds"] > 0
    everything = _BrightnessModel()
    _, rows_all, summary_all = predict_sequence(everything, frames, SceneSettings(max_skips=0), 64, [])
    assert everything.seen == 6 and summary_all["skipped"] == 0
    assert all(r[header.index("reused_from")] == "" for r in rows_all)


def test_predict_sequence_lists_unreadable_frames(tmp_path):
    src = _frames(tmp_path)
    (tmp_path / "a1.png").write_bytes(b"not a png")
    skipped = []
    _, rows, summary = predict_sequence(_BrightnessModel(), read_sequence(src, SceneSettings()), SceneSettings(), 8,
                                        skipped)
    assert [p.rsplit("/", 1)[-1] for p, _ in skipped] == ["a1.png"] and len(rows) == 5 and summary["frames"] == 5


def test_gate_asks_trust_only_when_it_would_reuse():
    asked = []

    def trusted(index):
        asked.append(index)
        return index != 2

    gate = ChangeGate(threshold=0.25, max_skips=10)
    decisions = [gate.decide("a", _vec(v), trusted) for v in (0, 0, 9, 9, 9)]
    # frame 2 is a change (not asked); frame 3 would reuse it but it is not trusted: processed; frame 4 reuses 3
    assert decisions == [None, 0, None, None, 3] and asked == [0, 2, 3]


def test_predict_sequence_does_not_reuse_an_unconfident_prediction(tmp_path):
    rng = np.random.default_rng(0)
    grey = (rng.random((16, 16)) * 20 + 118).astype(np.uint8)  # mean ~0.5: the stand-in model is ~50/50
    for t in range(3):
        save_image(grey[:, :, None], tmp_path / f"g{t}.png")
    src = _manifest(tmp_path / "g.csv", [(f"g{t}.png", "s", str(t)) for t in range(3)])
    frames = read_sequence(src, SceneSettings())
    model = _BrightnessModel()
    with pytest.warns(UserWarning, match=r"saved 0.000 s of model time: 0 of 3 frames reused; 2 reuse\(s\) were "
                                         r"refused because the model was unsure .* does not pay"):
        _, rows, summary = predict_sequence(model, frames, SceneSettings(), 64, [])
    assert model.seen == 3 and summary["processed_for_low_confidence"] == 2 and summary["skipped"] == 0
    assert model.calls == 2  # the unsure frames ran together, not one flush per frame (it was 3 runs of 1 frame)
    anyway = _BrightnessModel()
    _, _, summary0 = predict_sequence(anyway, frames, SceneSettings(min_confidence=0.0), 64, [])
    assert anyway.seen == 1 and summary0["skipped"] == 2


def test_predict_sequence_batches_across_sites(tmp_path):
    """One frame per site in turn: with 3 sites of 2 changed frames each, two batches of 3, not six of 1."""
    rng = np.random.default_rng(0)
    rows = []
    for s in range(3):
        for t in range(2):
            save_image((rng.random((16, 16, 1)) * 255).astype(np.uint8), tmp_path / f"{s}_{t}.png")
            rows.append((f"{s}_{t}.png", f"site{s}", str(t)))
    frames = read_sequence(_manifest(tmp_path / "m.csv", rows), SceneSettings())
    batches = []
    model = _BrightnessModel()
    run = model.run
    model.run = lambda x, batch_size=256: batches.append(len(x)) or run(x, batch_size)
    _, out, _ = predict_sequence(model, frames, SceneSettings(min_confidence=0.0), 3, [])
    assert batches == [3, 3]
    assert [r[0].rsplit("/", 1)[-1] for r in out] == ["0_0.png", "0_1.png", "1_0.png", "1_1.png", "2_0.png", "2_1.png"]


def test_the_predict_config_holds_the_code_defaults():
    from omegaconf import OmegaConf

    from fmtransfer.config import config_dir

    node = OmegaConf.to_container(OmegaConf.load(f"{config_dir()}/predict.yaml").scene)
    assert node.pop("enabled") is False
    assert SceneSettings.from_dict(node) == SceneSettings()
