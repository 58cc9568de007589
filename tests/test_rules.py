"""The IDEAL step: sensitivities from scores, beta = -m * alpha / max|alpha|, and its signs."""

from __future__ import annotations

import numpy as np
import pytest

from ideal.errors import IdealError
from ideal.influence.objective import sensitivities
from ideal.methods.rules import IdealRule, UniformRule, additive_delta, ideal_beta
from ideal.methods.settings import UpdateSettings

# references x domains; s_ji > 0: more of domain i lowers the loss on reference j (i helps j)
SCORES = np.array([[2.0, -1.0, 0.0], [4.0, -3.0, 1.0]])


def test_sensitivities_by_hand():
    # mean over references: [3, -2, 0.5]; shares n_i/N = [0.5, 0.25, 0.25]
    alpha = sensitivities(SCORES, [50, 25, 25])
    assert alpha == pytest.approx([-1.5, 0.5, -0.125])
    assert sensitivities(SCORES, [50, 25, 25], size_factor=False) == pytest.approx([-3, 2, -0.5])
    weighted = sensitivities(SCORES, [1, 1, 1], weights=[1.0, 0.0], size_factor=False)
    assert weighted == pytest.approx([-2.0, 1.0, 0.0])


def test_beta_largest_change_is_m_and_signs_follow_the_convention():
    alpha = sensitivities(SCORES, [50, 25, 25])
    beta = ideal_beta(alpha, step=0.15)
    assert np.abs(beta).max() == pytest.approx(0.15)
    assert beta == pytest.approx([0.15, -0.05, 0.0125])
    # domain 0 helps every reference: up; domain 1 hurts every reference: down
    assert beta[0] > 0 > beta[1]


def test_zero_sensitivities_do_not_move():
    assert ideal_beta([0.0, 0.0], 0.15).tolist() == [0.0, 0.0]


def test_bad_step_and_non_finite_sensitivities_are_errors():
    with pytest.raises(IdealError, match="step m"):
        ideal_beta([1.0], step=1.5)
    with pytest.raises(IdealError, match="finite"):
        ideal_beta([np.nan, 1.0], 0.15)


def test_rules_propose_volumes():
    volumes = {"a": 100, "b": 50}
    proposed = IdealRule(UpdateSettings(), step=0.2).propose(
        volumes, {"sensitivity": {"a": -4.0, "b": 1.0}}
    )
    assert proposed == pytest.approx({"a": 120.0, "b": 47.5})
    assert UniformRule().propose(volumes, {}) == {"a": 75.0, "b": 75.0}
    # uniform is a fixed point of the uniform rule
    assert UniformRule().propose({"a": 75, "b": 75}, {}) == {"a": 75.0, "b": 75.0}


def test_additive_step_by_hand():
    volumes = {"a": 100, "b": 50}  # mean volume 75; g = alpha/n = [-0.04, 0.02]
    signals = {"sensitivity": {"a": -4.0, "b": 1.0}}
    # centred (kept total): g - mean(g) = [-0.03, 0.03]; dn = -0.2 * 75 * g / 0.03 = [+15, -15],
    # and b may lose at most m = 20 % of its 50: 40, not 35
    assert IdealRule(UpdateSettings(geometry="additive"), step=0.2).propose(
        volumes, signals
    ) == pytest.approx({"a": 115.0, "b": 40.0})
    # not centred: dn = -15 * g / 0.04 = [+15, -7.5]
    free = IdealRule(UpdateSettings(geometry="additive", keep_total=False), step=0.2)
    assert free.propose(volumes, signals) == pytest.approx({"a": 115.0, "b": 42.5})
    assert additive_delta([-4.0, 1.0], [100, 50], 0.2) == pytest.approx([15.0, -15.0])
    assert additive_delta([0.0, 0.0], [100, 50], 0.15).tolist() == [0.0, 0.0]


def test_additive_step_moves_scarce_and_large_domains_by_their_per_example_signal():
    # the same per-example score s on a domain of 1000 and one of 10: relative (docs/method.md) moves
    # the large one and leaves the scarce one almost where it is; additive moves both by the same
    # number of rows
    volumes = [1000, 10, 10]
    alpha = sensitivities(np.array([[1.0, 1.0, 0.0]]), volumes)
    beta = ideal_beta(alpha, 0.3)
    assert beta[0] == pytest.approx(0.3) and beta[1] == pytest.approx(0.003)
    delta = additive_delta(alpha, volumes, 0.3)
    assert delta[0] == pytest.approx(delta[1]) and delta[0] > 0 > delta[2]
    assert np.abs(delta).max() == pytest.approx(0.3 * 1020 / 3)
    assert delta.sum() == pytest.approx(0.0, abs=1e-9)  # centred: the total is kept


def test_additive_step_rejects_bad_input():
    with pytest.raises(IdealError, match="step m"):
        additive_delta([1.0], [10], step=0.0)
    with pytest.raises(IdealError, match="finite"):
        additive_delta([np.inf, 1.0], [10, 10], 0.15)
    with pytest.raises(IdealError, match="volumes must be > 0"):
        additive_delta([1.0, 1.0], [10, 0], 0.15)
    with pytest.raises(IdealError, match="update.geometry"):
        UpdateSettings(geometry="log")


def test_temperature_rule():
    from ideal.methods.rules import TemperatureRule

    volumes = {"a": 10, "b": 30}  # total 40
    signals = {"pool_sizes": {"a": 100, "b": 400}}
    assert TemperatureRule(1.0).propose(volumes, signals) == pytest.approx(
        {"a": 8.0, "b": 32.0}
    )  # proportional
    assert TemperatureRule(2.0).propose(volumes, signals) == pytest.approx(
        {"a": 40 / 3, "b": 80 / 3}
    )  # sqrt: 10:20
    assert TemperatureRule(1e9).propose(volumes, signals) == pytest.approx(
        {"a": 20.0, "b": 20.0}, rel=1e-6
    )  # uniform


def test_random_mixtures_keep_the_total():
    from ideal.methods.rules import FixedRule, random_shares

    rng = np.random.default_rng(0)
    volumes = {"a": 100, "b": 50, "c": 250}
    for _ in range(20):
        shares = random_shares(sorted(volumes), rng)
        assert [d for d, _ in shares] == ["a", "b", "c"] and all(s >= 0 for _, s in shares)
        proposed = FixedRule(shares).propose(volumes, {})
        assert sum(proposed.values()) == pytest.approx(400)
        assert proposed["a"] / proposed["b"] == pytest.approx(dict(shares)["a"] / dict(shares)["b"])
    with pytest.raises(IdealError, match="do not match the domains"):
        FixedRule((("a", 1.0),)).propose(volumes, {})


def test_doremi_step_by_hand():
    from ideal.methods.rules import doremi_step

    alpha, excess = np.array([0.5, 0.25, 0.25]), np.array([0.0, np.log(2.0), 0.0])
    # exp(eta lambda): [1, 2, 1] -> alpha' = [0.5, 0.5, 0.25] / 1.25 = [0.4, 0.4, 0.2]
    assert doremi_step(alpha, excess, eta=1.0, smoothing=0.0) == pytest.approx([0.4, 0.4, 0.2])
    # smoothing c = 0.1: 0.9 * [0.4, 0.4, 0.2] + 0.1 / 3
    smoothed = doremi_step(alpha, excess, eta=1.0, smoothing=0.1)
    assert smoothed == pytest.approx([0.36 + 0.1 / 3, 0.36 + 0.1 / 3, 0.18 + 0.1 / 3])
    assert smoothed.sum() == pytest.approx(1.0)
    # eta 2 squares the multiplier: [1, 4, 1] -> [0.5, 1, 0.25] / 1.75
    assert doremi_step(alpha, excess, eta=2.0, smoothing=0.0) == pytest.approx(
        [0.5 / 1.75, 1 / 1.75, 0.25 / 1.75]
    )
    # equal excess everywhere: weights unchanged (up to the smoothing)
    assert doremi_step(alpha, [0.3, 0.3, 0.3], smoothing=0.0) == pytest.approx(alpha)


def test_doge_step_by_hand_and_uniform_is_its_fixed_point_without_signal():
    from ideal.methods.rules import doge_step

    alpha = np.array([0.25, 0.25, 0.5])
    # W = [log 3, 0, 0] -> [0.75, 0.25, 0.5] / 1.5
    assert doge_step(alpha, [np.log(3.0), 0.0, 0.0]) == pytest.approx([0.5, 1 / 6, 1 / 3])
    # a domain whose gradient opposes the reference gradient loses weight
    moved = doge_step(alpha, [0.0, -1.0, 0.0], eta=0.5)
    assert moved[1] < alpha[1] and moved.sum() == pytest.approx(1.0)
    assert doge_step(np.full(4, 0.25), np.zeros(4)) == pytest.approx(np.full(4, 0.25))
    # a huge alignment underflows the others to 0; the next step still works (no log(0) error)
    collapsed = doge_step([0.5, 0.5], [2000.0, 0.0])
    assert collapsed.tolist() == [1.0, 0.0]
    after = doge_step(collapsed, [0.0, 1.0])
    assert after[0] == 1.0 and after[1] < 1e-290


def test_weight_updates_reject_bad_input():
    from ideal.methods.rules import doge_step, doremi_step

    with pytest.raises(IdealError, match="sum to 1"):
        doremi_step([0.5, 0.6], [0.0, 0.0])
    with pytest.raises(IdealError, match="non-negative"):
        doge_step([1.5, -0.5], [0.0, 0.0])
    with pytest.raises(IdealError, match="finite"):
        doge_step([0.5, 0.5], [np.inf, 0.0])
    with pytest.raises(IdealError, match="smoothing"):
        doremi_step([0.5, 0.5], [0.0, 0.0], smoothing=2.0)


def test_proxy_rule_turns_weights_into_volumes_at_the_same_total():
    from ideal.methods.rules import ProxyRule

    volumes = {"a": 100, "b": 50, "c": 250}
    weights = {"a": 0.5, "b": 0.25, "c": 0.25}
    proposed = ProxyRule("doremi").propose(volumes, {"weights": weights})
    assert proposed == pytest.approx({"a": 200.0, "b": 100.0, "c": 100.0})
    assert ProxyRule("doge").name == "doge" and ProxyRule("doge").signal == "proxy"


def test_noise_gate_holds_domains_within_min_z_standard_errors():
    from ideal.methods.rules import IdealRule

    volumes = {"a": 100, "b": 100, "c": 100}
    signals = {
        "sensitivity": {"a": -2.0, "b": 0.5, "c": 1.0},
        "sensitivity_stderr": {"a": 0.5, "b": 0.4, "c": 0.2},  # z = 4, 1.25, 5
    }
    off = IdealRule(UpdateSettings(min_z=0.0), step=0.2).propose(volumes, signals)
    assert off == pytest.approx({"a": 120.0, "b": 95.0, "c": 90.0})
    # the soft threshold (the default): |alpha| - 2 se = 1.0, 0 (held), 0.6 -> normalised by 1.0
    soft = IdealRule(UpdateSettings(min_z=2.0), step=0.2)
    assert soft.held(signals) == ["b"]
    assert soft.propose(volumes, signals) == pytest.approx({"a": 120.0, "b": 100.0, "c": 88.0})
    gate = IdealRule(UpdateSettings(min_z=2.0, shrink="gate"), step=0.2)
    assert gate.held(signals) == ["b"]
    assert gate.propose(volumes, signals) == pytest.approx({"a": 120.0, "b": 100.0, "c": 90.0})
    # without standard errors (an older influence.json) nothing is held
    assert gate.held({"sensitivity": signals["sensitivity"]}) == []


def test_heatmap_marks_scores_within_two_standard_errors_of_zero(tmp_path):
    from ideal.report.plots import influence_heatmap, noise_mask

    scores = np.array([[1.0, -0.1], [0.3, 2.0]])
    stderr = np.array([[0.1, 0.2], [0.2, 0.5]])
    assert noise_mask(scores, stderr).tolist() == [[False, True], [True, False]]
    assert not noise_mask(scores, None).any()
    path = influence_heatmap(scores, ["d1", "d2"], ["r1", "r2"], tmp_path / "h.png", "t", stderr)
    assert path.read_bytes()[:4] == b"\x89PNG"
