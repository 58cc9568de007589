"""The IDEAL step that goes as far as the evidence allows: the direction judged by each
sensitivity's noise, candidate steps chosen on held-out reference rows, the radius rule, the
surrogate, and a run that resumes in the middle of its candidates."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest

from ideal.errors import IdealError
from ideal.methods.candidates import Candidate, candidate_steps, choose, paired, split_rows
from ideal.methods.rules import IdealRule, direction_table, moves_nothing, noise_aware
from ideal.methods.settings import UpdateSettings
from ideal.methods.surrogate import fit_quadratic, minimise
from ideal.methods.trust import radius_scale
from ideal.run.config import load_config
from ideal.run.loop import planned_trainings, run_loop

# ---------------------------------------------------------------- the direction, judged by noise

VOLUMES = {"arith": 120, "check": 240, "reason": 120, "instruct": 120}
# the harmful source at > 6 standard errors; the largest |alpha| is pure noise (z ~ 1)
SIGNALS = {
    "sensitivity": {"arith": -10.0, "check": 90.0, "reason": -516.0, "instruct": -3.0},
    "sensitivity_stderr": {"arith": 12.0, "check": 14.0, "reason": 493.0, "instruct": 5.0},
}


def test_soft_threshold_by_hand():
    used = noise_aware([10.0, -10.0, 3.0, 0.5], [2.0, 4.0, 2.0, 0.0], 2.0, "soft")
    # |10| - 2*2 = 6; |-10| - 2*4 = 2 (sign kept); 3 - 4 < 0 -> 0; se 0 -> kept whole
    np.testing.assert_allclose(used, [6.0, -2.0, 0.0, 0.5])
    gate = noise_aware([10.0, -10.0, 3.0], [2.0, 4.0, 2.0], 2.0, "gate")
    np.testing.assert_allclose(gate, [10.0, -10.0, 0.0])
    assert noise_aware([1.0], [5.0], 0.0, "soft").tolist() == [1.0]  # min_z 0: the paper


def test_a_noisy_largest_entry_is_not_the_one_that_moves():
    """The paper's step spends m on reasoning's -516 +- 493; the noise-aware step moves the
    harmful source by m and leaves the noise alone."""
    paper = IdealRule(UpdateSettings(min_z=0.0), step=0.3).propose(VOLUMES, SIGNALS)
    assert paper["reason"] == pytest.approx(120 * 1.3)  # all of m on the noise
    assert paper["check"] == pytest.approx(240 * (1 - 0.3 * 90 / 516))
    ours = IdealRule(UpdateSettings(), step=0.3).propose(VOLUMES, SIGNALS)
    assert ours["check"] == pytest.approx(240 * 0.7)  # the strongest survivor takes m
    assert ours["reason"] == ours["arith"] == 120 and ours["instruct"] == 120
    table = direction_table(SIGNALS, UpdateSettings(), list(VOLUMES))
    assert table["check"]["z"] == pytest.approx(90 / 14)
    assert table["check"]["used"] == pytest.approx(90 - 2 * 14)
    assert table["reason"]["used"] == 0.0 and table["reason"]["z"] == pytest.approx(516 / 493)


def test_reweight_on_a_hand_made_influence_json(tmp_path, capsys):
    """`ideal reweight` on a hand-made influence.json: the noisy largest entry does not move,
    and the update record shows per domain the sensitivity, its error, z and what was used."""
    from tests.helpers import make_data_dir, qa_rows, run_cli

    data = make_data_dir(tmp_path / "train", {d: qa_rows(d, n) for d, n in VOLUMES.items()})
    influence = tmp_path / "influence.json"
    influence.write_text(json.dumps({"domains": sorted(VOLUMES), "volumes": VOLUMES, **SIGNALS}))
    result = run_cli(
        capsys, "reweight", "--train", str(data), "--influence", str(influence),
        "--out", str(tmp_path / "next"), "--step", "0.3", "--no-keep-total",
    )  # fmt: skip
    assert result.code == 0, result.err
    manifest = json.loads((tmp_path / "next" / "mixture.json").read_text())
    volumes = {d: e["volume"] for d, e in manifest["domains"].items()}
    assert volumes == {"arith": 120, "check": 168, "reason": 120, "instruct": 120}
    direction = manifest["update"]["direction"]
    assert direction["reason"]["used"] == 0.0 and direction["check"]["z"] > 6
    assert manifest["update"]["held_by_noise"] == ["arith", "reason", "instruct"]


# ---------------------------------------------------------------- candidates and their choice


def test_candidate_steps_scale_cap_and_merge():
    assert candidate_steps((0.15, 0.4, 0.75), 1.0, 0.9) == [0.15, 0.4, 0.75]
    assert candidate_steps((0.15, 0.4, 0.75), 0.5, 0.9) == [0.075, 0.2, 0.375]
    assert candidate_steps((0.15, 0.4, 0.75), 2.0, 0.9) == [0.3, 0.8, 0.9]
    assert candidate_steps((0.5, 0.75), 2.0, 0.9) == [0.9]  # both at the cap: one training
    with pytest.raises(IdealError):
        candidate_steps((0.1,), 0.0, 0.9)


def test_split_rows_is_seeded_disjoint_and_leaves_rows_for_the_direction():
    split = split_rows({"a": 16, "b": 3, "c": 1}, 0.5, seed=7)
    assert len(split["a"]) == 8 and len(set(split["a"])) == 8 and max(split["a"]) < 16
    assert len(split["b"]) == 2 and split["c"] == []  # at least one row left to each side
    assert split == split_rows({"a": 16, "b": 3, "c": 1}, 0.5, seed=7)
    assert split["a"] != split_rows({"a": 16}, 0.5, seed=8)["a"]


def test_paired_standard_error_by_hand():
    a = {"x": [1.0, 2.0, 3.0], "y": [1.0, 1.0]}
    b = {"x": [0.5, 2.0, 2.5], "y": [2.0, 0.0]}
    diff, se = paired(a, b, {"x": 0.5, "y": 0.5})
    # x: d = (0.5, 0, 0.5), mean 1/3, var 1/12; y: d = (-1, 1), mean 0, var 2
    assert diff == pytest.approx(0.5 / 3)
    assert se == pytest.approx(np.sqrt(0.25 * (1 / 12) / 3 + 0.25 * 2 / 2))


def _candidate(name, step, rows):
    return Candidate(name, step, step, {"x": rows})


def test_choice_on_held_out_rows_with_ties():
    small = _candidate("m0.15", 0.15, [1.00, 1.10, 0.90, 1.00])
    large = _candidate("m0.75", 0.75, [0.98, 1.09, 0.88, 0.99])  # lower, within one paired SE?
    far = _candidate("m0.40", 0.40, [1.50, 1.60, 1.40, 1.50])
    weights = {"x": 1.0}
    # large - small: differences all -0.01 or -0.02 -> SE tiny: separated, the larger is kept
    chosen, table = choose([small, far, large], weights, "smaller")
    assert chosen == 2 and [r["tie"] for r in table] == [False, False, True]
    noisy = _candidate("m0.75", 0.75, [0.70, 1.40, 0.60, 1.25])  # lower mean, noisy rows
    chosen, table = choose([small, noisy], weights, "smaller")
    assert table[1]["minus_lowest"] == 0.0 and table[0]["tie"]  # small ties with the lowest
    assert chosen == 0  # ties: the smaller step
    assert choose([small, noisy], weights, "larger")[0] == 1
    assert choose([small, noisy], weights, "lowest")[0] == 1


def test_radius_rule():
    assert radius_scale(1.0, -0.8, -1.0, 4.0) == (2.0, pytest.approx(0.8))  # grow
    assert radius_scale(2.0, -0.9, -1.0, 2.0)[0] == 2.0  # at most the largest
    assert radius_scale(1.0, -0.5, -1.0, 4.0)[0] == 1.0  # between: keep
    assert radius_scale(1.0, -0.1, -1.0, 4.0)[0] == 0.5  # far smaller than predicted: shrink
    assert radius_scale(1.0, 0.2, -1.0, 4.0)[0] == 0.5  # Q rose: shrink
    assert radius_scale(1.0, -0.2, 0.1, 4.0) == (0.5, None)  # no fall predicted


# ---------------------------------------------------------------- the surrogate


def test_surrogate_finds_a_known_quadratics_minimiser_from_noisy_derivatives():
    """Q(x) = 1 + b.d + 1/2 d'Ad in 3 log-volumes (10 coefficients), its minimiser d* inside
    the radius. Twelve values measured to 1e-4 and one gradient with noise of sd 0.05 (an
    influence step's): each equation is weighted by its error, so the values pin the quadratic
    and the noisy gradient moves the fit by about 1e-4 / 0.05 of its noise; the minimiser is
    then found to the search's resolution (the last box is 1/16 of the radius, 4096 points in
    3 dimensions: about 0.005), within 0.01."""
    rng = np.random.default_rng(0)
    a = np.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])
    d_star = np.array([0.2, -0.15, 0.1])
    b = -a @ d_star

    def q(d):
        return 1.0 + b @ d + 0.5 * d @ a @ d

    x0 = np.log([100.0, 200.0, 150.0])
    points = [x0 + rng.uniform(-0.3, 0.3, 3) for _ in range(12)]
    values = [q(p - x0) + rng.normal(0, 1e-4) for p in points]
    gradient = b + rng.normal(0, 0.05, 3)
    model = fit_quadratic(x0, points, values, [1e-4] * 12, [x0], [gradient], [[0.05] * 3],
                          curvature_scale=10.0)  # fmt: skip
    found = minimise(model, 0.5, keep_total=False, seed=1) - x0
    np.testing.assert_allclose(found, d_star, atol=0.01)
    # a minimiser outside the radius is brought to its edge
    edge = minimise(model, 0.1, keep_total=False, seed=1) - x0
    assert np.all(edge <= np.log1p(0.1) + 1e-9) and np.all(edge >= np.log1p(-0.1) - 1e-9)
    assert edge[0] == pytest.approx(np.log1p(0.1), abs=0.01)  # pushed toward +0.2


def test_surrogate_weighs_each_derivative_by_its_error():
    """One value and two gradients at x0 that disagree: the precise one (error 0.01) is the
    fitted slope, the vague one (error 100) barely counts."""
    x0 = np.log([50.0, 80.0])
    model = fit_quadratic(x0, [x0], [2.0], [0.01], [x0, x0], [[-1.0, 0.5], [3.0, -2.0]],
                          [[0.01, 0.01], [100.0, 100.0]])  # fmt: skip
    np.testing.assert_allclose(model.gradient(x0), [-1.0, 0.5], atol=1e-3)


def test_surrogate_keeps_the_total():
    x0 = np.log([100.0, 100.0])
    model = fit_quadratic(x0, [x0], [1.0], [0.01], [x0], [[-1.0, 1.0]], [[0.01, 0.01]])
    x = minimise(model, 0.5, keep_total=True)
    assert np.exp(x).sum() == pytest.approx(200.0)
    assert np.exp(x)[0] > 100 > np.exp(x)[1]  # more of the domain whose growth lowers Q


# ---------------------------------------------------------------- the loop


def step_config() -> dict:
    """test_loop's tiny suite, one round, updated by two candidate steps. min_z 0: a toy this
    small has no sensitivity beyond 2 standard errors, and these tests check the candidates'
    machinery, not the noise."""
    import yaml

    from tests.test_loop import TINY

    base = yaml.safe_load(TINY)
    base.update(rounds=1, update={"candidates": [0.2, 0.6], "min_z": 0.0},
                eval={"max_new_tokens": 4, "accuracy_rounds": "returned"})  # fmt: skip
    base["train"]["max_steps"] = 20
    return base


@pytest.fixture(scope="module")
def stepped(tmp_path_factory):
    config = load_config(None, base=step_config())
    run = tmp_path_factory.mktemp("step") / "run"
    summary = run_loop(config, run)
    return config, run, summary


def test_candidates_are_trained_and_chosen_on_held_out_rows(stepped):
    config, run, summary = stepped
    split = json.loads((run / "reference-split" / "split.json").read_text())
    assert {c: len(v) for c, v in split["selection"].items()} == {"add": 4, "reverse": 4}
    direction = run / "reference-split" / "direction"
    assert all(
        len((direction / c / "data.jsonl").read_text().splitlines()) == 4
        for c in split["selection"]
    )
    influence = json.loads((run / "round-0" / "influence.json").read_text())
    assert influence["reference_rows"].startswith("direction rows")
    assert set(influence["direction"]["add"]) == {"sensitivity", "stderr", "z", "used"}
    candidates = sorted(p.name for p in (run / "step-1").iterdir() if p.is_dir())
    assert candidates == ["m0.200", "m0.600"]
    update = json.loads((run / "round-1" / "mixture.json").read_text())["update"]
    table = {row["name"]: row for row in update["candidates"]}
    assert set(table) == {"base", *candidates}  # the base round is a candidate of step 0
    assert table["base"]["step"] == 0.0 and not table["base"]["chosen"]
    choice = json.loads((run / "step-1" / "choice.json").read_text())
    assert choice["kept"] == update["candidate"] and choice["from_round"] == 0

    def held_out(name):  # Q on the selection rows, from the candidate's own metrics
        directory = run / "round-1" if name == update["candidate"] else run / "step-1" / name
        directory = run / "round-0" if name == "base" else directory
        metrics = json.loads((directory / "metrics.json").read_text())
        rows = metrics["capabilities"]
        return np.mean([np.mean([rows[c]["reference_row_losses"][i] for i in idx])
                        for c, idx in split["selection"].items()])  # fmt: skip

    for name, row in table.items():
        assert row["selection_loss"] == pytest.approx(held_out(name))
    assert table[update["candidate"]]["chosen"]
    assert sum(r["chosen"] for r in table.values()) == 1
    assert update["from_round"] == 0 and update["scale"] == 1.0 and "scale_next" in update
    # the kept candidate's model moved into its round: each trained model counted once
    assert (run / "round-1" / "model").is_dir()
    assert not (run / "step-1" / update["candidate"] / "model").exists()
    assert summary.compute.trainings == 1 + len(candidates) == planned_trainings(config)
    assert summary.rounds[1].seconds["candidates"] > 0


def test_only_the_returned_round_is_decoded(stepped):
    _, run, summary = stepped
    chosen = summary.selected_round
    for k, r in enumerate(summary.rounds):
        metrics = json.loads((run / f"round-{k}" / "metrics.json").read_text())
        assert metrics["decoded"] == (k == chosen)
        assert (r.test_accuracy_mean is not None) == (k == chosen)
        assert r.test_loss_mean is not None  # every round has its held-out loss


def test_no_step_when_nothing_survives_the_noise(tmp_path):

    base = step_config()
    base["update"] = {"candidates": [0.2, 0.6], "min_z": 1e6}  # every sensitivity is noise
    summary = run_loop(load_config(None, base=base), tmp_path / "run")
    assert [r.round for r in summary.rounds] == [0]
    assert not list((tmp_path / "run" / "step-1").glob("*/model"))  # written, never trained
    assert summary.compute.trainings == 1
    # with update.rescore, every copy is scored too, and its noise holds the step as well
    base["influence"] = {**base.get("influence", {}), "max_examples": 4}
    base["update"]["rescore"] = True
    summary = run_loop(load_config(None, base=base), tmp_path / "rescored")
    assert [r.round for r in summary.rounds] == [0] and summary.compute.trainings == 1
    influence = json.loads((tmp_path / "rescored/round-0/influence.json").read_text())
    assert influence["rescored"]["max_examples"] == 4 and influence["max_examples"] is None
    choice = json.loads((tmp_path / "rescored/step-1/choice.json").read_text())
    assert choice["reason"].endswith("(every copy scored: update.rescore)")


def test_moves_nothing_says_when_the_noise_holds_every_sensitivity():
    noisy = {"sensitivity": {"a": 3.0, "b": -1.0}, "sensitivity_stderr": {"a": 2.0, "b": 1.0}}
    assert moves_nothing(noisy, UpdateSettings())  # z 1.5 and 1: within 2 standard errors
    assert not moves_nothing(noisy, UpdateSettings(min_z=1.2))  # a passes
    assert not moves_nothing(noisy, UpdateSettings(min_z=0.0))  # the paper: every entry whole
    assert not moves_nothing(SIGNALS, UpdateSettings())  # check at z 6.4


def test_rescore_only_where_the_cap_held_a_sample_back():
    from ideal.run.influence_round import needs_rescore

    config = load_config(None, base=step_config())  # update.rescore on by default
    config = replace(config, update=replace(config.update, min_z=2.0))
    cap = config.influence.max_examples
    held = {"sensitivity": {"a": 1.0, "b": -1.0}, "sensitivity_stderr": {"a": 1.0, "b": 1.0},
            "sampled_examples": {"a": cap, "b": 3}}  # fmt: skip
    assert needs_rescore(config, held)
    assert not needs_rescore(config, {**held, "sampled_examples": {"a": cap - 1, "b": 3}})
    assert not needs_rescore(config, {**held, "rescored": {}})  # once
    strong = {**held, "sensitivity": {"a": 9.0, "b": -1.0}}
    assert not needs_rescore(config, strong)  # a moves: nothing to rescore
    off = replace(config, update=replace(config.update, rescore=False))
    assert not needs_rescore(off, held)


def _noisy_when_capped(monkeypatch, calls, die_on_second=False):
    """compute_influence as it is, except that a capped sample (influence.max_examples) reports
    standard errors 1e12 times its size: the noise holds every sensitivity there, and every
    copy's score (max_examples None) is as computed."""
    import ideal.influence.step as step

    real = step.compute_influence

    def compute(model_dir, train, reference, job, *args, **kwargs):
        calls.append(job.config.max_examples)
        if die_on_second and len(calls) == 2:
            raise KeyboardInterrupt  # killed between the two passes
        result, document = real(model_dir, train, reference, job, *args, **kwargs)
        if job.config.max_examples is not None:
            document["sensitivity_stderr"] = {
                d: 1e12 * (abs(v) + 1.0) for d, v in document["sensitivity"].items()
            }
        return result, document

    monkeypatch.setattr(step, "compute_influence", compute)


def rescore_config(rescore=True) -> dict:
    base = step_config()
    base["influence"] = {**base.get("influence", {}), "max_examples": 4}
    base["update"] = {"candidates": [0.2, 0.6], "min_z": 1e-9, "rescore": rescore}
    return base


def test_a_sample_that_moves_nothing_is_scored_again_on_every_copy(tmp_path, monkeypatch):
    from rich.console import Console

    from ideal.report.console import step_table

    calls = []
    _noisy_when_capped(monkeypatch, calls)
    run = tmp_path / "run"
    summary = run_loop(load_config(None, base=rescore_config()), run)
    assert calls == [4, None]  # the capped sample, then every copy
    influence = json.loads((run / "round-0" / "influence.json").read_text())
    first = influence["rescored"]
    assert first["max_examples"] == 4 and max(first["sampled_examples"].values()) == 4
    assert influence["max_examples"] is None
    assert min(influence["sampled_examples"].values()) > 4  # every copy of each domain's sample
    assert influence["seconds"]["total"] > first["seconds"]  # the run paid for both passes
    assert any(row["used"] != 0.0 for row in influence["direction"].values())
    # the candidates step along every copy's direction, and the round says so
    assert len(list((run / "step-1").glob("*/metrics.json"))) >= 1
    assert summary.rounds[1].rescored_from == 4
    update = json.loads((run / "round-1" / "mixture.json").read_text())["update"]
    assert update["rescored"]["from_max_examples"] == 4
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(step_table(summary.rounds[1]))
    assert "every copy scored: at 4 a domain" in " ".join(console.export_text().split())

    # killed between the two passes, a run rescores when resumed and ends where this one did
    monkeypatch.undo()
    again, calls = tmp_path / "again", []
    _noisy_when_capped(monkeypatch, calls, die_on_second=True)
    with pytest.raises(KeyboardInterrupt):
        run_loop(load_config(None, base=rescore_config()), again)
    assert "rescored" not in json.loads((again / "round-0" / "influence.json").read_text())
    monkeypatch.undo()
    calls = []
    _noisy_when_capped(monkeypatch, calls)
    resumed = run_loop(load_config(None, base=rescore_config()), again, resume=True)
    assert calls == [None]
    assert [r.volumes for r in resumed.rounds] == [r.volumes for r in summary.rounds]


def test_without_rescore_the_noisy_sample_stops_the_run(tmp_path, monkeypatch):
    calls = []
    _noisy_when_capped(monkeypatch, calls)
    summary = run_loop(load_config(None, base=rescore_config(rescore=False)), tmp_path / "run")
    assert calls == [4] and [r.round for r in summary.rounds] == [0]
    assert "rescored" not in json.loads((tmp_path / "run/round-0/influence.json").read_text())
    assert summary.compute.trainings == 1


def test_a_run_resumes_in_the_middle_of_its_candidates(stepped, tmp_path, monkeypatch):
    """Killed after the first candidate trained, the run trains only the second when resumed,
    and ends where the uninterrupted run ended."""
    import ideal.run.stages as stages

    config, whole, summary = stepped
    real = stages.train_round
    calls = []

    def dying(config, paths, round_, here=None, data=None):
        if here is not None and here.parent.name == "step-1" and calls:
            raise KeyboardInterrupt  # the second candidate: the process is killed
        real(config, paths, round_, here, data)
        calls.append(here)

    monkeypatch.setattr(stages, "train_round", dying)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run_loop(config, run)
    first = run / "step-1" / "m0.200" / "model"
    assert first.is_dir() and not (run / "step-1" / "m0.600" / "model").exists()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    monkeypatch.setattr(stages, "train_round", real)
    trained = []
    monkeypatch.setattr(
        stages, "train_round", lambda *a, **k: (trained.append(k.get("here")), real(*a, **k))
    )
    resumed = run_loop(config, run, resume=True)
    assert [p.name for p in trained] == ["m0.600"]
    kept = json.loads((run / "round-1" / "mixture.json").read_text())["update"]["candidate"]
    if kept != "m0.200":
        assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert resumed.selected_round == summary.selected_round
    assert [r.volumes for r in resumed.rounds] == [r.volumes for r in summary.rounds]
    assert resumed.rounds[-1].reference_loss_mean == summary.rounds[-1].reference_loss_mean


def test_update_settings_refuse_steps_outside_the_unit_interval():
    for bad in ({"step": 1.0}, {"max_step": 1.5}, {"candidates": (0.2, 1.0)},
                {"candidates": (0.2, 0.2)}, {"selection": 1.0}, {"min_z": -1.0}):  # fmt: skip
        with pytest.raises(IdealError, match="update."):
            replace(UpdateSettings(), **bad)


def test_the_rule_reads_its_settings_from_one_place():
    """IdealRule holds UpdateSettings, not copies of its fields (one home per setting)."""
    rule = IdealRule(UpdateSettings(min_z=3.0, geometry="additive"))
    assert rule.update.min_z == 3.0 and rule.m == UpdateSettings().step
    assert not hasattr(rule, "min_z") and not hasattr(rule, "keep_total")


def test_planned_trainings():
    config = load_config(None, base={"suite": {}, "rounds": 2})
    assert planned_trainings(config) == 1 + 1 + 3  # D0, the probe, three candidates
    single = replace(config, update=replace(config.update, candidates=()))
    assert planned_trainings(single) == 3
    surrogate = replace(config, update=replace(config.update, surrogate=True), rounds=3)
    assert planned_trainings(surrogate) == 1 + 1 + 2 * 4
    assert planned_trainings(replace(config, rounds=0)) == 1
    # D0 already uniform: no probe, so both rounds are updates of three candidates each
    assert planned_trainings(config, {"a": 100, "b": 100}) == 1 + 2 * 3
    assert planned_trainings(config, {"a": 100, "b": 300}) == 1 + 1 + 3


def test_a_rounds_evaluation_runs_on_the_gpu_when_there_is_one(stepped, monkeypatch):
    """`ideal run` evaluates each round on the device `ideal eval` uses (here: a GPU stood in
    by torch.cuda.is_available, the model's move recorded and left on the CPU)."""
    import torch

    import ideal.hf as hf
    from ideal.run.rundir import prepare_run
    from ideal.run.stages import evaluate_round

    config, run, _ = stepped
    moved = []
    load = hf.load_causal_lm

    def loading(*args, **kwargs):
        model = load(*args, **kwargs)
        model.to = lambda device, *a, **k: moved.append(str(device)) or model
        return model

    monkeypatch.setattr(hf, "load_causal_lm", loading)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    paths = prepare_run(config, run, resume=True)
    evaluate_round(config, paths, run / "round-0" / "model", 0, decode=False)
    assert moved == ["cuda"]


def test_a_proxy_run_trains_only_the_top_blocks(stepped, monkeypatch):
    """DoReMi / DoGE's proxy trains what the rounds train: with train.top_layers (full
    fine-tuning) only the top blocks' parameters move."""
    import ideal.methods.proxy as proxy
    from ideal.run.rundir import prepare_run
    from ideal.run.stages import proxy_round

    config, run, _ = stepped
    seen = {}

    class Stop(Exception):
        pass

    def capture(model, *args, **kwargs):
        seen.update({n: p.requires_grad for n, p in model.named_parameters()})
        raise Stop

    monkeypatch.setattr(proxy, "learn_domain_weights", capture)
    top = replace(config, train=replace(config.train, top_layers=1),
                  update=replace(config.update, rule="doge", candidates=()))  # fmt: skip
    paths = prepare_run(config, run, resume=True)
    with pytest.raises(Stop):
        proxy_round(top, paths, run / "round-0", run / "round-0" / "model")
    trained = {n for n, grad in seen.items() if grad}
    assert trained and all(n.startswith("model.layers.0.") for n in trained)  # 1 block: the top
    assert not seen["model.embed_tokens.weight"] and not seen["lm_head.weight"]


def test_a_reference_set_too_small_to_split_is_compared_on_every_row():
    from ideal.run.step import _row_losses

    rows = split_rows({"big": 6, "one": 1}, 0.5, seed=0)
    assert rows["one"] == [] and len(rows["big"]) == 3
    metrics = {"capabilities": {
        "big": {"reference_row_losses": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]},
        "one": {"reference_row_losses": [7.0]},
    }}  # fmt: skip
    held = _row_losses(metrics, rows)
    assert held["one"] == [7.0] and held["big"] == [float(i) for i in rows["big"]]


def test_the_surrogate_proposes_one_more_candidate_in_a_run(tmp_path):

    base = step_config()
    base["update"] = {"candidates": [0.2], "min_z": 0.0, "surrogate": True}
    config = load_config(None, base=base)
    summary = run_loop(config, tmp_path / "run")
    proposal = json.loads((tmp_path / "run" / "step-1" / "surrogate" / "mixture.json").read_text())
    record = proposal["update"]
    assert record["rule"] == "surrogate" and record["step"] is None
    assert record["surrogate"]["observations"] == {"values": 1, "gradients": 1}
    assert max(abs(b) for b in record["beta"].values()) <= 0.2 + 1e-9  # inside the radius
    names = {row["name"] for row in summary.rounds[1].candidates} - {"base"}
    assert names <= {"m0.200", "surrogate"} and "m0.200" in names
    assert summary.compute.trainings == 1 + len(names) <= planned_trainings(config)


def test_the_feature_caches_fill_is_an_item_of_its_own(tmp_path):
    """Training's seconds never held the fill, evaluation's and influence's did: the summary
    takes it out of each and counts it once, as `fill`; a run that finds the rows cached pays
    none."""

    base = step_config()
    base["rounds"] = 0
    base["train"].update(top_layers=1, lora=True, lora_r=2)
    config = load_config(None, base=base)
    shared = tmp_path / "features"
    first = run_loop(config, tmp_path / "a", features=shared)
    here = tmp_path / "a" / "round-0"
    trained = json.loads((here / "model" / "train_settings.json").read_text())
    metrics = json.loads((here / "metrics.json").read_text())
    assert trained["fill_seconds"] > 0 and metrics["fill_seconds"] > 0
    seconds = first.rounds[0].seconds
    assert seconds["fill"] == pytest.approx(trained["fill_seconds"] + metrics["fill_seconds"])
    assert seconds["eval"] == pytest.approx(metrics["seconds"] - metrics["fill_seconds"])
    assert seconds["train"] == trained["seconds"]
    assert first.compute.total == pytest.approx(sum(v or 0.0 for v in seconds.values()))
    again = run_loop(config, tmp_path / "b", features=shared)
    assert "fill" not in again.rounds[0].seconds  # every row was in the shared cache


def test_a_second_process_cannot_run_the_same_directory(stepped):
    """While one process holds a run directory, another stops at once with one line."""
    import subprocess
    import sys

    config, run, _ = stepped
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(run / ".lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(IdealError, match="another process is running this run directory"):
            run_loop(config, run, resume=True)
    finally:
        holder.kill()
        holder.wait()
    assert run_loop(config, run, resume=True).selected_round is not None  # free again


def test_an_update_whose_candidates_do_not_beat_the_base_keeps_it(tmp_path, monkeypatch):
    """The base round is a candidate of step 0: candidates whose held-out loss is not below it
    (here made worse) leave no new round; the run says why, returns the base and counts the
    candidates it trained."""
    import ideal.run.stages as stages

    real = stages.evaluate_round

    def worse(config, paths, model_dir, round_=None, decode=None):
        metrics = real(config, paths, model_dir, round_, decode)
        if model_dir.parent.parent.name.startswith("step-"):  # a candidate: 0.5 worse per row
            for entry in metrics["capabilities"].values():
                entry["reference_row_losses"] = [x + 0.5 for x in entry["reference_row_losses"]]
        return metrics

    monkeypatch.setattr(stages, "evaluate_round", worse)
    run = tmp_path / "run"
    summary = run_loop(load_config(None, base=step_config()), run)
    assert [r.round for r in summary.rounds] == [0] and summary.selected_round == 0
    choice = json.loads((run / "step-1" / "choice.json").read_text())
    assert choice["kept"] is None and [r["chosen"] for r in choice["candidates"]][0]
    assert "no candidate's held-out reference loss was below round 0's" in summary.stopped
    assert summary.compute.trainings == 3  # D0 and the two candidates, all paid for
    assert summary.rounds[0].seconds["candidates"] > 0
