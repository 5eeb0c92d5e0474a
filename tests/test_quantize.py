"""mineralnet.quantize: the int8 gate's statistics against independent computations, the recipe helpers,
the quantization report and the float-fallback loop on a tiny conv net with one known sensitive node."""
from __future__ import annotations

import math

import numpy as np
import pytest

from mineralnet.errors import MineralNetError
from mineralnet.quantize import stats


# ----------------------------------------------------------------------------- statistics
def _wilson_by_bisection(k: int, n: int, z: float) -> tuple[float, float]:
    """The Wilson limits as the two roots of the score test |p_hat - p| = z sqrt(p (1 - p) / n), found by
    bisection (no closed form)."""
    p_hat = k / n

    def excess(p):  # > 0 where p lies outside the interval
        return (p_hat - p) ** 2 - z * z * p * (1 - p) / n

    def root(lo, hi):  # excess changes sign between lo and hi
        for _ in range(200):
            mid = (lo + hi) / 2
            if (excess(lo) > 0) == (excess(mid) > 0):
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if k == 0 else root(0.0, p_hat)
    high = 1.0 if k == n else root(p_hat, 1.0)
    return low, high


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (313, 332), (332, 332), (40, 1000)])
def test_wilson_matches_the_score_test_roots(k, n):
    z = 1.959963984540054
    assert stats.wilson_interval(k, n) == pytest.approx(_wilson_by_bisection(k, n, z), abs=1e-9)


def test_z_value_is_the_normal_quantile():
    assert stats.z_value(0.95) == pytest.approx(1.959963984540054, abs=1e-12)
    assert stats.z_value(0.90) == pytest.approx(1.6448536269514722, abs=1e-12)
    with pytest.raises(MineralNetError):
        stats.z_value(1.5)


def _table(y, r, q):
    return stats.PairedCounts.from_predictions(y, r, q)


def test_paired_counts_and_phi_match_numpy():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 400)
    r = np.where(rng.random(400) < 0.7, y, rng.integers(0, 5, 400))
    q = np.where(rng.random(400) < 0.9, r, rng.integers(0, 5, 400))
    t = _table(y, r, q)
    assert t.n == 400
    assert (t.a + t.b) == int((r == y).sum()) and (t.a + t.c) == int((q == y).sum())
    expected_phi = np.corrcoef((r == y).astype(float), (q == y).astype(float))[0, 1]
    assert stats.phi_coefficient(t) == pytest.approx(expected_phi, abs=1e-12)


def test_newcombe_interval_recomputed_from_independent_parts():
    """Method 10 of Newcombe (1998) rebuilt from bisection-found Wilson limits and numpy's correlation."""
    rng = np.random.default_rng(1)
    z = 1.959963984540054
    for _ in range(20):
        n = int(rng.integers(30, 500))
        y = np.zeros(n, int)
        r = np.where(rng.random(n) < rng.uniform(0.5, 0.95), 0, 1)
        q = np.where(rng.random(n) < rng.uniform(0.85, 1.0), r, 1 - r)
        t = _table(y, r, q)
        ok_r, ok_q = (r == 0).astype(float), (q == 0).astype(float)
        p1, p2 = ok_r.mean(), ok_q.mean()
        l1, u1 = _wilson_by_bisection(int(ok_r.sum()), n, z)
        l2, u2 = _wilson_by_bisection(int(ok_q.sum()), n, z)
        phi = 0.0 if ok_r.std() == 0 or ok_q.std() == 0 else np.corrcoef(ok_r, ok_q)[0, 1]
        lower = (p1 - p2) - math.sqrt(max(0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
        upper = (p1 - p2) + math.sqrt(max(0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
        drop, lo, hi = stats.paired_drop_interval(t)
        assert drop == pytest.approx(p1 - p2, abs=1e-12)
        assert (lo, hi) == pytest.approx((lower, upper), abs=1e-6)


@pytest.mark.parametrize("n,p_b,p_c", [(332, 0.03, 0.01), (200, 0.01, 0.01), (500, 0.05, 0.02)])
def test_newcombe_interval_covers_the_true_drop_about_95_percent(n, p_b, p_c):
    """Simulation: paired tables drawn from a known multinomial; the interval holds the true drop p_b - p_c in
    at least ~95% of draws. Method 10 is conservative when flips are rare (measured 98.5% at 1% + 1% flips, in line
    with Newcombe's own tables), which errs on the safe side for a gate; undercoverage would fail here."""
    rng = np.random.default_rng(2)
    p_d = 0.2
    draws = rng.multinomial(n, [1 - p_b - p_c - p_d, p_b, p_c, p_d], size=3000)
    truth = p_b - p_c
    hits = 0
    for a, b, c, d in draws:
        _, lo, hi = stats.paired_drop_interval(stats.PairedCounts(int(a), int(b), int(c), int(d)))
        hits += lo <= truth <= hi
    assert 0.935 <= hits / len(draws) <= 0.995


def test_identical_models_have_zero_drop_and_the_wilson_asymmetry_as_bound():
    """With no discordant photos phi = 1 and method 10 reduces to the asymmetry of the accuracy's Wilson
    interval: |(u - p) - (p - l)| (a known property of the method, conservative)."""
    y = np.array([0] * 300 + [1] * 32)
    r = np.array([0] * 280 + [1] * 52)
    drop, lo, hi = stats.paired_drop_interval(_table(y, r, r))
    k = int((r == y).sum())
    low, high = _wilson_by_bisection(k, len(y), 1.959963984540054)
    p = k / len(y)
    assert drop == 0.0 and hi == pytest.approx(abs((high - p) - (p - low)), abs=1e-6) and lo == pytest.approx(-hi)
    assert hi < 0.011  # about one point at 94% accuracy on 332 photos


def test_top2_margin_matches_a_loop():
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (50, 6))
    want = []
    for row in logits:
        p = [math.exp(v) for v in row]
        s = sum(p)
        p = sorted((v / s for v in p), reverse=True)
        want.append(p[0] - p[1])
    assert stats.top2_margin(logits) == pytest.approx(np.array(want), abs=1e-12)


def test_parse_gate_default_and_errors():
    spec = stats.parse_gate(stats.DEFAULT_GATE)
    assert (spec.max_drop, spec.max_bound, spec.confidence) == (0.01, 0.02, 0.95)
    spec = stats.parse_gate("drop=0.5,bound=1.5,confidence=0.9,margin=0.3")
    assert (spec.max_drop, spec.max_bound, spec.confidence, spec.margin) == (0.005, 0.015, 0.9, 0.3)
    for bad in ("drop", "drop=x", "speed=2", "drop=3,bound=2", "bound=200", "confidence=1"):
        with pytest.raises(MineralNetError, match="--int8-gate"):
            stats.parse_gate(bad)


def test_gate_verdicts():
    rng = np.random.default_rng(4)
    n, classes = 400, 5
    y = rng.integers(0, classes, n)
    fp32 = rng.normal(0, 1, (n, classes))
    fp32[np.arange(n), y] += 4.0  # a good model
    same = stats.evaluate_gate(fp32, fp32 + rng.normal(0, 1e-4, fp32.shape), y)
    assert same.passed and same.agreement.value > 0.99 and "passed" in same.line()
    broken = fp32.copy()
    flip = rng.random(n) < 0.1  # 10% of the photos answered as class (y + 1)
    broken[flip] = 0.0
    broken[flip, (y[flip] + 1) % classes] = 10.0
    verdict = stats.evaluate_gate(fp32, broken, y, noise={"fp16": fp32})
    assert not verdict.passed and verdict.drop > 0.05 and verdict.drop_high > verdict.drop
    line = verdict.line()
    assert "FAILED" in line and "upper bound" in line and "fp16 noise floor 100.0%" in line
    no_labels = stats.evaluate_gate(fp32, fp32, None)
    assert not no_labels.passed and no_labels.drop is None


def _gate_on(n: int, right: int, lost: int):
    """evaluate_gate on n photos where fp32 is right on `right` of them and int8 loses `lost` of those."""
    y = np.zeros(n, int)
    fp32 = np.zeros((n, 3))
    fp32[:right, 0] = 1.0  # right
    fp32[right:, 1] = 1.0  # wrong
    int8 = fp32.copy()
    int8[:lost] = [0.0, 0.0, 1.0]
    return stats.evaluate_gate(fp32, int8, y)


def test_photos_needed_for_one_lost_photo_match_a_brute_force_search():
    from mineralnet.quantize.exporting import too_few_photos

    spec = stats.GateSpec()
    for acc in (0.5, 0.75, 0.9):
        need = stats.photos_for_one_loss(spec, acc)
        passes = [n for n in range(20, 400)
                  if _gate_on(n, max(1, min(n, round(acc * n))), 1).passed]
        assert need == passes[0] and all(n in passes for n in range(need, 400))  # and it stays passing
    # 165 photos at 75%: one net photo fails the bound (2.25 > 2), and the failure line says why
    small, large = _gate_on(165, 124, 1), _gate_on(400, 300, 1)
    assert not small.passed and small.drop_high == pytest.approx(stats.one_photo_bound(165, 124 / 165))
    line = too_few_photos(small, spec)
    assert "on 165 photos a single photo lost net already fails the bound" in line
    assert f"(about {stats.photos_for_one_loss(spec, 124 / 165)} are needed)" in line and "--val-data" in line
    assert large.passed and too_few_photos(_gate_on(400, 300, 9), spec) == ""


# ----------------------------------------------------------------------------- a tiny conv net with a known weak spot
SIZE = 16


def _tiny_images(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.normal(0, 1, (n, 3, 1, 1)) + 0.5 * rng.normal(0, 1, (n, 3, SIZE, SIZE))).astype(np.float32)


def _tiny_model(outlier: float = 1000.0) -> bytes:
    """images -> conv1 -> relu -> conv2 -> relu -> conv3 -> relu -> mean -> fc -> logits.

    conv1's channel 7 is a constant `outlier` that conv2 ignores (zero weights): its per-tensor uint8 range
    (0..outlier) leaves the real channels a step of outlier/255, so int8 loses them at conv2's INPUT. Leaving
    conv2 alone in float (it then reads conv1's output before its Q/DQ pair) restores the answers: conv2 is
    the known sensitive node."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def conv_w(cout, cin):
        return (rng.uniform(-1, 1, (cout, cin, 3, 3)) / math.sqrt(cin * 9)).astype(np.float32)

    w1, b1 = conv_w(8, 3), rng.uniform(-0.1, 0.1, 8).astype(np.float32)
    w1[7], b1[7] = 0.0, outlier
    w2, b2 = conv_w(8, 8), rng.uniform(-0.1, 0.1, 8).astype(np.float32)
    w2[:, 7] = 0.0
    w3, b3 = conv_w(8, 8), rng.uniform(-0.1, 0.1, 8).astype(np.float32)

    def build(fc_w, fc_b):
        inits = [numpy_helper.from_array(a, n) for a, n in
                 ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (w3, "w3"), (b3, "b3"), (fc_w, "fc_w"),
                  (fc_b, "fc_b"), (np.array([2, 3], np.int64), "axes"))]
        nodes = [helper.make_node("Conv", ["images", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
                 helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
                 helper.make_node("Conv", ["r2", "w3", "b3"], ["c3"], name="conv3", pads=[1, 1, 1, 1]),
                 helper.make_node("Relu", ["c3"], ["r3"], name="relu3"),
                 helper.make_node("ReduceMean", ["r3", "axes"], ["pooled"], name="pool", keepdims=0),
                 helper.make_node("Gemm", ["pooled", "fc_w", "fc_b"], ["logits"], name="fc", transB=1)]
        graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("images", TensorProto.FLOAT,
                                                                                 ["batch", 3, SIZE, SIZE])],
                                  [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        model.ir_version = 9
        onnx.checker.check_model(model)
        return model.SerializeToString()

    # a head that spreads the answers over the 4 classes: standardise the pooled features first
    probe = build(np.eye(4, 8, dtype=np.float32), np.zeros(4, np.float32))
    from mineralnet.quantize import graph as g
    import onnx as _onnx

    proto = _onnx.load_from_string(probe)
    proto.graph.output.append(_onnx.helper.make_tensor_value_info("pooled", _onnx.TensorProto.FLOAT, ["batch", 8]))
    sess = g.session(proto)
    pooled = sess.run(["pooled"], {"images": _tiny_images(256, 9)})[0]
    mu, sd = pooled.mean(0), pooled.std(0) + 1e-6
    fc_w = (rng.normal(0, 1, (4, 8)) / sd).astype(np.float32)
    return build(fc_w, (-(fc_w @ mu)).astype(np.float32))


@pytest.fixture(scope="module")
def tiny():
    from mineralnet.quantize import graph as g, recipe as rc

    pre = rc.preprocess(_tiny_model())
    calib, test = _tiny_images(64, 1), _tiny_images(300, 2)
    ref = g.logits(g.session(pre), test)
    qdq = rc.quantize(pre, calib, rc.Recipe())
    return {"pre": pre, "qdq": qdq, "calib": calib, "test": test, "ref": ref, "labels": ref.argmax(1)}


def _agree(a, b):
    return float((a.argmax(1) == b.argmax(1)).mean())


def test_float_nodes_restores_the_known_sensitive_node(tiny):
    from mineralnet.quantize import graph as g

    qdq = g.load(tiny["qdq"])
    assert g.int8_nodes(qdq) == ["conv1", "conv2", "conv3"]
    assert _agree(tiny["ref"], g.logits(g.session(qdq), tiny["test"])) < 0.6
    same = g.float_nodes(qdq, tiny["pre"], [])
    np.testing.assert_allclose(g.logits(g.session(same), tiny["test"]), g.logits(g.session(qdq), tiny["test"]))
    fixed = g.float_nodes(qdq, tiny["pre"], ["conv2"])
    assert g.int8_nodes(fixed) == ["conv1", "conv3"]
    assert _agree(tiny["ref"], g.logits(g.session(fixed), tiny["test"])) > 0.95
    every = g.float_nodes(qdq, tiny["pre"], ["conv1", "conv2", "conv3", "pool"])
    np.testing.assert_allclose(g.logits(g.session(every), tiny["test"]), tiny["ref"], atol=1e-4)  # all float again


def test_macs_and_the_int8_share_match_a_hand_count(tiny):
    from mineralnet.quantize import graph as g

    table = g.macs(g.load(tiny["pre"]))
    hw = SIZE * SIZE
    want = {"conv1": hw * 8 * 3 * 9, "conv2": hw * 8 * 8 * 9, "conv3": hw * 8 * 8 * 9, "fc": 4 * 8}
    assert table == want
    fixed = g.float_nodes(g.load(tiny["qdq"]), tiny["pre"], ["conv2"])
    assert g.int8_mac_share(fixed, table) == pytest.approx((want["conv1"] + want["conv3"]) / sum(want.values()))


def test_graph_regions(tiny):
    from mineralnet.quantize import graph as g

    pre = g.load(tiny["pre"])
    assert g.tail_nodes(pre) == ["fc", "pool"]
    assert g.map_nodes(pre) == ["conv3", "relu3"]


def test_sensitivity_ranks_the_known_node_first(tiny):
    from mineralnet.quantize import report as rp

    sens = rp.sensitivity(tiny["pre"], tiny["qdq"], tiny["test"], tiny["labels"])
    first = sens["ranking"][0]
    assert first["node"] == "conv2" and first["rank"] == 1
    assert first["agreement_gain"] > 0.3 and first["accuracy_gain"] == pytest.approx(first["agreement_gain"])
    assert {r["node"] for r in sens["ranking"]} == {"conv1", "conv2", "conv3"}


def test_auto_fallback_floats_the_sensitive_node_until_the_gate_holds(tiny):
    from mineralnet.quantize import graph as g, report as rp
    from mineralnet.quantize.fallback import auto_fallback

    rank_x, rank_y = tiny["test"][:150], tiny["labels"][:150]
    held_x, held_y = tiny["test"][150:], tiny["labels"][150:]
    sens = rp.sensitivity(tiny["pre"], tiny["qdq"], rank_x, rank_y)
    order = [r["node"] for r in sens["ranking"]]
    spec = stats.parse_gate("drop=3,bound=6")
    fb = auto_fallback(tiny["pre"], tiny["qdq"], order, rank_x, rank_y, spec, min_int8_share=0.5, min_step_db=None)
    assert fb.floated == ["conv2"] and fb.ranking_gate.passed and not fb.stopped_by_floor
    assert [s["passed"] for s in fb.steps] == [False, True]
    assert 0 < fb.int8_mac_share < fb.full_int8_mac_share
    held = g.logits(g.session(fb.model), held_x)
    confirm = stats.evaluate_gate(tiny["ref"][150:], held, held_y, spec=spec)
    assert confirm.passed


def test_auto_fallback_never_floats_below_the_int8_share_floor(tiny):
    """conv2 is 64/152 of the tiny model's conv MACs: floating it leaves about 58% int8. With the default floor
    (80%) the walk stops at nothing floated and returns full int8 with its failed ranking gate; a floor just under
    the share that floating conv2 leaves lets it through again."""
    from mineralnet.quantize import graph as g, report as rp
    from mineralnet.quantize.fallback import MIN_INT8_SHARE, auto_fallback

    rank_x, rank_y = tiny["test"][:150], tiny["labels"][:150]
    order = [r["node"] for r in rp.sensitivity(tiny["pre"], tiny["qdq"], rank_x, rank_y)["ranking"]]
    assert order[0] == "conv2"
    table = g.macs(g.load(tiny["pre"]))
    left = (table["conv1"] + table["conv3"]) / sum(table.values())  # int8 share with conv2 floated (fc is float)
    assert left < MIN_INT8_SHARE
    lines = []
    spec = stats.parse_gate("drop=3,bound=6")
    fb = auto_fallback(tiny["pre"], tiny["qdq"], order, rank_x, rank_y, spec, log=lines.append, min_step_db=None)
    assert fb.floated == [] and fb.stopped_by_floor and not fb.ranking_gate.passed
    assert fb.int8_mac_share == fb.full_int8_mac_share >= MIN_INT8_SHARE and len(fb.steps) == 1
    assert g.int8_nodes(g.load(fb.model)) == ["conv1", "conv2", "conv3"]
    assert any("floating conv2 too would leave" in line and "80% floor" in line for line in lines)
    assert fb.to_dict()["stopped_by_floor"] is True and "never below 80%" in fb.to_dict()["rule"]
    through = auto_fallback(tiny["pre"], tiny["qdq"], order, rank_x, rank_y, spec, min_int8_share=left - 0.01,
                            min_step_db=None)
    assert through.floated == ["conv2"] and through.ranking_gate.passed and not through.stopped_by_floor
    assert through.int8_mac_share == pytest.approx(left)


def test_tensor_stats_match_qdq_loss_debug_on_all_images(tiny, tmp_path):
    """The batch-by-batch SQNR equals onnxruntime's function over the concatenated activations; clipping is
    counted against the tensor's int8 range."""
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, compute_signal_to_quantization_noice_ratio,
                                                         create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    from mineralnet.quantize import graph as g, report as rp

    images = tiny["test"][:20]
    rows = {r["tensor"]: r for r in rp.tensor_stats(tiny["pre"], tiny["qdq"], images, batch=8)}
    paths = {}
    for name, data in (("float", tiny["pre"]), ("qdq", tiny["qdq"])):
        (tmp_path / f"{name}.onnx").write_bytes(data)
        modify_model_output_intermediate_tensors(str(tmp_path / f"{name}.onnx"), str(tmp_path / f"{name}.aug.onnx"))
        reader = g.CalibrationReader(images, "images", 20, False)
        paths[name] = collect_activations(str(tmp_path / f"{name}.aug.onnx"), reader)
    matched = create_activation_matching(paths["qdq"], paths["float"])
    assert set(rows) == set(matched) and len(rows) >= 3
    # ORT folds each Relu into the Q/DQ after its Conv: the QDQ model's pre-Q/DQ values are the Conv's, so the
    # Relu is applied before comparing (here by hand: every folded tensor of this net is a Relu's output)
    assert rp.folded_activations(tiny["pre"], tiny["qdq"]) == {"r1": (0.0, math.inf), "r2": (0.0, math.inf),
                                                                "r3": (0.0, math.inf)}
    for name, m in matched.items():
        if name in ("r1", "r2", "r3"):
            m["pre_qdq"] = [np.maximum(v, 0) for v in m["pre_qdq"]]
        assert rows[name]["sqnr_local_db"] == pytest.approx(
            compute_signal_to_quantization_noice_ratio(m["pre_qdq"], m["post_qdq"]), abs=1e-4)  # theirs sums in float32
        assert rows[name]["sqnr_accumulated_db"] == pytest.approx(
            compute_signal_to_quantization_noice_ratio(m["float"], m["post_qdq"]), abs=1e-4)
        r = rows[name]
        pre = np.concatenate([v.ravel() for v in m["pre_qdq"]])
        lo, hi = r["range"][0] - r["scale"] / 2, r["range"][1] + r["scale"] / 2
        assert r["clipped_share"] == pytest.approx(float(((pre < lo) | (pre > hi)).mean()))


def test_weight_stats_worst_channel(tiny):
    """Per-channel SQNR against a dequantization done here from the int8 tensor and its per-channel scales."""
    from onnx import numpy_helper

    from mineralnet.quantize import graph as g, report as rp

    rows = {r["weight"]: r for r in rp.weight_stats(tiny["pre"], tiny["qdq"])}
    assert set(rows) == {"w1", "w2", "w3"}
    q = {t.name: numpy_helper.to_array(t) for t in g.load(tiny["qdq"]).graph.initializer}
    f = {t.name: numpy_helper.to_array(t) for t in g.load(tiny["pre"]).graph.initializer}
    for name, row in rows.items():
        deq = q[f"{name}_quantized"].astype(np.float64) * q[f"{name}_scale"].reshape(-1, 1, 1, 1)
        w = f[name].astype(np.float64)
        per = [20 * math.log10(np.linalg.norm(w[c]) / np.linalg.norm(w[c] - deq[c])) if np.any(w[c]) else math.inf
               for c in range(len(w))]
        assert row["worst_channel"] == int(np.argmin(per))
        assert row["worst_channel_sqnr_db"] == pytest.approx(min(per), abs=1e-3)
    assert rows["w1"]["worst_channel"] != 7  # conv1's channel 7 is all zeros: exact in int8


def test_broken_calibration_is_caught_by_the_gate(tiny):
    """Ranges from a few all-black photos: the gate fails, and its one line names the drop and the bound."""
    from mineralnet.quantize import graph as g, recipe as rc

    black = np.zeros((4, 3, SIZE, SIZE), np.float32) - 2.0
    broken = rc.quantize(tiny["pre"], black, rc.Recipe())
    verdict = stats.evaluate_gate(tiny["ref"], g.logits(g.session(broken), tiny["test"]), tiny["labels"])
    assert not verdict.passed
    assert "FAILED" in verdict.line() and "upper bound" in verdict.line()


def test_cpu_flags_and_reduce_range():
    from mineralnet.quantize import recipe as rc

    text = "processor\t: 0\nflags\t\t: fpu avx2 fma avx512f\n"
    assert rc.cpu_flags(text) == {"fpu", "avx2", "fma", "avx512f"}
    assert not rc.has_vnni(rc.cpu_flags(text)) and rc.default_recipe(rc.cpu_flags(text)).reduce_range
    assert rc.has_vnni({"avx2", "avx_vnni"}) and not rc.default_recipe({"amx_int8"}).reduce_range


def test_make_int8_with_fallback_and_report(tiny, tmp_path):
    from mineralnet.quantize import pipeline, report as rp
    from mineralnet.quantize import recipe as rc

    y = tiny["labels"]
    calib = pipeline.Photos(tiny["calib"])
    select = pipeline.Photos(tiny["test"][:150], y[:150], source="ranking photos")
    held = pipeline.Photos(tiny["test"][150:], y[150:], [f"p{i}.jpg" for i in range(150)], "held-out photos")
    spec = stats.parse_gate("drop=3,bound=6")
    off = pipeline.make_int8(_tiny_model(), calib, select, held, spec=spec, recipe=rc.Recipe(), search=False,
                             want_report=False)
    assert not off.gate.passed and len(off.report["flipped"]) > 10
    lines = []
    auto = pipeline.make_int8(_tiny_model(), calib, select, held, spec=spec, recipe=rc.Recipe(), search=True,
                              fallback="auto", log=lines.append, min_int8_share=0.5)  # conv2 is 42% of the MACs
    assert auto.gate.passed
    assert len(auto.report["recipe"]["trials"]) == len(rc.DEFAULT_METHODS) * len(rc.DEFAULT_KEEP)
    assert auto.report["sensitivity"]["ranking"][0]["node"] == "conv2"
    paths = rp.write(auto.report, tmp_path)
    assert paths["png"].stat().st_size > 1000 and "Most sensitive nodes" in paths["md"].read_text()


# ----------------------------------------------------------------------------- which photos play which part
@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from mineralnet.data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("qdemo") / "set", classes=3, per_class=12, size=48)


def _classes(folder):
    from pathlib import Path

    return sorted(p.name for p in Path(folder).iterdir() if p.is_dir())


def test_plan_uses_the_runs_split_and_keeps_the_three_sets_apart(demo, tmp_path):
    from mineralnet.data import save_splits, scan_dataset
    from mineralnet.quantize import exporting

    index = scan_dataset(demo, verify=False)
    n = len(index.samples)
    val = list(range(0, n, 4))
    train = [i for i in range(n) if i not in val]
    save_splits(tmp_path / "split.json", index, {"train": train, "val": val}, info={})
    plan = exporting.plan_photos(tmp_path, index.classes, calib_size=10, select_size=100)
    held = {p for p, _ in plan.heldout}
    assert held == {index.samples[i][0] for i in val} and plan.heldout_source == "validation photos of the run"
    assert len(plan.calib) == 10 and not held & set(plan.calib)
    assert not {p for p, _ in plan.select} & (held | set(plan.calib))
    assert len(plan.select) == len(train) - 10


def test_plan_without_a_split(demo, tmp_path):
    from mineralnet.quantize import exporting

    classes = _classes(demo)
    plan = exporting.plan_photos(tmp_path, classes, calib_data=demo, calib_size=100)
    held = {p for p, _ in plan.heldout}
    assert len(held) == 12 and "held out of calibration" in plan.heldout_source
    assert len(plan.calib) == 24 and not held & set(plan.calib)
    with pytest.raises(MineralNetError, match="--val-data DIR"):
        exporting.plan_photos(tmp_path, classes)
    same = exporting.plan_photos(tmp_path, classes, calib_data=demo, val_data=demo, calib_size=100)
    assert "same folder" in same.heldout_source and not {p for p, _ in same.heldout} & set(same.calib)


def test_augmented_selection_photos_are_seeded_and_not_the_eval_view(demo):
    from mineralnet.data import list_images
    from mineralnet.infer import Preprocessor
    from mineralnet.quantize import exporting

    meta = {"image_size": 32, "resize": 37, "mean": [0.5] * 3, "std": [0.25] * 3}
    paths = list_images(demo)[:4]
    f1 = exporting.augmented_preprocess(meta, seed=3)
    a = [f1(p) for p in paths]
    f = exporting.augmented_preprocess(meta, seed=3)
    b = [f(p) for p in paths]
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and a[0].shape == (3, 32, 32)
    plain = Preprocessor(meta)
    assert not all(np.allclose(x, plain(p)) for x, p in zip(a, paths))


def test_auto_fallback_floats_every_node_above_the_gain_threshold(tiny):
    """The gain rule: nodes whose own logit-SQNR gain reaches min_gain_db are floated even when the ranking gate
    already holds with fewer; the rest only while the gate fails."""
    from mineralnet.quantize import report as rp
    from mineralnet.quantize.fallback import auto_fallback

    rank_x, rank_y = tiny["test"][:150], tiny["labels"][:150]
    sens = rp.sensitivity(tiny["pre"], tiny["qdq"], rank_x, rank_y)
    gains = [r["sqnr_gain_db"] for r in sens["ranking"]]
    assert gains == sorted(gains, reverse=True) and sens["ranking"][0]["node"] == "conv2"
    order = [r["node"] for r in sens["ranking"]]
    lenient = stats.parse_gate("drop=100,bound=100")  # holds with nothing floated
    none = auto_fallback(tiny["pre"], tiny["qdq"], order, rank_x, rank_y, lenient, min_step_db=None)
    assert none.floated == [] and len(none.steps) == 1
    two = auto_fallback(tiny["pre"], tiny["qdq"], order, rank_x, rank_y, lenient, gains=[5.0, 1.0, 0.1],
                        min_gain_db=0.5, min_int8_share=0, min_step_db=None)  # the floor has its own test
    assert two.floated == order[:2] and [s["floated"] for s in two.steps] == [0, 1, 2]
    assert two.steps[2]["logit_sqnr_db"] > two.steps[0]["logit_sqnr_db"]
    with pytest.raises(ValueError):
        auto_fallback(tiny["pre"], tiny["qdq"], order, rank_x, rank_y, lenient, gains=[1.0])


def _sqnr_by_hand(ref, got):
    return 10 * math.log10(float((ref.astype(np.float64) ** 2).sum() / ((ref - got).astype(np.float64) ** 2).sum()))


def test_auto_fallback_stops_at_the_knee_of_the_measured_sqnr(tiny):
    """The default rule past the wanted nodes: float the next node only while it raises the logit SQNR measured on
    the ranking photos by min_step_db; the first node that adds less is tried, recorded as not kept, and the walk
    returns the model before it. The SQNR of every prefix is recomputed here from float_nodes and a hand formula;
    the gate is lenient, so it cannot be what stops the walk."""
    from mineralnet.quantize import graph as g, report as rp
    from mineralnet.quantize.fallback import MIN_STEP_DB, auto_fallback

    rank_x, rank_y = tiny["test"][:150], tiny["labels"][:150]
    order = [r["node"] for r in rp.sensitivity(tiny["pre"], tiny["qdq"], rank_x, rank_y)["ranking"]]
    ref = g.logits(g.session(tiny["pre"]), rank_x)
    qdq = g.load(tiny["qdq"])
    db = [_sqnr_by_hand(ref, g.logits(g.session(g.float_nodes(qdq, tiny["pre"], order[:k]) if k else qdq), rank_x))
          for k in range(3)]
    first, second = db[1] - db[0], db[2] - db[1]
    assert first > second + 0.2 and MIN_STEP_DB > 0  # conv2 first, a large step; conv1 adds less
    lenient = stats.parse_gate("drop=100,bound=100")
    lines = []
    knee = auto_fallback(tiny["pre"], tiny["qdq"], order, rank_x, rank_y, lenient, min_int8_share=0,
                         min_step_db=(first + second) / 2, log=lines.append)
    assert knee.floated == order[:1] and not knee.stopped_by_floor
    assert [(s["floated"], s["kept"]) for s in knee.steps] == [(0, True), (1, True), (2, False)]
    assert [s["logit_sqnr_db"] for s in knee.steps] == pytest.approx(db, abs=0.01)
    assert g.int8_nodes(g.load(knee.model)) == [n for n in ["conv1", "conv2", "conv3"] if n != order[0]]
    assert any(f"floating {order[1]} too adds" in line for line in lines)
    assert "while each adds >=" in knee.to_dict()["rule"]
    # a smaller step lets the second node through; the wanted nodes are floated whatever their step
    assert auto_fallback(tiny["pre"], tiny["qdq"], order, rank_x, rank_y, lenient, min_int8_share=0,
                         min_step_db=second / 2, max_nodes=2).floated == order[:2]
    wanted = auto_fallback(tiny["pre"], tiny["qdq"], order, rank_x, rank_y, lenient, min_int8_share=0,
                           gains=[9.0, 9.0, 0.0], min_step_db=first * 10)
    assert wanted.floated == order[:2] and [s["kept"] for s in wanted.steps] == [True, True, True, False]


def test_module_names_read_torch_onnx_scopes_and_name_folded_convs(tmp_path):
    """The report names the PyTorch module of each node: exported here by torch.onnx itself, so the test breaks
    if the exporter stops writing the scopes; the folded conv is named by the batch norm it absorbed."""
    import onnx
    import torch

    from mineralnet.quantize import graph as g

    class Wrapper(torch.nn.Module):  # like export.onnx.ExportHead: the network under `.model`
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.stem = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4))
            self.model.head = torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.model.head(self.model.stem(x).relu().mean((2, 3)))

    path = tmp_path / "m.onnx"
    torch.onnx.export(Wrapper().eval(), (torch.rand(1, 3, 8, 8),), str(path), dynamo=True, optimize=True)
    proto = onnx.load(str(path))
    names = g.module_names(proto)
    by_op = {n.op_type: names.get(n.name) for n in proto.graph.node}
    assert by_op["Conv"] == "conv before stem.1"
    assert by_op["Gemm"] == "head"
    assert all(not v.startswith("model.") for v in names.values())
    # a node without the metadata, or with scopes that name no module, is left out
    bare = onnx.helper.make_node("Relu", ["a"], ["b"], name="bare")
    odd = onnx.helper.make_node("Relu", ["b"], ["c"], name="odd")
    odd.metadata_props.add(key="pkg.torch.onnx.name_scopes", value="['', 'relu']")
    graph = onnx.helper.make_graph([bare, odd], "g", [onnx.helper.make_tensor_value_info("a", 1, [1])],
                                   [onnx.helper.make_tensor_value_info("c", 1, [1])])
    assert g.module_names(onnx.helper.make_model(graph)) == {}


def test_report_table_shows_the_module_beside_the_node():
    from mineralnet.quantize import report as rp

    row = {"rank": 1, "node": "node_Conv_757", "module": "conv before backbone.blocks.0.0.bn1", "flips": 3,
           "agreement_gain": 0.01, "logit_sqnr_db": 20.1, "sqnr_gain_db": 1.9}
    md = rp.markdown({"sensitivity": {"images": 8, "baseline": {"flips": 6, "logit_sqnr_db": 18.2},
                                      "ranking": [row, {**row, "rank": 2, "node": "node_Add_1", "module": None}]}})
    assert "| 1 | node_Conv_757 (conv before backbone.blocks.0.0.bn1) |" in md
    assert "| 2 | node_Add_1 |" in md
