"""The embedded suite and run configs: generation, disjoint splits, YAML + overrides, errors."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path

import pytest

from ideal.data.suite import DomainSpec, SuiteConfig, generate_suite
from ideal.errors import IdealError
from ideal.run.config import RunConfig, load_config


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_suite_generates_tasks_with_correct_answers_and_disjoint_splits(tmp_path):
    config = SuiteConfig(
        domains=(
            DomainSpec("add", "add", pool=50, volume=10),
            DomainSpec("rev_alt", "reverse", pool=30, volume=5, conflict=True),
        ),
        capabilities=("add", "reverse"),
        reference_size=8,
        test_size=12,
        hidden_size=16,
        intermediate_size=32,
    )
    out = generate_suite(config, tmp_path / "suite")
    add = rows(out / "train" / "add" / "data.jsonl")
    assert len(add) == 50
    for row in add:
        a, b = row["prompt"].rstrip("=").split("+")
        assert row["answer"] == row["completion"] == str(int(a) + int(b))
    for row in rows(out / "train" / "rev_alt" / "data.jsonl"):  # conflicting: the input, unreversed
        assert row["answer"] == row["prompt"].split(": ", 1)[1]
    for row in rows(out / "test" / "reverse" / "data.jsonl"):
        assert row["answer"] == row["prompt"].split(": ", 1)[1][::-1]
    train_prompts = {r["prompt"] for r in add}
    reference = {r["prompt"] for r in rows(out / "reference" / "add" / "data.jsonl")}
    test = {r["prompt"] for r in rows(out / "test" / "add" / "data.jsonl")}
    assert len(reference) == 8 and len(test) == 12
    assert not (train_prompts & reference) and not (train_prompts & test) and not (reference & test)
    assert (out / "base" / "model.safetensors").is_file() and (
        out / "base" / "tokenizer.json"
    ).is_file()
    again = generate_suite(config, tmp_path / "again")
    assert (again / "test" / "add" / "data.jsonl").read_text() == (
        out / "test" / "add" / "data.jsonl"
    ).read_text()


def test_shipped_configs_load():
    for name in ("demo.yaml", "demo-quick.yaml"):
        config = load_config(Path(str(files("ideal") / "configs" / name)))
        assert isinstance(config, RunConfig) and config.suite is not None
        assert any(d.conflict for d in config.suite.domains)


def test_overrides_and_hash(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("suite: {capabilities: [add]}\nrounds: 1\n")
    config = load_config(
        path, ["rounds=3", "update.step=0.3", "train.lr=1e-3", "influence.layers=*.mlp.*"]
    )
    assert config.rounds == 3 and config.update.step == 0.3 and config.train.lr == 1e-3
    assert config.influence.layers == ("*.mlp.*",)
    assert (
        config.hash()
        == load_config(
            path, ["rounds=3", "update.step=0.3", "train.lr=1e-3", "influence.layers=*.mlp.*"]
        ).hash()
    )
    assert config.hash() != load_config(path).hash()


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("suite: {}\nroundz: 2\n", [], "unknown key 'roundz'"),
        ("suite: {}\ntrain: {lrr: 1}\n", [], "train: unknown key 'lrr'"),
        ("suite: {}\nrounds: two\n", [], "rounds: expected int"),
        ("suite: {domains: [{name: a, task: juggle}]}\n", [], "unknown task 'juggle'"),
        ("rounds: 1\n", [], "give either 'suite'"),
        ("suite: {}\n", ["rounds"], "expected key=value"),
        ("suite: [unclosed\n", [], "invalid YAML"),
        ("suite: {}\n", ["update.geometry=log"], "update.geometry must be one of"),
        (
            "suite: {}\n",
            ["update.geometry=additive", "update.size_factor=false"],
            "needs update.size_factor: true",
        ),
    ],
)
def test_config_errors_name_the_problem(tmp_path, text, overrides, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(IdealError, match=message.replace("(", r"\(").replace("'", "'")):
        load_config(path, overrides)


def test_update_geometry_reaches_the_rule(tmp_path):
    from ideal.run.loop import make_rule

    path = tmp_path / "c.yaml"
    path.write_text("suite: {}\n")
    # docs/method.md's step by default
    assert make_rule(load_config(path)).update.geometry == "relative"
    rule = make_rule(load_config(path, ["update.geometry=additive", "update.keep_total=false"]))
    assert rule.update.geometry == "additive" and rule.update.keep_total is False
