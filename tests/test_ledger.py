"""The results ledger: cells appended as they finish, skipped when their inputs are unchanged,
a campaign that can be stopped and started again, workers one per core, tables rendered from it."""

from __future__ import annotations

import json
import threading
from dataclasses import replace

import pytest
import yaml

from ideal.errors import IdealError
from ideal.run.campaign import ledger_document, run_campaign
from ideal.run.compare import parse_seeds
from ideal.run.config import load_config
from ideal.run.ledger import (
    Cell,
    append_cell,
    cell_key,
    components,
    read_ledger,
    settings_without_paths,
    tree_hash,
)

TINY = """
suite:
  domains:
    - {name: add, task: add, pool: 40, volume: 30}
    - {name: reverse, task: reverse, pool: 40, volume: 10}
  capabilities: [add, reverse]
  reference_size: 6
  test_size: 6
  hidden_size: 16
  num_layers: 1
  num_heads: 2
  intermediate_size: 32
rounds: 1
train: {max_steps: 10, lr: 0.003, batch_size: 8, threads: 1}
influence: {batch_size: 16}
update: {candidates: [0.3], min_z: 0.0}
eval: {max_new_tokens: 4}
"""


def cell(key: str, method: str = "uniform", seed: int = 0, **run) -> Cell:
    return Cell(key, "c", "tiny", method, seed, {"data": "d"}, {"seed": seed, **run})


def test_append_and_read_back(tmp_path):
    ledger = tmp_path / "docs" / "ledger.jsonl"
    assert read_ledger(ledger) == []
    append_cell(ledger, cell("k1"))
    append_cell(ledger, cell("k2", seed=1))
    cells = read_ledger(ledger)
    assert [c.key for c in cells] == ["k1", "k2"] and cells[1].run == {"seed": 1}
    assert all(line.count("\n") == 0 for line in ledger.read_text().splitlines())


def test_concurrent_appends_keep_whole_lines(tmp_path):
    ledger = tmp_path / "ledger.jsonl"

    def write(n):
        for k in range(20):
            append_cell(ledger, cell(f"{n}-{k}", blob="x" * 5000))

    threads = [threading.Thread(target=write, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(read_ledger(ledger)) == 80


def test_a_line_cut_by_a_crash_is_skipped_and_a_bad_line_is_named(tmp_path, caplog):
    ledger = tmp_path / "ledger.jsonl"
    append_cell(ledger, cell("k1"))
    with open(ledger, "a") as handle:
        handle.write('{"format": "ideal-ledger/1", "key": "k2", "run": {"se')  # killed mid-write
    assert [c.key for c in read_ledger(ledger)] == ["k1"]
    assert "unfinished line" in caplog.text
    append_cell(ledger, cell("k3"))  # the next append starts a line of its own
    assert [c.key for c in read_ledger(ledger)] == ["k1", "k3"]
    ledger.write_text("not json\n" + ledger.read_text())
    with pytest.raises(IdealError, match=r"ledger.jsonl:1: invalid JSON"):
        read_ledger(ledger)
    ledger.write_text('{"format": "other"}\n')
    with pytest.raises(IdealError, match=r"ledger.jsonl:1: not a ledger line"):
        read_ledger(ledger)


def test_the_key_ignores_paths_and_follows_content(tmp_path):
    config = load_config(None, base=yaml.safe_load(TINY))
    moved = settings_without_paths({**config.to_dict(), "model": "/elsewhere"})
    assert moved == settings_without_paths(config.to_dict())
    inputs = {"data": "d", "code": {"train": "t"}}
    key = cell_key("ideal", 0, moved, inputs)
    assert key == cell_key("ideal", 0, moved, dict(inputs))
    assert key != cell_key("ideal", 1, moved, inputs)
    assert key != cell_key("ideal", 0, moved, {"data": "d", "code": {"train": "u"}})
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jsonl").write_text("1\n")
    first = tree_hash([tmp_path / "a", None])
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jsonl").write_text("1\n")
    assert tree_hash([tmp_path / "b", None]) == first  # where it lies does not count
    (tmp_path / "b" / "x.jsonl").write_text("2\n")
    assert tree_hash([tmp_path / "b", None]) != first


def test_a_setting_added_since_the_cells_keeps_their_keys_where_it_changes_nothing():
    from ideal.run.compare import method_config

    config = load_config(None, base={**yaml.safe_load(TINY), "rounds": 2})  # the probe, a step

    def without(tree):
        return {**tree, "update": {k: v for k, v in tree["update"].items() if k != "rescore"}}

    for method in ("original", "uniform", "random"):  # rules that never read update.rescore
        tree = method_config(config, method, 0).to_dict()
        assert tree["update"]["rescore"] is True  # the default
        assert settings_without_paths(tree) == settings_without_paths(without(tree))
    tree = method_config(config, "ideal", 0).to_dict()
    assert settings_without_paths(tree)["update"]["rescore"] is True  # ideal's cells: new keys
    off = {**tree, "update": {**tree["update"], "rescore": False}}  # the behaviour from before
    assert settings_without_paths(off) == settings_without_paths(without(tree))
    one = method_config(replace(config, rounds=1), "ideal", 0).to_dict()  # a step, no probe
    assert settings_without_paths(one)["update"]["rescore"] is True


def test_components_per_method():
    assert components("original") == ("suite", "train", "eval", "loop", "scorers", "rule:original")
    assert "influence" in components("ideal") and "influence" in components("first-order")
    assert "influence" in components("ideal-search") and "influence" not in components("random")


def test_seeds_as_count_list_and_range():
    assert parse_seeds("3") == [0, 1, 2]
    assert parse_seeds("5,6") == [5, 6] and parse_seeds("5-7") == [5, 6, 7]
    assert parse_seeds("0-1,7,1") == [0, 1, 7]
    for bad in ("0", "a", "5-3", "1-", ","):
        with pytest.raises(IdealError):
            parse_seeds(bad)


def test_compare_refuses_a_seed_override(capsys, tmp_path):
    from tests.helpers import run_cli

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)
    result = run_cli(capsys, "compare", str(config), "seed=5", "--seeds", "1")
    assert result.code == 2 and "--seeds" in result.err and "seed=" in result.err


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    root = tmp_path_factory.mktemp("campaign")
    config = load_config(None, base=yaml.safe_load(TINY))
    ledger = root / "ledger.jsonl"
    document = run_campaign(config, ["original", "uniform"], [0, 1], root / "out", ledger,
                            "tiny-c", "tiny")  # fmt: skip
    return config, root, ledger, document


def test_a_campaign_appends_every_cell_with_what_it_measured(campaign):
    _, _, ledger, document = campaign
    cells = read_ledger(ledger)
    assert [(c.method, c.seed) for c in cells] == [
        ("original", 0), ("original", 1), ("uniform", 0), ("uniform", 1),
    ]  # fmt: skip
    first = cells[0]
    assert first.campaign == "tiny-c" and first.suite == "tiny" and first.commit
    assert {"cpu", "cores", "threads", "torch", "device"} <= set(first.machine)
    selected = first.run["selected"]
    assert set(selected["test_accuracy"]) == {"add", "reverse"} == set(selected["test_loss"])
    assert selected["test_loss_worst"] == max(selected["test_loss"].values())
    assert first.run["trainings"] == 1 and cells[2].run["trainings"] == 2
    assert set(selected["seconds"]) >= {"train", "eval"} and selected["volumes"]
    assert set(cells[2].run["stages"]) >= {"train", "eval"}  # the whole run's, by stage
    assert sum(cells[2].run["stages"].values()) == pytest.approx(cells[2].run["seconds"])
    assert sum(cells[2].run["returned_shares"].values()) == pytest.approx(1.0)
    assert document["methods"]["uniform"]["trainings"]["mean"] == 2
    paired = document["paired"]["original"]["uniform"]
    assert set(paired) >= {"test_accuracy_mean", "test_loss_mean", "test_loss_worst"}
    assert set(paired["per_capability"]["add"]) == {"test_accuracy", "test_loss"}


def test_a_campaign_started_again_runs_nothing_held(campaign, monkeypatch):
    import ideal.run.compare as compare

    config, root, ledger, document = campaign
    monkeypatch.setattr(compare, "_run_cell", lambda *a, **k: pytest.fail("a held cell ran"))
    again = run_campaign(config, ["original", "uniform"], [0, 1], root / "out", ledger,
                         "tiny-c", "tiny")  # fmt: skip
    assert len(read_ledger(ledger)) == 4
    assert again["paired"] == document["paired"]


def test_changed_settings_or_code_make_new_cells(campaign, monkeypatch, tmp_path):
    import ideal.run.compare as compare

    config, root, held, _ = campaign
    ledger = tmp_path / "ledger.jsonl"  # a copy: the cells this test makes up stay in it
    ledger.write_text(held.read_text())
    ran = []
    monkeypatch.setattr(
        compare,
        "_run_cell",
        lambda c, ck, m, s, *a: (
            ran.append((m, s))
            or {"seed": s, "selected": {}, "seconds": 0.0, "trainings": 1, "sft_seconds": 1.0}
        ),
    )
    monkeypatch.setattr(compare, "compare_document", lambda *a, **k: {})
    changed = replace(config, train=replace(config.train, lr=0.004))
    run_campaign(changed, ["original"], [0], root / "out2", ledger, "tiny-c", "tiny", report=False)
    assert ran == [("original", 0)]
    import ideal.run.fingerprint as fingerprint

    real = fingerprint.code_fingerprint
    monkeypatch.setattr(fingerprint, "code_fingerprint",
                        lambda methods: {**real(methods), "rule:uniform": "changed"})  # fmt: skip
    run_campaign(config, ["original", "uniform"], [0], root / "out3", ledger, "tiny-c", "tiny",
                 report=False)  # fmt: skip
    assert ran[1:] == [("uniform", 0)]  # only the method whose rule changed


def test_ledger_tables_render_and_replace_their_block(campaign, capsys, tmp_path):
    from tests.helpers import run_cli

    _, _, ledger, document = campaign
    rebuilt = ledger_document(ledger, "tiny-c")
    assert (
        rebuilt["paired"]["original"]["uniform"]["test_accuracy_mean"]
        == (document["paired"]["original"]["uniform"]["test_accuracy_mean"])
    )
    shown = run_cli(capsys, "ledger", "tables", str(ledger))
    assert (
        shown.code == 0
        and "Campaign `tiny-c`" in shown.out
        and "Paired against `original`" in shown.out
    )
    results = tmp_path / "results.md"
    results.write_text(
        "# Results\n\n<!-- ledger:tiny-c -->\nold\n<!-- /ledger:tiny-c -->\n\nafter\n"
    )
    assert run_cli(capsys, "ledger", "tables", str(ledger), "--write", str(results)).code == 0
    text = results.read_text()
    assert "old" not in text and text.endswith("after\n") and "| uniform |" in text
    empty = tmp_path / "empty.md"  # a new block: its two lines, nothing between
    empty.write_text("x\n<!-- ledger:tiny-c -->\n<!-- /ledger:tiny-c -->\ny\n")
    assert run_cli(capsys, "ledger", "tables", str(ledger), "--write", str(empty)).code == 0
    filled = empty.read_text()
    assert filled.count("<!-- ledger:tiny-c -->") == 1 and "| uniform |" in filled
    assert filled.endswith("<!-- /ledger:tiny-c -->\ny\n")
    assert run_cli(capsys, "ledger", "tables", str(tmp_path / "none.jsonl")).code == 1


def test_a_variant_of_ideal_is_paired_against_ideal(campaign, capsys, tmp_path):
    """A campaign of ideal beside ideal-lowest (or -surrogate...) pairs the variant against ideal:
    the difference it is run for. Without a variant, ideal is nobody's baseline."""
    from ideal.run.compare import baselines
    from tests.helpers import run_cli

    _, _, held, _ = campaign
    names = {"original": "ideal", "uniform": "ideal-lowest"}
    ledger = tmp_path / "ledger.jsonl"
    for c in read_ledger(held):
        append_cell(ledger, replace(c, method=names[c.method]))
    document = ledger_document(ledger, "tiny-c")
    assert list(document["paired"]) == ["ideal"]
    ours = document["paired"]["ideal"]["ideal-lowest"]["test_loss_mean"]
    mine = [c.run["selected"]["test_loss_mean"] for c in read_ledger(ledger)]
    assert ours["per_seed"] == pytest.approx([mine[2] - mine[0], mine[3] - mine[1]])
    assert "Paired against `ideal`" in run_cli(capsys, "ledger", "tables", str(ledger)).out
    assert baselines(["uniform", "ideal", "ideal-search"]) == ["uniform", "ideal"]
    assert baselines(["original", "ideal", "first-order"]) == ["original"]
    assert baselines(["random", "ideal-lowest"]) == ["random"]


@pytest.mark.slow
def test_workers_share_out_the_seeds_and_a_stopped_campaign_resumes(campaign, tmp_path):
    """Two worker processes, one per seed; the parent's document equals an in-process one."""
    config, root, _, _ = campaign
    ledger = tmp_path / "ledger.jsonl"
    document = run_campaign(config, ["original"], [0, 1], tmp_path / "out", ledger, "w", "tiny",
                            jobs=2)  # fmt: skip
    cells = read_ledger(ledger)
    assert sorted((c.method, c.seed) for c in cells) == [("original", 0), ("original", 1)]
    assert (tmp_path / "out" / "logs" / "seed-1.log").is_file()
    assert json.loads((tmp_path / "out" / "inputs.json").read_text())["code"]
    assert document["methods"]["original"]["runs"][1]["seed"] == 1


def test_a_cell_of_another_campaign_is_reused_and_recorded_under_this_one(campaign, tmp_path):
    from ideal.run.ledger import Book

    _, _, held, _ = campaign
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(held.read_text())
    first = read_ledger(ledger)[0]
    book = Book(ledger, "other", "tiny", "d", {})
    found = book.lookup(first.key)
    assert found.campaign == "other" and found.reused_from == "tiny-c" and found.run == first.run
    assert book.lookup(first.key) == found  # recorded once
    assert [c.campaign for c in read_ledger(ledger)].count("other") == 1


def test_a_worker_refuses_code_other_than_its_campaigns(campaign, tmp_path):
    from ideal.run.campaign import open_book

    config, root, _, _ = campaign
    inputs = json.loads((root / "out" / "inputs.json").read_text())
    stale = tmp_path / "inputs.json"
    stale.write_text(json.dumps({**inputs, "source": "another"}))
    with pytest.raises(IdealError, match="the ideal package changed"):
        open_book(config, ["original"], tmp_path / "l.jsonl", "c", "tiny", tmp_path, stale)
    fresh = tmp_path / "fresh.json"
    fresh.write_text(json.dumps(inputs))
    book = open_book(config, ["original"], tmp_path / "l.jsonl", "c", "tiny", tmp_path, fresh)
    assert book.code == inputs["code"]


def test_a_cells_cost_is_in_units_of_its_own_sft(campaign, tmp_path):
    """Cells measured apart (another time, another load) are not put over another cell's D0:
    a cell measured twice as slow costs the same number of SFTs."""
    _, _, held, _ = campaign
    ledger = tmp_path / "ledger.jsonl"
    for c in read_ledger(held):
        slow = 2.0 if c.method == "uniform" else 1.0  # uniform's cells on a busier machine
        run = {**c.run, "seconds": c.run["seconds"] * slow}
        append_cell(ledger, replace(c, run={**run, "sft_seconds": c.run["sft_seconds"] * slow}))
    document = ledger_document(ledger, "tiny-c")
    for method, entry in document["methods"].items():
        for r in entry["runs"]:
            assert r["cost_in_sfts"] == pytest.approx(r["seconds"] / r["sft_seconds"]), method
    assert document["sft"]["of"].startswith("each cell's own")
    ratios = [c.run["seconds"] / c.run["sft_seconds"] for c in read_ledger(held)]
    costs = [r["cost_in_sfts"] for e in document["methods"].values() for r in e["runs"]]
    assert sorted(costs) == pytest.approx(sorted(ratios))  # unchanged by the slower machine


def test_the_tables_take_one_set_of_inputs_per_method(campaign, tmp_path):
    _, _, held, _ = campaign
    ledger = tmp_path / "ledger.jsonl"
    ledger.write_text(held.read_text())
    old = read_ledger(ledger)
    changed = replace(old[2], key="new", inputs={**old[2].inputs, "data": "other"},
                      run={**old[2].run, "selected": {**old[2].run["selected"],
                                                      "test_accuracy_mean": 0.99}})  # fmt: skip
    append_cell(ledger, changed)  # uniform seed 0 again, after a change of inputs
    document = ledger_document(ledger, "tiny-c")
    runs = document["methods"]["uniform"]["runs"]
    assert [r["selected"]["test_accuracy_mean"] for r in runs] == [0.99]  # not beside seed 1's
    assert document["stale_cells"] == 2 and document["cells"] == 3


def test_the_shared_round_zero_does_not_charge_another_runs_decoding(tmp_path):
    """original decodes D0 in place (eval.accuracy_rounds returned); a method that copies its
    round 0 gets the accuracies but not the decoding's seconds."""
    from ideal.run.cells import share_round_zero

    source, target = tmp_path / "original", tmp_path / "uniform"
    (source / "round-0" / "data").mkdir(parents=True)
    (source / "round-0" / "model").mkdir()
    (source / "round-0" / "mixture.json").write_text("{}")
    metrics = {"seconds": 30.0, "decode_seconds": 20.0, "decoded": True, "test_accuracy_mean": 0.5}
    (source / "round-0" / "metrics.json").write_text(json.dumps(metrics))
    target.mkdir()
    share_round_zero(source, target)
    copied = json.loads((target / "round-0" / "metrics.json").read_text())
    assert copied["seconds"] == 10.0 and "decode_seconds" not in copied
    assert copied["decoded"] and copied["test_accuracy_mean"] == 0.5


@pytest.mark.slow
def test_the_fingerprint_holds_and_sees_what_changes_a_number(monkeypatch):
    """Computed twice it is the same; a changed scorer or a changed resampling moves its own
    component and leaves training's as it was; a changed rule moves only that method's."""
    import ideal.backends.evaluation.evaluate as evaluate
    import ideal.data.mixture as mixture
    from ideal.run.fingerprint import code_fingerprint

    methods = ["uniform", "ideal"]
    first = code_fingerprint(methods)
    assert set(first) == {"suite", "train", "eval", "loop", "scorers", "influence",
                          "rule:uniform", "rule:ideal"}  # fmt: skip
    assert code_fingerprint(methods) == first
    monkeypatch.setitem(evaluate.SCORERS, "number", lambda output, answer: True)
    scored = code_fingerprint(methods)
    assert scored["scorers"] != first["scorers"] and scored["train"] == first["train"]
    monkeypatch.undo()
    real = mixture.resample_mixture

    def other(current, volumes, max_repeats, seed, *a, **k):
        return real(current, volumes, max_repeats, seed + 1, *a, **k)  # another draw

    monkeypatch.setattr(mixture, "resample_mixture", other)
    import ideal.methods.reweight as reweight

    monkeypatch.setattr(reweight, "resample_mixture", other)
    resampled = code_fingerprint(methods)
    assert resampled["loop"] != first["loop"] and resampled["train"] == first["train"]
    assert resampled["rule:ideal"] == first["rule:ideal"]
