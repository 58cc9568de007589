"""One home for every setting: the commands' defaults are the dataclasses', a key has one home, and
a run config's mistakes are found before anything trains (ideal.run.preflight)."""

from __future__ import annotations

import dataclasses
import inspect
import json
from pathlib import Path

import pytest
import typer
import yaml

from ideal import cli
from ideal.backends.settings import EvalConfig, TrainConfig, TrainSettings
from ideal.errors import IdealError
from ideal.influence.settings import InfluenceConfig
from ideal.methods.settings import UpdateSettings
from ideal.records import RunSummary
from ideal.run.compare import METHODS, gap_closure
from ideal.run.config import RunConfig, load_config
from ideal.run.rundir import prepare_run
from ideal.settings import default_of
from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir, qa_rows

SECTIONS = (TrainSettings, TrainConfig, EvalConfig, InfluenceConfig, UpdateSettings, RunConfig)


def _options(command) -> list[tuple[str, str, object, object]]:
    """(command, parameter, its default, the setting it reads) for every option bound to a setting."""
    out = []
    for name, parameter in inspect.signature(command.callback, eval_str=True).parameters.items():
        for meta in getattr(parameter.annotation, "__metadata__", ()):
            if getattr(meta, "setting", None) is not None:
                out.append((command.name, name, parameter.default, meta.setting))
    return out


def _commands():
    group = typer.main.get_command(cli.app)
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # `ideal suite`
            yield from command.commands.values()
        else:
            command.name = name
            yield command


def test_every_setting_carries_its_help():
    for cls in SECTIONS:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"


def test_every_command_takes_its_defaults_from_the_settings():
    bound = [o for command in _commands() for o in _options(command)]
    assert len(bound) > 40  # train, influence, reweight, eval, demo ... read the dataclasses
    for command, name, default, (cls, field) in bound:
        expected = default_of(cls, field)
        if default is None and (expected == {} or command == "check"):
            continue  # none given: an empty mapping, or the config's
        if isinstance(expected, tuple):  # lists are comma-separated on the command line
            expected = ",".join(expected)
        word = dataclasses.fields(cls)[[f.name for f in dataclasses.fields(cls)].index(field)]
        if word.metadata.get("none"):  # a count, or a word for None ('all')
            expected = word.metadata["none"] if expected is None else str(expected)
        assert default == expected, (
            f"ideal {command} --{name}: {default!r} != {cls.__name__}.{field}"
        )


def test_the_python_api_takes_its_defaults_from_the_settings():
    """The functions and records under the commands default to the run config's values: one
    home per default (they were 64 new tokens and batch 16 against the config's 32 and 32, an
    influence batch of 8 against 16, the objective and the rule's noise settings repeated)."""
    import inspect

    from ideal.backends.evaluation.evaluate import evaluate_capability, run_eval
    from ideal.backends.evaluation.lmeval import LmEvalEvaluator
    from ideal.backends.evaluation.scorers import score_choices
    from ideal.backends.settings import EvalConfig
    from ideal.influence.settings import InfluenceConfig, InfluenceJob, InfluenceSettings
    from ideal.methods.rules import IdealRule
    from ideal.methods.settings import UpdateSettings

    for function in (evaluate_capability, run_eval, score_choices):
        parameters = inspect.signature(function).parameters
        for name in ("max_new_tokens", "batch_size"):
            if name in parameters:
                assert parameters[name].default == default_of(EvalConfig, name), (function, name)
    assert LmEvalEvaluator({}).batch_size == default_of(EvalConfig, "batch_size")
    engine, config = InfluenceSettings(), InfluenceConfig()
    for f in dataclasses.fields(InfluenceSettings):
        if hasattr(config, f.name) and f.name != "loss":  # loss: resolved from auto
            assert getattr(engine, f.name) == getattr(config, f.name), f.name
    job, update = InfluenceJob(), UpdateSettings()
    assert (job.objective, job.size_factor) == (update.objective, update.size_factor)
    assert IdealRule().update == update and IdealRule().m == update.step


def test_compare_help_lists_every_method(cli):
    result = cli("compare", "--help")
    text = "".join(result.out.split())  # help wraps long names at their hyphens
    for method in METHODS:
        assert method in text, method


@pytest.mark.parametrize(
    ("key", "home"), [("train.max_length", "max_length"), ("train.seed", "seed")]
)
def test_a_key_has_one_home(tmp_path, key, home):
    path = tmp_path / "c.yaml"
    path.write_text("suite: {}\n")
    with pytest.raises(IdealError, match=f"{key}: set '{home}' at the top"):
        load_config(path, [f"{key}=7"])
    config = load_config(path, [f"{home}=7"])
    assert getattr(config.train, home.split(".")[-1]) == 7  # the trainer reads the home's value


def test_choices_are_checked_with_the_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("suite: {}\n")
    for override, key in [("influence.curvature=dense", "influence.curvature"),
                          ("update.geometry=spherical", "update.geometry"),
                          ("eval.reference_accuracy=maybe", "eval.reference_accuracy"),
                          ("train.optimizer=lion", "train.optimizer")]:  # fmt: skip
        with pytest.raises(IdealError, match=key):
            load_config(path, [override])


@pytest.fixture
def own_data(tmp_path):
    """A user's layout: a tiny model, train/reference/test directories, a run config."""
    tokenizer = char_tokenizer()
    model = tmp_path / "model"
    network = tiny_causal_lm("llama", len(tokenizer), hidden_size=8, num_layers=1, num_heads=2)
    save_model_dir(model, network, tokenizer)
    data = tmp_path / "data"
    make_data_dir(data / "train", {"math": qa_rows("m", 6), "code": qa_rows("c", 6)})
    make_data_dir(data / "reference", {"math": qa_rows("rm", 2), "code": qa_rows("rc", 2)})
    make_data_dir(data / "test", {"math": qa_rows("tm", 2), "code": qa_rows("tc", 2)})
    config = {
        "model": str(model),
        "train_data": str(data / "train"),
        "reference_data": str(data / "reference"),
        "test_data": str(data / "test"),
        "rounds": 1,
        "train": {"max_steps": 1, "batch_size": 4, "threads": 1},
    }
    return tmp_path, config


def _write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"test_data": "data/tset"}, "test_data: data/tset: not a directory"),
        ({"reference_data": "data/refrence"}, "reference_data: data/refrence: not a directory"),
        ({"eval": {"scorers": {"math": "numeric"}}}, "eval.scorers.math: unknown scorer 'numeric'"),
        ({"eval": {"scorers": {"maths": "number"}}}, "eval.scorers.maths: no capability 'maths'"),
        ({"model": "nowhere"}, "model: nowhere"),
        ({"train": {"top_layers": 3}}, "train.top_layers is 3, but the model has 1 blocks"),
    ],
)
def test_run_mistakes_are_found_before_training(own_data, cli, monkeypatch, change, message):
    tmp_path, config = own_data
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, {**config, **change})
    result = cli("check", "--config", path)
    assert result.code == 1 and message in result.err and result.err.count("\n") == 1
    result = cli("run", path, "--out", tmp_path / "run")
    assert result.code == 1 and message in result.err
    assert not (tmp_path / "run").exists()  # found before anything was written or trained


def test_a_capability_without_test_set_is_a_warning(own_data, cli):
    tmp_path, config = own_data
    make_data_dir(tmp_path / "data" / "reference", {"extra": qa_rows("x", 2)})
    result = cli("check", "--config", _write(tmp_path, config))
    assert result.code == 0
    assert "capability 'extra' has a reference set but no test set" in result.out


def test_a_run_where_no_stage_completed_starts_again(own_data):
    tmp_path, config = own_data
    run = tmp_path / "run"
    first = load_config(_write(tmp_path, {**config, "eval": {"max_new_tokens": 5}}))
    prepare_run(first, run, resume=False)
    (run / "round-0").mkdir()  # round 0's mixture was written, then the run stopped
    second = load_config(_write(tmp_path, config))
    prepare_run(second, run, resume=False)  # neither "a run is already here" nor "changed"
    stored = yaml.safe_load((run / "config.yaml").read_text())
    assert stored["hash"] == second.hash() and not (run / "round-0").exists()
    (run / "round-0" / "model.partial").mkdir(parents=True)  # training began: checkpoints
    with pytest.raises(IdealError, match="a run is already here"):  # never wiped
        prepare_run(first, run, resume=False)
    with pytest.raises(
        IdealError, match=r"config changed since this run started \(eval.max_new_tokens\)"
    ):
        prepare_run(first, run, resume=True)
    assert (run / "round-0" / "model.partial").is_dir()


@pytest.mark.parametrize(
    "update, rounds, resumes",
    [
        ({"rule": "uniform"}, 2, True),
        ({"rule": "ideal"}, 0, True),
        ({"rule": "ideal"}, 1, False),  # one step from D0: no probe before it
        ({"rule": "ideal"}, 2, False),
    ],
)
def test_a_setting_added_since_the_run_is_no_change_where_the_run_never_reads_it(
    own_data, update, rounds, resumes
):
    """A run started before update.rescore existed resumes under its default (true, not what
    the code did before) where it takes no IDEAL step: another rule, or no round past D0."""
    tmp_path, config = own_data
    run = tmp_path / "run"
    current = load_config(_write(tmp_path, {**config, "rounds": rounds, "update": update}))
    prepare_run(current, run, resume=False)
    (run / "round-0" / "model.partial").mkdir(parents=True)  # a stage began
    stored = yaml.safe_load((run / "config.yaml").read_text())
    del stored["update"]["rescore"]  # as a run started before the setting wrote it
    stored["hash"] = "older"
    (run / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    if resumes:
        prepare_run(current, run, resume=True)
    else:
        with pytest.raises(IdealError, match=r"changed since this run started \(update.rescore\)"):
            prepare_run(current, run, resume=True)


def test_the_probe_is_said_once_in_the_summary():
    rounds = [
        {"round": k, "volumes": {"a": 1}, "test_accuracy": {}, "test_accuracy_mean": None,
         "test_accuracy_worst": None, "reference_loss": {}, "reference_loss_mean": loss}
        for k, loss in enumerate([1.0, 0.9, 0.8])
    ]  # fmt: skip
    rounds[1].update(kind="uniform probe", from_round=0)
    rounds[2].update(kind="ideal", from_round=1)
    summary = RunSummary.from_json(
        {"rounds": rounds, "select": "last", "selected_round": 2, "probe_round": 1,
         "continued_from": 1}
    )  # fmt: skip
    assert [r.describe() for r in summary.rounds] == [
        "D0",
        "uniform probe",
        "ideal step from round 1",
    ]
    assert "went on from round 1 (uniform)" in summary.probe_note()
    assert RunSummary.from_json(json.loads(json.dumps(summary.to_json()))) == summary


def test_gap_closure_without_accuracies():
    """An external evaluator may score no accuracy: the closure is None, not a TypeError."""

    def runs(values):
        return {
            "runs": [
                {"seed": s, "selected": {"test_accuracy_mean": v}} for s, v in enumerate(values)
            ]
        }

    results = {"original": runs([None]), "oracle-grid": runs([None]), "ideal": runs([None])}
    assert gap_closure(results) == {"ideal": {"closure": None, "oracle_minus_original": None}}


def test_version(cli):
    from ideal.version import __version__

    result = cli("--version")
    assert result.code == 0 and result.out.strip() == f"ideal {__version__}"


def test_init_writes_a_commented_config_that_loads(own_data, cli):
    tmp_path, config = own_data
    out = tmp_path / "mine.yaml"
    result = cli("init", tmp_path / "data", "--model", config["model"], "--out", out)
    assert result.code == 0, result.err
    assert "2 domains (code, math)" in result.out and f"ideal run {out}" in result.out
    text = out.read_text()
    assert "# lr: 2.0e-05  # Peak learning rate" in text  # every setting, its default and help
    loaded = load_config(out)
    assert loaded == load_config(None, base={k: config[k] for k in
                                             ("model", "train_data", "reference_data", "test_data")})  # fmt: skip
    again = cli("init", tmp_path / "data", "--model", config["model"], "--out", out)
    assert again.code == 1 and "already exists" in again.err
    missing = cli(
        "init", tmp_path / "data", "--model", tmp_path / "nope", "--out", tmp_path / "x.yaml"
    )
    assert missing.code == 1 and "model:" in missing.err and not (tmp_path / "x.yaml").exists()


def test_own_data_as_users_keep_it_on_a_bpe_chatml_model(tmp_path, cli):
    """The newcomer's path before training, on a byte-level BPE with a ChatML template: ShareGPT
    rows in a .json array, Alpaca rows in parquet, answers that start with a newline; `ideal init`
    writes a config that `ideal check --config` reads, with token counts per domain."""
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from ideal.tiny import byte_bpe_tokenizer

    tokenizer = byte_bpe_tokenizer()
    model = tmp_path / "bpe"
    network = tiny_causal_lm("qwen2", len(tokenizer), hidden_size=8, num_layers=1, num_heads=2)
    save_model_dir(model, network, tokenizer)
    data = tmp_path / "data"
    talk = [{"conversations": [{"from": "human", "value": f"Say {i}."},
                               {"from": "gpt", "value": f"\n\n{i}"}]} for i in range(5)]  # fmt: skip
    (data / "train" / "chat").mkdir(parents=True)
    (data / "train" / "chat" / "talk.json").write_text(json.dumps(talk))
    (data / "train" / "alpaca").mkdir()
    rows = [
        {"instruction": f"Add {i} and 1.", "input": None, "output": f"\n{i + 1}"} for i in range(4)
    ]
    pq.write_table(pyarrow.Table.from_pylist(rows), data / "train" / "alpaca" / "rows.parquet")
    make_data_dir(data / "reference", {"chat": qa_rows("r", 2), "alpaca": qa_rows("a", 2)})
    missing = cli("init", data, "--model", model, "--out", tmp_path / "run.yaml")
    assert missing.code == 1 and f"{data / 'test'}: not a directory" in missing.err
    make_data_dir(data / "test", {"chat": qa_rows("t", 2)})
    result = cli("init", data, "--model", model, "--out", tmp_path / "run.yaml")
    assert result.code == 0, result.err
    assert "2 domains (alpaca, chat)" in result.out
    check = cli("check", "--config", tmp_path / "run.yaml")
    assert check.code == 0, check.err
    lines = {line.split()[1]: line for line in check.out.splitlines() if line.startswith("│")}
    assert "sharegpt" in lines["chat"] and "alpaca" in lines["alpaca"]
    assert "warning: capability 'alpaca' has a reference set but no test set" in check.out


def test_top_layers_beyond_the_suite_model_is_found_before_training(tmp_path):
    from ideal.run.preflight import preflight

    path = tmp_path / "c.yaml"
    path.write_text("suite: {num_layers: 2}\n")
    with pytest.raises(IdealError, match="top_layers is 3, but the suite's model has 2 blocks"):
        preflight(load_config(path, ["train.top_layers=3"]))
    preflight(load_config(path, ["train.top_layers=2"]))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["train.top_layers=1", "influence.layers=model.layers.0.mlp.*"],
            "influence.layers: model.layers.0.mlp.gate_proj lies outside the top 1 blocks (1..1) "
            "that train.top_layers 1 trains",
        ),
        (  # a LoRA model's names: the adapter wraps only the top block
            ["train.top_layers=1", "train.lora=true", "influence.layers=*layers.0.*"],
            "influence.layers: base_model.model.model.layers.0.self_attn.q_proj lies outside the "
            "top 1 blocks (1..1) that train.top_layers 1 trains",
        ),
        (  # the rounds' recipe: the influence step runs with the search's top_layers
            ["search.train.top_layers=1", "influence.layers=model.layers.0.mlp.*"],
            "influence.layers: model.layers.0.mlp.gate_proj lies outside the top 1 blocks (1..1) "
            "that search.train.top_layers 1 trains",
        ),
        (
            ["train.top_layers=1", "influence.layers=*.nothing.*"],
            "influence.layers: *.nothing.*: no linear layer (nn.Linear or Conv1D) matches",
        ),
    ],
)
def test_influence_layers_below_the_top_blocks_are_refused_before_training(
    tmp_path, cli, overrides, message
):
    path = tmp_path / "c.yaml"
    path.write_text("suite: {num_layers: 2}\nrounds: 1\n")
    result = cli("run", path, *overrides, "--out", tmp_path / "run")
    assert result.code == 1 and message in result.err and result.err.count("\n") == 1, result.err
    assert not (tmp_path / "run").exists()  # said before anything was written or trained


def test_influence_layers_inside_the_top_blocks_pass_preflight(tmp_path):
    from ideal.run.preflight import preflight

    path = tmp_path / "c.yaml"
    path.write_text("suite: {num_layers: 2}\n")
    for overrides in (
        ["train.top_layers=1", "influence.layers=model.layers.1.mlp.*"],
        ["train.top_layers=1", "train.lora=true", "influence.layers=*layers.1.*lora_*"],
        ["train.top_layers=0", "influence.layers=model.layers.0.mlp.*"],
    ):
        preflight(load_config(path, overrides))


def test_scoring_every_copy_warns_that_the_noise_gate_sees_no_noise(tmp_path):
    from ideal.run.preflight import preflight

    path = tmp_path / "c.yaml"
    path.write_text("suite: {num_layers: 2}\n")
    every = ["influence.sample=1.0", "influence.max_examples=all"]
    warned = preflight(load_config(path, every)).warnings
    assert any("standard errors are 0" in w and "min_z" in w for w in warned), warned
    for overrides in (every + ["update.min_z=0"], ["influence.sample=1.0"], []):
        assert not any("min_z" in w for w in preflight(load_config(path, overrides)).warnings)


def test_a_settings_word_for_none_reads_in_a_config_as_on_the_command_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("suite: {num_layers: 2}\ninfluence: {curvature_examples: all}\n")
    config = load_config(path, ["influence.max_examples=all"])
    assert config.influence.max_examples is None and config.influence.curvature_examples is None
    assert load_config(path, ["influence.max_examples=32"]).influence.max_examples == 32
    with pytest.raises(IdealError, match="influence.max_examples: expected int, got 'every'"):
        load_config(path, ["influence.max_examples=every"])
