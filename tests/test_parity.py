"""What an external trainer does to the mixture's rows, against what ideal measures: the fixes at
the source (backends/trainer_rows.py, the LLaMA-Factory export), and the parity check's comparison
(backends/tools/parity.py) on fabricated tool output, and running it (parity_run.py) with a fake tool. The tools themselves: tests/test_tools.py."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from ideal.backends.protocol import TrainJob
from ideal.backends.tools import parity_run
from ideal.backends.tools.external import tool_path
from ideal.backends.tools.parity import compare_probe, id_difference
from ideal.backends.tools.parity_run import probe_python, tokenize_export, tool_python
from ideal.backends.tools.presets import preset_trainer
from ideal.backends.tools.trainer_rows import (
    check_deduplication,
    check_deduplication_setting,
    length_warning,
    long_rows,
)
from ideal.data.export import export_mixture, llamafactory_problem
from ideal.data.mixture import Mixture
from ideal.data.mixture_io import load_training_set, write_mixture_dir
from ideal.data.rows import IGNORE_INDEX, Example
from ideal.errors import IdealError
from ideal.tiny import byte_bpe_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir


def turns(*roles: str) -> list[dict[str, str]]:
    return [{"role": r, "content": f"{r} {k}"} for k, r in enumerate(roles)]


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}]}  # fmt: skip


# --- LLaMA-Factory: rows it would drop are refused at the export --------------------------------


def test_the_rows_llamafactory_drops():
    assert llamafactory_problem(turns("user", "assistant")) is None
    assert llamafactory_problem(turns("system", "user", "assistant", "user", "assistant")) is None
    assert llamafactory_problem(turns("user", "user", "assistant")) == (
        "consecutive user turns (turns 1 and 2)"
    )
    assert llamafactory_problem(turns("system", "user", "assistant", "assistant")) == (
        "consecutive assistant turns (turns 3 and 4)"
    )
    assert llamafactory_problem(turns("user", "system", "assistant")) == (
        "a system turn that is not the first (turn 2)"
    )
    assert llamafactory_problem(turns("assistant")) == (
        "a conversation that starts with an assistant turn"
    )


def test_the_llamafactory_export_refuses_such_a_row_naming_its_file_and_line(tmp_path):
    rows = [chat("a", "1"), {"messages": turns("user", "user", "assistant")}]
    pool = make_data_dir(tmp_path / "pool", {"add": rows})
    write_mixture_dir(tmp_path / "mix", load_training_set(pool), load_training_set(pool).mixture)
    with pytest.raises(IdealError) as caught:
        export_mixture(tmp_path / "mix" / "mixture.json", "llamafactory", tmp_path / "out")
    message = str(caught.value)
    assert message.startswith(f"{pool / 'add' / 'data.jsonl'}:2: LLaMA-Factory would drop this")
    assert "consecutive user turns" in message and "\n" not in message
    assert not (tmp_path / "out").exists()  # nothing half-written
    export_mixture(
        tmp_path / "mix" / "mixture.json", "axolotl", tmp_path / "ax"
    )  # axolotl keeps it


# --- axolotl: deduplication over a mixture with repeats; rows longer than sequence_len ----------


def _example(messages: list[dict[str, str]], source: str) -> Example:
    return Example(tuple(messages), None, source, "")


def test_axolotl_deduplication_over_repeated_rows_is_an_error():
    rows = [_example(turns("user", "assistant"), f"x:{k}") for k in range(3)]
    check_deduplication({}, "ax.yaml", rows, "the pool")  # not set: nothing to say
    check_deduplication({"dataset_exact_deduplication": True}, "ax.yaml", rows[:1], "the pool")
    with pytest.raises(IdealError) as caught:
        check_deduplication({"dataset_exact_deduplication": True}, "ax.yaml", rows, "round 2's mix")
    assert str(caught.value).startswith(
        "ax.yaml: `dataset_exact_deduplication: true` would remove 2 repeated rows of round 2's "
        "mix (first: x:1)"
    )
    with pytest.raises(IdealError, match=r"update.max_repeats is 4\): remove the key"):
        check_deduplication_setting({"dataset_exact_deduplication": True}, "ax.yaml", 4)
    check_deduplication_setting({"dataset_exact_deduplication": True}, "ax.yaml", 1)


def test_the_axolotl_preset_refuses_a_round_that_repeats_rows(tmp_path):
    pool = make_data_dir(tmp_path / "pool", {"add": [chat(f"q{i}", f"{i}") for i in range(3)]})
    training = load_training_set(pool)
    write_mixture_dir(tmp_path / "round-1", training, Mixture({"add": np.array([2, 1, 0])}),
                      data_subdir="data")  # fmt: skip
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"dataset_exact_deduplication": True}))
    (tmp_path / "base").mkdir()
    job = TrainJob(tmp_path / "base", tmp_path / "round-1", tmp_path / "round-1" / "model", 1,
                   tmp_path, tmp_path / "config.yaml")  # fmt: skip
    trainer = preset_trainer("axolotl", tmp_path / "base.yaml", ["true"], parity="off")
    with pytest.raises(IdealError, match="would remove 1 repeated rows of round 1's mixture"):
        trainer.train(job)


@pytest.fixture(scope="module")
def bpe():
    return byte_bpe_tokenizer()


def test_rows_longer_than_the_tools_limit(bpe):
    short = _example(turns("user", "assistant"), "d/a.jsonl:1")
    long = _example([{"role": "user", "content": "word " * 60},
                     {"role": "assistant", "content": "ok"}], "d/a.jsonl:2")  # fmt: skip
    assert long_rows({"a": [short]}, bpe, 64) is None
    found = long_rows({"a": [short, long], "b": [long]}, bpe, 64)
    assert found is not None and found.counts == {"a": 1, "b": 1}
    assert found.source == "d/a.jsonl:2" and found.longest > 64
    line = length_warning("axolotl", {}, "ax.yaml", found, None)
    assert line.startswith("ax.yaml: `sequence_len: 64` (its default, absent from ax.yaml): 2 rows")
    assert "drops them from the mixture" in line and "ideal measures them whole" in line
    truncating = {"sequence_len": 64, "excess_length_strategy": "truncate"}
    line = length_warning("axolotl", truncating, "ax.yaml", found, 64)
    assert "cuts them at the end, ideal cuts them to max_length 64" in line
    line = length_warning("llamafactory", {"cutoff_len": 64}, "lf.yaml", found, None)
    assert "cuts prompt and answer in proportion" in line
    assert line.endswith(f"raise `cutoff_len` to {found.longest} or more")


# --- comparing the tool's rows with ideal's (fabricated tool output) ----------------------------


@pytest.fixture()
def export(tmp_path, bpe):
    """An export of two domains (4 and 3 rows), tokenized as ideal does."""
    out = tmp_path / "export"
    rows = {
        "add": [chat(f"What is {i}+{i}?", f"{2 * i}") for i in range(4)],
        "code": [chat(f"Write f{i}.", f"def f{i}(): pass") for i in range(3)],
    }
    for name, items in rows.items():
        make_data_dir(tmp_path / "pool", {name: items})
        out.mkdir(exist_ok=True)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items))
    return tokenize_export(out, ["add", "code"], bpe, None)


def _tool_rows(exported, change=None) -> dict:
    """The tool's JSON as a probe writes it: every row as ideal has it, then `change`d."""
    datasets = []
    for domain, (_, items) in exported.items():
        kept = [{"index": k, "input_ids": list(t.input_ids), "labels": list(t.labels)}
                for k, t in enumerate(items)]  # fmt: skip
        datasets.append({"file": f"/x/{domain}.jsonl", "rows": len(items), "kept": kept,
                         "dropped": []})  # fmt: skip
    document = {"tool": "llamafactory", "version": "0.9.5", "datasets": datasets,
                "trained": sum(len(d["kept"]) for d in datasets)}  # fmt: skip
    if change is not None:
        change(document)
    return document


def test_the_same_rows_agree(export, bpe):
    parity = compare_probe("llamafactory", _tool_rows(export), export, {}, bpe)
    assert parity.errors == [] and parity.warnings == []
    assert parity.tool == "LLaMA-Factory 0.9.5"
    ours = {d: sum(t.num_targets for t in items) for d, (_, items) in export.items()}
    assert parity.target_tokens == {"ideal": ours, "trainer": ours}


def test_dropped_rows_are_an_error_with_their_cause(export, bpe):
    # the second add row had consecutive user turns: LLaMA-Factory dropped it
    examples, _ = export["add"]
    examples[1] = _example(turns("user", "user", "assistant"), "pool/add/data.jsonl:2")

    def drop(document):
        add = document["datasets"][0]
        add["kept"] = [r for r in add["kept"] if r["index"] != 1]
        add["dropped"] = [{"index": 1, "reason": "dropped by its converter or processor"}]
        document["trained"] -= 1

    parity = compare_probe("llamafactory", _tool_rows(export, drop), export, {}, bpe)
    (error,) = parity.errors
    assert error.startswith(
        "LLaMA-Factory 0.9.5 would not train the mixture's volumes: add 4 -> 3 (1 consecutive "
        "user turns (turns 1 and 2))"
    )
    assert parity.to_dict()["domains"]["add"]["dropped"] == {
        "consecutive user turns (turns 1 and 2)": 1
    }


def test_a_held_out_split_is_an_error(export, bpe):
    def hold_out(document):
        document["trained"] -= 2

    (error,) = compare_probe("axolotl", _tool_rows(export, hold_out), export, {}, bpe).errors
    assert "builds a training set of 5 rows from the whole config, not the 7" in error


def test_a_system_prompt_written_into_every_row_is_named(export, bpe):
    system = bpe("<|im_start|>system\nYou are Qwen.<|im_end|>\n", add_special_tokens=False)
    prefix = list(system["input_ids"])

    def prepend(document):
        for dataset in document["datasets"]:
            for row in dataset["kept"]:
                row["input_ids"] = prefix + row["input_ids"]
                row["labels"] = [IGNORE_INDEX] * len(prefix) + row["labels"]

    parity = compare_probe("llamafactory", _tool_rows(export, prepend), export, {}, bpe)
    assert parity.errors == []
    first = parity.warnings[0]
    assert first.startswith("add: 4 of 4 rows have other input ids in LLaMA-Factory 0.9.5")
    assert "the trainer inserts '<|im_start|>system\\nYou are Qwen.<|im_end|>\\n' at the start" in (
        first
    )
    assert parity.domains[0].masks_differ == 0  # other ids: the masks are not compared
    assert len(parity.warnings) == 2  # add and code; the target tokens are the same


def test_the_newline_after_the_end_of_turn_token_is_named_and_counted(export, bpe):
    newline = bpe("\n", add_special_tokens=False)["input_ids"]

    def train_the_newline(document):  # LLaMA-Factory's masks: "{{content}}<|im_end|>\n"
        for dataset in document["datasets"][:1]:
            for row in dataset["kept"]:
                ids, labels = row["input_ids"], row["labels"]
                k = max(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
                assert ids[k] == bpe.eos_token_id and ids[k + 1 : k + 2] == newline
                labels[k + 1] = ids[k + 1]

    parity = compare_probe("llamafactory", _tool_rows(export, train_the_newline), export, {}, bpe)
    add, code = parity.domains
    assert (add.masks_differ, code.masks_differ, add.ids_differ) == (4, 0, 0)
    assert add.targets_theirs == add.targets_ours + 4
    mask, shift = parity.warnings
    assert mask == (
        "add: 4 of 4 rows are trained on other tokens in LLaMA-Factory 0.9.5 than ideal's "
        "influence step counts: the trainer also trains on '\\n' after the end-of-turn token "
        "(4 rows)"
    )
    ours, theirs = add.targets_ours, add.targets_theirs
    total, total_theirs = ours + code.targets_ours, theirs + code.targets_ours
    assert shift == (
        f"target tokens per domain, ideal -> LLaMA-Factory 0.9.5: add {ours} -> {theirs} "
        f"({(theirs - ours) / ours:+.0%}, share {ours / total:.3f} -> {theirs / total_theirs:.3f}); "
        "influence.loss token weighs domains by ideal's counts (influence.json records both)"
    )


def test_id_differences_in_words(bpe):
    ids = bpe("hello world, more text", add_special_tokens=False)["input_ids"]
    assert id_difference(ids, ids[:-2], bpe) == "the trainer cuts the row's last 2 tokens"
    first = bpe.convert_ids_to_tokens(ids[0])  # a merge of several bytes, split into them
    assert len(first) > 1
    split = [bpe.convert_tokens_to_ids(c) for c in first]
    assert id_difference(ids, split + ids[1:], bpe) == (
        f"the trainer splits {bpe.decode(ids[:1])!r} into other tokens"
    )
    assert id_difference(ids, ids[:2] + ids[3:], bpe).startswith("the trainer leaves out ")


# --- finding the tool: its executable, its bin directory, its Python -----------------------------


def _venv(root: Path, tool: str) -> Path:
    """A fake virtual environment whose `tool` script names this Python in its #! line."""
    bin_dir = root / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    script = bin_dir / tool
    # `tool -c CODE ARGS...` runs CODE with ARGS as its argv
    script.write_text(
        f"#!{sys.executable}\nimport sys\ncode = sys.argv[2]\nsys.argv = [sys.argv[0], *sys.argv[3:]]\n"
        "exec(code)\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_the_tools_bin_directory_goes_first_on_path(tmp_path):
    bin_dir = _venv(tmp_path, "axolotl")
    env = {"PATH": f"/usr/bin{os.pathsep}{bin_dir}"}
    assert (
        tool_path(["axolotl", "train", "c.yaml"], env)["PATH"] == f"{bin_dir}{os.pathsep}/usr/bin"
    )
    full = tool_path([str(bin_dir / "axolotl"), "train"], {"PATH": "/usr/bin"})
    assert full["PATH"].split(os.pathsep)[0] == str(bin_dir)  # accelerate is found beside it
    with pytest.raises(IdealError, match="'axolotl' is not on PATH .* give its full path"):
        tool_path(["axolotl"], {"PATH": "/usr/bin"})
    assert tool_python(bin_dir / "axolotl") == Path(sys.executable)
    assert probe_python(["axolotl", "x"], {"PATH": str(bin_dir)}) == (Path(sys.executable), "")
    # a wrapper (`sh -c "axolotl train ..."`): the preset's own executable on the same PATH
    assert probe_python(["sh", "-c", "x"], {"PATH": f"{bin_dir}:/bin"}, "axolotl")[0] == Path(
        sys.executable
    )
    python, why = probe_python(["nowhere"], {"PATH": str(bin_dir)})
    assert python is None and "'nowhere' is not on the command's PATH" in why


# --- each round of a preset: the check before it trains, and what influence.json records --------


@pytest.fixture()
def round_job(tmp_path, bpe):
    base = save_model_dir(tmp_path / "base", tiny_causal_lm("llama", vocab_size=len(bpe)), bpe)
    pool = make_data_dir(tmp_path / "pool", {"add": [chat(f"q{i}", f"{i}") for i in range(3)],
                                             "code": [chat(f"w{i}", "pass") for i in range(2)]})  # fmt: skip
    training = load_training_set(pool)
    write_mixture_dir(tmp_path / "round-1", training, training.mixture, data_subdir="data")
    (tmp_path / "lf.yaml").write_text(yaml.safe_dump({"template": "chatml"}))
    return TrainJob(base, tmp_path / "round-1", tmp_path / "round-1" / "model", 1, tmp_path,
                    tmp_path / "config.yaml")  # fmt: skip


def _fake_tool(monkeypatch, tmp_path, change):
    """The tool found and importable, its probe answering with ideal's rows `change`d."""
    bin_dir = _venv(tmp_path, "llamafactory-cli")
    monkeypatch.setattr(parity_run, "tool_importable", lambda backend, python: None)

    def probe(backend, config_file, python, env, timeout=0):
        data_dir = Path(yaml.safe_load(config_file.read_text())["dataset_dir"])
        from ideal.hf import load_tokenizer

        tokenizer = load_tokenizer(tmp_path / "base")
        exported = tokenize_export(data_dir, ["add", "code"], tokenizer, None)
        return _tool_rows(exported, change)

    monkeypatch.setattr(parity_run, "run_probe", probe)
    return bin_dir


def test_a_round_whose_rows_the_tool_would_drop_stops_before_training(
    monkeypatch, tmp_path, round_job
):
    def drop(document):
        document["datasets"][1]["kept"].pop()
        document["datasets"][1]["dropped"] = [{"index": 1, "reason": "?"}]

    bin_dir = _fake_tool(monkeypatch, tmp_path, drop)
    marker = tmp_path / "trained"
    command = [str(bin_dir / "llamafactory-cli"), "-c", f"open({str(marker)!r}, 'w')"]
    trainer = preset_trainer("llamafactory", tmp_path / "lf.yaml", command)
    with pytest.raises(
        IdealError, match=r"round 1: LLaMA-Factory 0.9.5 would not train .* code 2 -> 1"
    ):
        trainer.train(round_job)
    assert not marker.exists()  # the tool never ran
    record = json.loads((round_job.mixture_dir / "train.json").read_text())
    assert "would not train the mixture's volumes" in record["error"]


def test_the_trainers_target_tokens_reach_influence_json(monkeypatch, tmp_path, round_job):
    from ideal.influence.step import recorded_target_tokens

    def more_targets(document):  # every add row trains one more token
        for row in document["datasets"][0]["kept"]:
            row["labels"][-1] = row["input_ids"][-1]

    bin_dir = _fake_tool(monkeypatch, tmp_path, more_targets)
    trainer_script = (  # the base model as the trained one, saved with a chat template of its own
        "import pathlib, shutil, sys, yaml; c = yaml.safe_load(open(sys.argv[1]));"
        f"shutil.copytree({str(tmp_path / 'base')!r}, c['output_dir']);"
        "pathlib.Path(c['output_dir'], 'chat_template.jinja').write_text('{{ messages }}')"
    )
    command = [str(bin_dir / "llamafactory-cli"), "-c", trainer_script, "{config}"]
    record = preset_trainer("llamafactory", tmp_path / "lf.yaml", command).train(round_job)
    assert record["parity"]["domains"]["add"]["masks_differ"] == 3
    assert any(w.startswith("target tokens per domain") for w in record["warnings"])
    recorded = recorded_target_tokens(round_job.output_dir, None)
    assert (
        recorded is not None and recorded["differs"] and recorded["tool"] == "LLaMA-Factory 0.9.5"
    )
    add_ours, add_theirs = recorded["ideal"]["add"], recorded["trainer"]["add"]
    assert add_theirs == add_ours + 3 and recorded["trainer"]["code"] == recorded["ideal"]["code"]
    assert recorded["relative_change"]["add"] == pytest.approx(3 / add_ours)
    assert recorded_target_tokens(tmp_path / "base", None) is None  # no trainer record there
    # the trainer's own chat template is replaced by the base model's, and the record says so
    from ideal.hf import load_tokenizer

    model_template = load_tokenizer(round_job.output_dir).chat_template
    assert model_template == load_tokenizer(tmp_path / "base").chat_template
    assert any("the base model's was put back" in n for n in record["model"]["notes"])


# --- before a run: `ideal check --config` over the pool -----------------------------------------


def _run_config(tmp_path: Path, model: Path, train: Path, backend: str, base: dict) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    config = tmp_path / f"{backend}.yaml"
    config.write_text(
        yaml.safe_dump({
            "model": str(model), "train_data": str(train), "reference_data": str(train),
            "test_data": str(train),
            "train": {"backend": backend, "base_config": str(tmp_path / "base.yaml"),
                      "command": f"{tmp_path / 'nowhere' / 'tool'} {{config}}"},
        })
    )  # fmt: skip
    return config


def test_check_config_refuses_what_the_tool_would_drop_and_warns_of_long_rows(
    cli, tmp_path, round_job
):
    model = round_job.base_model
    rows = [chat("a", "1"), {"messages": turns("user", "user", "assistant")}]
    train = make_data_dir(tmp_path / "train", {"add": rows})
    result = cli("check", "--config", _run_config(tmp_path, model, train, "llamafactory", {}))
    assert result.code == 1
    assert f"{train / 'add' / 'data.jsonl'}:2: LLaMA-Factory would drop this row" in result.err
    dedup = {"dataset_exact_deduplication": True}
    result = cli("check", "--config", _run_config(tmp_path, model, train, "axolotl", dedup))
    assert result.code == 1 and "update.max_repeats is 4): remove the key" in result.err
    long = make_data_dir(tmp_path / "long", {"add": [chat("word " * 40, "1"), chat("b", "2")]})
    config = _run_config(tmp_path, model, long, "axolotl", {"sequence_len": 32})
    result = cli("check", "--config", config)
    assert result.code == 0, result.err
    (line,) = [w for w in result.out.splitlines() if "`sequence_len: 32`" in w]
    assert "1 rows are longer (add 1;" in line and "drops them from the mixture" in line
    # the tool is not installed where the command points: said, not an error
    assert "parity: not checked: train.command:" in result.out
