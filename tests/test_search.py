"""Search cheap, train once: the `search:` section, the nested subsets, the tokenizer check, the
final training (RUN/final/) and its resume, the run's compute, and `ideal compare`'s ideal-search
with cost_in_sfts and the transfer report. Tiny suites: each run takes seconds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from ideal.data.mixture import Mixture, nested_subset
from ideal.errors import IdealError
from ideal.run.config import config_changes, config_template, load_config
from ideal.run.loop import run_loop
from ideal.run.search import SearchSettings

TINY = """
suite:
  domains:
    - {name: add, task: add, pool: 40, volume: 30}
    - {name: reverse, task: reverse, pool: 40, volume: 14}
    - {name: reverse_alt, task: reverse, pool: 40, volume: 30, conflict: true}
  capabilities: [add, reverse]
  reference_size: 8
  test_size: 8
  hidden_size: 16
  num_layers: 1
  num_heads: 2
  intermediate_size: 32
rounds: 1
# one thread: a final training of D0 equals round 0 of the full recipe bit for bit
train: {max_steps: 20, lr: 0.003, batch_size: 8, checkpoint_every: 0, threads: 1}
influence: {batch_size: 16}
eval: {max_new_tokens: 4}
"""


def _config(**search):
    base = yaml.safe_load(TINY)
    return load_config(None, base={**base, "search": search} if search else base)


# --- the section ----------------------------------------------------------------------------


def test_without_search_the_config_and_its_hash_are_todays():
    config = _config()
    assert config.search is None and config.search_config() is config
    stored = config.to_dict()
    assert "search" not in stored  # the hash of a run started before the section existed
    assert config_changes(stored, config.to_dict()) == []
    with_search = load_config(None, base={**yaml.safe_load(TINY), "search": {}})
    assert with_search.hash() != config.hash()
    assert config_changes(stored, with_search.to_dict()) == ["search"]


def test_an_empty_search_section_is_the_default_recipe():
    text = TINY + "search:\n"
    config = load_config(None, base=yaml.safe_load(text))
    assert config.search == SearchSettings() and config.search.fraction == 0.25


def test_the_search_recipe_overrides_train_and_eval_only_for_the_rounds():
    config = _config(fraction=0.5, train={"max_steps": 5, "lr": "1e-2"}, eval={"batch_size": 4})
    search = config.search_config()
    assert (search.train.max_steps, search.train.lr, search.eval.batch_size) == (5, 0.01, 4)
    assert (config.train.max_steps, config.train.lr, config.eval.batch_size) == (20, 0.003, 32)
    assert search.search is None and search.train.seed == config.seed  # mirrored keys kept
    # a recipe in steps keeps its passes over the data: a quarter of the rows, of the steps
    assert _config(fraction=0.25).search_config().train.max_steps == 5
    assert _config(fraction=0.25, train={"max_steps": 7}).search_config().train.max_steps == 7


def test_search_eval_keys_merge_with_the_rounds_default():
    """Setting one eval key keeps the rest of the search default (loss-only test sets)."""
    config = _config(eval={"max_new_tokens": 16})
    assert config.search.eval == {"test_accuracy": False, "max_new_tokens": 16}
    search = config.search_config()
    assert (search.eval.test_accuracy, search.eval.max_new_tokens) == (False, 16)
    assert (
        config.search.describe()
        == "fraction 0.25, eval.max_new_tokens 16, eval.test_accuracy False"
    )
    # the default is replaced only by naming it
    assert _config(eval={"test_accuracy": True}).search_config().eval.test_accuracy is True


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ({"fraction": 0}, "search.fraction must be in (0, 1], got 0"),
        ({"train": {"epochz": 2}}, "search.train: unknown key 'epochz'"),
        ({"train": {"lr": 0}}, "search.train.lr (--lr) must be > 0"),
        ({"train": {"lr": "fast"}}, "search.train.lr: expected float"),
        ({"eval": {"batch_size": 0}}, "search.eval.batch_size must be >= 1"),
        ({"train": {"seed": 3}}, "search.train.seed: the search runs with the config's 'seed'"),
        ({"modle": "x"}, "search: unknown key 'modle'"),
        ({"train": {"backend": "command"}}, "search.train.backend command: give train.command"),
    ],
)
def test_search_mistakes_name_their_key(search, message):
    with pytest.raises(IdealError) as err:
        _config(**search)
    assert str(err.value).startswith(message), str(err.value)


def test_the_init_template_mentions_the_section_commented():
    text = config_template("m", "t", "r", "x")
    assert "\n# search:\n" in text and "  # fraction: 0.25" in text
    assert "search" not in yaml.safe_load(text)  # commented: the loop stays today's


# --- the nested subsets ---------------------------------------------------------------------


def test_nested_subsets_keep_the_shares_and_grow_by_prefix():
    rng = np.random.default_rng(0)
    small = Mixture({"a": rng.integers(0, 3, 50), "b": np.ones(20, dtype=np.int64)}, seed=7)
    large = Mixture({"a": rng.integers(1, 4, 50), "b": np.full(20, 3)}, seed=7, round=2)
    for mixture in (small, large):
        subset = nested_subset(mixture, 0.3)
        for d, v in mixture.volumes.items():
            assert subset.volumes[d] == int(np.floor(0.3 * v + 0.5))  # shares kept
        counts = subset.counts["b"]
        assert counts.max() - counts.min() <= 1  # copies only past the pool: spread evenly
    # a larger volume takes a longer prefix of the same order: every row of the smaller
    # subset is in the larger one, whatever rows the two rounds' own mixtures hold
    a, b = nested_subset(small, 0.3), nested_subset(large, 0.3)
    for d in ("a", "b"):
        assert (b.counts[d] >= a.counts[d]).all()
    assert nested_subset(small, 1.0).volumes == small.volumes
    again = nested_subset(Mixture(small.counts, seed=7, round=5), 0.3)
    assert all((again.counts[d] == a.counts[d]).all() for d in a.counts)  # once per seed
    other = nested_subset(Mixture(small.counts, seed=8), 0.3)
    assert any((other.counts[d] != a.counts[d]).any() for d in a.counts)


# --- the tokenizer check --------------------------------------------------------------------


def _model_dir(path: Path, tokenizer, hidden: int = 8) -> Path:
    from ideal.tiny import save_model_dir, tiny_causal_lm

    model = tiny_causal_lm(
        "llama", vocab_size=len(tokenizer), hidden_size=hidden, num_layers=1, num_heads=2,
        intermediate_size=16,
    )  # fmt: skip
    return save_model_dir(path, model, tokenizer)


def test_a_search_model_must_share_the_tokenizer(tmp_path, cli):
    from ideal.run.preflight import preflight
    from ideal.tiny import byte_bpe_tokenizer, char_tokenizer

    same = _model_dir(tmp_path / "same", char_tokenizer())
    assert preflight(_config(model=str(same), fraction=1.0)).domains
    bpe = _model_dir(tmp_path / "bpe", byte_bpe_tokenizer())
    with pytest.raises(IdealError, match=r"search.model: .*: its tokenizer differs from the base "
                       r"model's \(vocabulary of \d+ tokens, not \d+\)"):  # fmt: skip
        preflight(_config(model=str(bpe)))
    plain = _model_dir(tmp_path / "plain", char_tokenizer(chat_template=False))
    with pytest.raises(IdealError, match=r"\(another chat template\)"):
        preflight(_config(model=str(plain)))
    config = tmp_path / "run.yaml"
    config.write_text(TINY + f"search: {{model: {bpe}}}\n")
    result = cli("run", config, "--out", tmp_path / "run")
    assert result.code == 1 and result.err.count("\n") == 1 and "search.model" in result.err
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


# --- a tiny run with each kind of proxy, the final training, its resume ----------------------


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A fraction and fewer steps: the rounds on half the data with 8 steps, then the final."""
    run = tmp_path_factory.mktemp("search") / "run"
    config = _config(fraction=0.5, train={"max_steps": 8})
    return run, run_loop(config, run).to_json()


def test_the_rounds_search_on_nested_halves_and_the_final_trains_the_returned_mixture(searched):
    run, summary = searched
    for k in (0, 1):
        full = json.loads((run / f"round-{k}" / "mixture.json").read_text())["domains"]
        half = json.loads((run / f"round-{k}" / "search" / "mixture.json").read_text())["domains"]
        assert {d: e["volume"] for d, e in half.items()} == {
            d: int(np.floor(e["volume"] / 2 + 0.5)) for d, e in full.items()
        }
        steps = json.loads((run / f"round-{k}" / "train.json").read_text())["steps"]
        assert steps == 8  # the search recipe
    influence = json.loads((run / "round-0" / "influence.json").read_text())
    # scored on the rows the search trained on; its volumes are the mixture the update moves,
    # so `ideal reweight` takes the file as it is
    assert sum(influence["search_volumes"].values()) == 37
    assert influence["volumes"] == {
        d: e["volume"]
        for d, e in json.loads((run / "round-0" / "mixture.json").read_text())["domains"].items()
    }
    from ideal.methods.reweight import reweight

    reweight(run / "round-0", run / "round-0" / "influence.json", run.parent / "reweighted")
    selected = summary["selected_round"]
    final = json.loads((run / "final" / "mixture.json").read_text())
    returned = json.loads((run / f"round-{selected}" / "mixture.json").read_text())
    assert final["final"] == {"from_round": selected}
    assert final["domains"] == returned["domains"]
    record = json.loads((run / "final" / "train.json").read_text())
    assert record["round"] == -1 and record["steps"] == 20  # the run's own recipe
    assert (run / "final" / "model" / "model.safetensors").is_file()
    metrics = json.loads((run / "final" / "metrics.json").read_text())
    assert summary["final"]["reference_loss_mean"] == metrics["reference_loss_mean"]
    assert summary["final"]["kind"] == "final" and summary["final"]["round"] == selected
    assert summary["search"] == "fraction 0.5, train.max_steps 8, eval.test_accuracy False"
    # the search rounds score the test sets by their losses only (the default search.eval); the
    # final model in full
    rounds = [json.loads((run / f"round-{k}" / "metrics.json").read_text()) for k in (0, 1)]
    for m in rounds:
        assert m["test_accuracy_mean"] is None and m["test_loss_mean"] is not None
    assert metrics["test_accuracy_mean"] is not None


def test_the_summary_and_the_report_show_the_final_and_the_compute(searched):
    from ideal.records import RunSummary
    from ideal.report.console import run_tables

    run, summary = searched
    assert json.loads((run / "summary.json").read_text()) == summary
    compute = summary["compute"]
    assert compute["sft"] == "final training"
    assert compute["sft_seconds"] == summary["final"]["seconds"]["train"]
    assert compute["cost_in_sfts"] == pytest.approx(compute["total"] / compute["sft_seconds"])
    lines = [x for x in run_tables(RunSummary.from_json(summary), run) if isinstance(x, str)]
    assert any(x.startswith("final: round ") and "final/model" in x for x in lines)
    assert any(x.startswith("compute: rounds ") and "x one SFT" in x for x in lines)
    html = (run / "report.html").read_text()
    assert "Search and final training" in html and "<h2>Compute</h2>" in html


def test_cost_in_sfts_is_computed_from_the_recorded_seconds(searched, tmp_path):
    from ideal.run.summary import summarise_run

    run = tmp_path / "run"
    shutil.copytree(searched[0], run)

    def set_seconds(path: Path, value: float, key: str = "seconds") -> None:
        data = json.loads(path.read_text())
        if key == "total":
            data["seconds"]["total"] = value
        else:
            data[key] = value
        path.write_text(json.dumps(data))

    for here, train, evaluate in ((run / "round-0", 3.0, 1.0), (run / "round-1", 3.0, 1.0),
                                  (run / "final", 12.0, 2.0)):  # fmt: skip
        set_seconds(here / "model" / "train_settings.json", train)
        set_seconds(here / "metrics.json", evaluate)
    set_seconds(run / "round-0" / "influence.json", 4.0, "total")
    others = sorted(run.glob("step-*/*/model"))  # the candidates not kept: trained, evaluated
    for model in others:
        set_seconds(model / "train_settings.json", 3.0)
        set_seconds(model.parent / "metrics.json", 1.0)
    compute = summarise_run(run).compute
    spent = 4.0 * len(others)
    expected = {"train": 6.0, "influence": 4.0, "eval": 2.0}
    assert compute.rounds == ({**expected, "candidates": spent} if others else expected)
    assert compute.final == {"train": 12.0, "eval": 2.0}
    assert compute.total == 26.0 + spent
    assert compute.cost_in_sfts == pytest.approx((26.0 + spent) / 12.0)


def test_the_final_stage_resumes_without_training_again(searched, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(searched[0], run)
    weights = run / "final" / "model" / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    (run / "final" / "metrics.json").unlink()  # killed after the final training
    (run / "summary.json").unlink()
    config = _config(fraction=0.5, train={"max_steps": 8})
    summary = run_loop(config, run, resume=True).to_json()
    assert weights.stat().st_mtime_ns == stamp  # not trained again
    assert summary["final"]["reference_loss_mean"] == searched[1]["final"]["reference_loss_mean"]
    # the rounds are the run's: a final/ that holds another round's mixture is not trained over
    stored = json.loads((run / "final" / "mixture.json").read_text())
    stored["final"]["from_round"] = 1 - searched[1]["selected_round"]
    (run / "final" / "mixture.json").write_text(json.dumps(stored))
    with pytest.raises(IdealError, match="final: holds round"):
        run_loop(config, run, resume=True)


def test_without_the_final_a_search_run_stops_after_its_rounds(searched, tmp_path):
    """`final=False` (benchmarks/search_transfer.py --rank measures the search recipe alone):
    the same rounds, nothing trained with the run's recipe."""
    run = tmp_path / "run"
    shutil.copytree(searched[0], run)
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()
    config = _config(fraction=0.5, train={"max_steps": 8})
    summary = run_loop(config, run, resume=True, final=False).to_json()
    assert not (run / "final").exists() and summary.get("final") is None
    assert summary["rounds"] == searched[1]["rounds"]


def test_a_smaller_search_model_searches_and_the_base_model_trains_the_final(tmp_path):
    """The third kind of proxy: a smaller model of the same tokenizer (its whole mixture)."""
    from ideal.tiny import char_tokenizer

    small = _model_dir(tmp_path / "small", char_tokenizer(), hidden=8)
    run = tmp_path / "run"
    summary = run_loop(_config(model=str(small), fraction=1.0), run).to_json()
    hidden = {
        where: json.loads((run / where / "model" / "config.json").read_text())["hidden_size"]
        for where in ("round-0", "round-1", "final")
    }
    assert hidden == {"round-0": 8, "round-1": 8, "final": 16}
    assert not (run / "round-0" / "search").exists()  # fraction 1: the round's own mixture
    influence = json.loads((run / "round-0" / "influence.json").read_text())
    assert influence["model"] == str((run / "round-0" / "model").resolve())
    assert summary["final"] is not None and summary["compute"]["cost_in_sfts"] > 0


@pytest.mark.slow
def test_the_final_training_takes_the_runs_own_backend(tmp_path):
    """Search with the builtin loop, train the returned mixture once with a command trainer
    (the rounds' export and {round} -1 for the final)."""
    import sys

    from tests.test_backends import FAKE_TRAINER

    (tmp_path / "fake_train.py").write_text(FAKE_TRAINER)
    train = f"{sys.executable} {tmp_path / 'fake_train.py'} {{model}} {{data_dir}} {{output_dir}} {{round}}"
    base = yaml.safe_load(TINY)
    base.update(rounds=0, search={"fraction": 0.5, "train": {"backend": "builtin"}})
    base["train"].update(backend="command", command=train,
                         env={"FAKE_FAIL_ONCE": str(tmp_path / "never")})  # fmt: skip
    run = tmp_path / "run"
    summary = run_loop(load_config(None, base=base), run).to_json()
    assert json.loads((run / "round-0" / "train.json").read_text())["backend"] == "builtin"
    record = json.loads((run / "final" / "train.json").read_text())
    assert record["backend"] == "command" and record["exit_code"] == 0
    assert record["command"][-2:] == [str((run / "final" / "trainer-output").resolve()), "-1"]
    volumes = json.loads((run / "final" / "mixture.json").read_text())["domains"]
    for domain, entry in volumes.items():  # the trainer saw the returned mixture's volumes
        rows = (run / "final" / "export" / f"{domain}.jsonl").read_text().splitlines()
        assert len(rows) == entry["volume"]
    assert summary["final"]["seconds"]["train"] == pytest.approx(record["seconds"])


# --- ideal compare ----------------------------------------------------------------------------


@pytest.mark.slow
def test_compare_ideal_search_cost_in_sfts_and_transfer(tmp_path, cli):
    from ideal.backends.training.builtin import TrainSettings, run_train

    config = tmp_path / "tiny.yaml"
    config.write_text(TINY + "search: {fraction: 0.5, train: {max_steps: 8}}\n")
    out = tmp_path / "c"
    result = cli("compare", config, "--methods", "ideal-search,ideal", "--seeds", "2", "--out", out)
    assert result.code == 0, result.err
    document = json.loads((out / "compare.json").read_text())
    search, full = document["methods"]["ideal-search"], document["methods"]["ideal"]
    # round 0 is trained with the full recipe by ideal (the unit) and not shared with the search
    assert document["sft"]["of"] == "ideal's round 0 (D0) training"
    for seed in (0, 1):
        ideal_run = out / "ideal" / f"seed-{seed}"
        search_run = out / "ideal-search" / f"seed-{seed}"
        d0 = json.loads((ideal_run / "summary.json").read_text())["rounds"][0]["seconds"]["train"]
        assert document["sft"]["seconds"][str(seed)] == d0
        for entry in (search, full):
            run = entry["runs"][seed]
            assert run["cost_in_sfts"] == pytest.approx(run["seconds"] / d0)
        assert (search_run / "round-0" / "search").is_dir()
        # ideal-search is scored with its final model: the returned mixture, full recipe
        summary = json.loads((search_run / "summary.json").read_text())
        assert search["runs"][seed]["selected"] == summary["final"]
        assert search["runs"][seed]["seconds"] == summary["compute"]["total"]
        # whichever round is returned: the final is its mixture trained with the full recipe
        # (ideal's, whose round 0 is the unit), bit for bit what that training gives again
        final = search_run / "final"
        returned = search_run / f"round-{summary['selected_round']}" / "mixture.json"
        assert (json.loads((final / "mixture.json").read_text())["domains"]
                == json.loads(returned.read_text())["domains"])  # fmt: skip
        recipe = json.loads((final / "model" / "train_settings.json").read_text())["settings"]
        unit = ideal_run / "round-0" / "model" / "train_settings.json"
        assert recipe == json.loads(unit.read_text())["settings"]
        again = tmp_path / f"again-{seed}"
        settings = TrainSettings(**{**recipe, "lora_targets": tuple(recipe["lora_targets"])})
        run_train(search_run / "suite" / "base", final, again, settings, progress=False)
        weights = (p / "model.safetensors" for p in (final / "model", again))
        assert next(weights).read_bytes() == next(weights).read_bytes()
    assert set(search["cost_in_sfts"]) == {"mean", "std"}
    transfer = document["transfer"]
    assert (transfer["searched"], transfer["against"], transfer["seeds"]) == (
        "ideal-search", "ideal", [0, 1]
    )  # fmt: skip
    accuracy = transfer["test_accuracy_mean"]
    assert accuracy["per_seed"] == pytest.approx(
        [search["runs"][s]["selected"]["test_accuracy_mean"]
         - full["runs"][s]["selected"]["test_accuracy_mean"] for s in (0, 1)]
    )  # fmt: skip
    assert all(0.0 <= s["share_distance"] <= 1.0 for s in transfer["per_seed"])
    assert transfer["within_one_stderr_or_better"] == (accuracy["mean"] >= -accuracy["stderr"])
    assert "transfer, ideal-search - ideal" in result.out and "cost in SFTs" in result.out
    assert "Transfer: ideal-search" in (out / "compare.html").read_text()
