"""GPTQ rounding and the calibration run's pure parts (numpy only)."""

import numpy as np
import pytest

from zimage_export.calibration import CALIBRATION_PROMPTS, CalibrationOptions, _passes, guidance, sigmas
from zimage_export.gptq import gptq_per_channel, weighted_error
from zimage_export.quantize import QuantizeOptions
from zimage_export.quantize_w8a8 import quantize_weight_per_channel


def low_rank_activations(rng, rows, basis):
    """Activations in the subspace spanned by `basis` (`[rank, K]`), like the noise refiner's
    first layer (the patch embedding of 64 latent values), plus a little full-rank noise."""
    rank, k = basis.shape
    return rng.standard_normal((rows, rank)) @ basis + 0.01 * rng.standard_normal((rows, k))


def rel_product_error(x, w, q, scale):
    y = x @ w
    return np.linalg.norm(x @ (q * scale.astype(np.float64)) - y) / np.linalg.norm(y)


def test_gptq_cuts_the_error_where_activations_are_correlated():
    rng = np.random.default_rng(0)
    k, n = 256, 96
    w = rng.standard_normal((k, n)) * 0.05
    basis = rng.standard_normal((24, k))  # the model's structure, shared by calibration and use
    calibration = low_rank_activations(rng, 2048, basis)
    held_out = low_rank_activations(np.random.default_rng(1), 512, basis)
    h = calibration.T @ calibration
    q, scale, err, rtn_err = gptq_per_channel(w, h)
    rtn, rtn_scale = quantize_weight_per_channel(w)
    assert q.dtype == np.int8 and q.shape == (k, n) and np.abs(q.astype(int)).max() <= 127
    np.testing.assert_array_equal(scale, rtn_scale)  # the same format: only the codes differ
    assert not np.array_equal(q, rtn)
    assert np.isclose(err, weighted_error(w, q * scale.astype(np.float64), h))
    assert np.isclose(rtn_err, weighted_error(w, rtn * scale.astype(np.float64), h))
    assert err < 0.2 * rtn_err
    gptq_held_out = rel_product_error(held_out, w, q, scale)
    rtn_held_out = rel_product_error(held_out, w, rtn, scale)
    assert gptq_held_out < 0.5 * rtn_held_out, (gptq_held_out, rtn_held_out)


def test_uncorrelated_inputs_leave_round_to_nearest():
    # A diagonal H couples no rows: GPTQ carries nothing and is RTN exactly.
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 16)).astype(np.float32)
    h = np.diag(rng.uniform(0.5, 2.0, 64))
    q, scale, err, rtn_err = gptq_per_channel(w, h)
    rtn, rtn_scale = quantize_weight_per_channel(w)
    np.testing.assert_array_equal(q, rtn)
    np.testing.assert_array_equal(scale, rtn_scale)
    assert err == rtn_err


def test_inputs_the_calibration_never_saw_are_rounded_to_nearest():
    rng = np.random.default_rng(3)
    k, n = 96, 24
    w = rng.standard_normal((k, n)) * 0.1
    x = low_rank_activations(rng, 1024, rng.standard_normal((8, k)))
    x[:, [5, 40]] = 0.0  # always zero in calibration: no evidence about those rows
    q, scale, err, rtn_err = gptq_per_channel(w, x.T @ x)
    rtn, _ = quantize_weight_per_channel(w)
    assert err < rtn_err
    np.testing.assert_array_equal(q[[5, 40]], rtn[[5, 40]])


def test_gptq_refuses_what_it_cannot_use():
    w = np.ones((8, 4))
    with pytest.raises(ValueError, match="want \\[8, 8\\]"):
        gptq_per_channel(w, np.eye(4))
    with pytest.raises(ValueError, match="finite"):
        gptq_per_channel(w, np.full((8, 8), np.nan))
    bad = w.copy()
    bad[2, 1] = np.inf
    with pytest.raises(ValueError, match="finite"):
        gptq_per_channel(bad, np.eye(8))
    with pytest.raises(ValueError, match="damping"):
        gptq_per_channel(w, np.eye(8), damping=0.0)


def test_calibration_follows_the_sdk_schedule():
    # sdk/src/pipeline/scheduler.rs, turbo_eight_steps_match_the_published_table
    turbo = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": False}
    want = [1.0, 0.9545454, 0.9, 0.8333333, 0.75, 0.6428571, 0.5, 0.3, 0.0]
    np.testing.assert_allclose(sigmas(turbo, 8, 4096), want, atol=1e-6)


def test_calibration_statistics_are_split_into_passes_by_memory():
    sizes = {"a": 1024, "b": 1024, "c": 2048, "d": 512}  # 8, 8, 32, 2 MiB of float64
    assert _passes(sizes, 16 / 1024) == [["a", "b"], ["c"], ["d"]]
    assert _passes(sizes, 1.0) == [["a", "b", "c", "d"]]
    assert _passes(sizes, 1 / 1024) == [["a"], ["b"], ["c"], ["d"]]  # one too large still gets a pass


def test_gptq_options_are_checked():
    for options in (QuantizeOptions("int8", method="gptq", activations="int8x2"),
                    QuantizeOptions("int4", method="gptq"), QuantizeOptions("int8", method="gptq")):
        assert options.calibration == CalibrationOptions() and options.gptq_damping == 0.1
        assert options.weight_only_method == "rtn"  # the text encoder is rounded to nearest
    assert CalibrationOptions().prompts == CALIBRATION_PROMPTS[:8]
    for bad in (dict(weights="int4", method="gptq", activations="int8"),
                dict(weights="int4", method="gptq", gptq_damping=float("nan")),
                dict(weights="int8", method="gptq", activations="int8", gptq_damping=0.0)):
        with pytest.raises(ValueError):
            QuantizeOptions(**bad)
    for bad in (dict(prompts=()), dict(prompts=("a cat", " ")), dict(steps=0), dict(size=0), dict(memory_gib=0),
                dict(guidance=-1.0), dict(guidance=float("nan")), dict(guidance=float("inf"))):
        with pytest.raises(ValueError):
            CalibrationOptions(**bad)


def test_calibration_prompts_are_not_the_quality_measurements():
    # A quantization calibrated on its test prompts would measure better than it is.
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    tested = (root / "sdk/examples/quant_quality.rs").read_text(encoding="utf-8")
    tested += (root / "export-scripts/quant_sensitivity.py").read_text(encoding="utf-8")
    for prompt in CALIBRATION_PROMPTS:
        assert prompt not in tested


def test_calibration_guides_as_the_package_generates():
    # Z-Image-Turbo packages have no generation_defaults: unguided, as they generate.
    assert guidance(CalibrationOptions(), {}) == (0.0, 1.0)
    base = {"generation_defaults": {"variant": "base", "steps": 50, "guidance_scale": 4.0, "cfg_truncation": 0.9}}
    assert guidance(CalibrationOptions(), base) == (4.0, 0.9)
    assert guidance(CalibrationOptions(guidance=0.0), base) == (0.0, 0.9)  # --calibration-guidance 0
    assert guidance(CalibrationOptions(guidance=2.5), {}) == (2.5, 1.0)
    assert "guidance" not in CalibrationOptions(guidance=2.5).section()  # (the summary adds the resolved one)
