"""benchmarks/scheme_speed.py's target check on made-up rows: each target reports met, or names the rows missing it."""

from benchmarks.scheme_speed import SCHEMES, Targets, target_report

BITS = {label: bits for label, _, _, bits in SCHEMES}


def row(prefill: float, decode: float, folder_mb: float, rss_mb: float) -> dict:
    return {"prefill": prefill, "decode": decode, "model_bytes": folder_mb * 1e6, "rss_mb": rss_mb}


def rows(**overrides) -> dict:
    """q0f32 ORT at 100 / 10 tok/s and every row of `BITS` meeting its targets, except `overrides`."""
    results = {"q0f32 ORT": row(100, 10, 540, 700), "q0f32": row(101, 20, 540, 400)}
    for label, bits in BITS.items():
        results.setdefault(label, row(95, 10 * {None: 1.0, 8: 2.1, 4: 2.9, 3: 2.6, 2: 3.1}[bits], 100, 350))
    results["q4f16_1"], results["q3f16_1"] = row(120, 40, 80, 200), row(100, 38, 64, 190)
    results.update(overrides)
    return results


def test_all_met():
    lines = target_report(rows(), BITS)
    assert [line.split(":")[0] for line in lines[:3]] == [
        "decode at least 2.0 (8-bit), 2.8 (4-bit), 2.5 (3-bit), 3.0 (2-bit)", "prefill at least 0.9 for every row",
        "peak RSS at most the folder plus 300 MB"]
    assert all(line.endswith(": met") for line in lines[:3])
    assert "MISSED" not in lines[3] and lines[3].startswith("q3f16_1 against q4f16_1: prefill 0.83 (>= 0.8)")


def test_misses_are_named():
    lines = target_report(rows(**{"a16w4": row(95, 27.0, 177, 340), "w8a8": row(85, 25, 222, 340),
                                  "q0f16": row(95, 20, 270, 580), "q3f16_1": row(70, 38, 70, 190)}), BITS)
    assert lines[0].endswith(": a16w4 2.70 < 2.8")
    assert lines[1].endswith(": q3f16_1 0.70; w8a8 0.85")  # in SCHEMES order
    assert lines[2].endswith(": q0f16 310 MB")
    assert "prefill 0.58 (MISSED: < 0.8)" in lines[3] and "folder 0.88 (MISSED: > 0.85)" in lines[3]


def test_opt_in_and_float_rows_have_no_decode_target():
    slow = row(95, 10.5, 175, 390)  # 1.05x decode: below every weight-bits target
    lines = target_report(rows(**{"nvfp4a16-float-recipe": slow, "q0f16": slow}), BITS)
    assert lines[0].endswith(": met")


def test_custom_targets():
    lines = target_report(rows(), BITS, Targets(prefill=0.96))
    assert lines[1].startswith("prefill at least 0.96 for every row: ") and "a16w8 0.95" in lines[1]
