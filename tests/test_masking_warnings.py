"""Warnings where an external trainer renders rows or masks the loss differently from `ideal`
(backends/masking.py): one line each, naming the file and the key; in `ideal check --config`, in
each round's train.json and in the run report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ideal.backends.tools.masking import (
    axolotl_warnings,
    chat_template_family,
    injected_system,
    llamafactory_warnings,
    masking_warnings,
    model_tokenizer,
    trl_cli_warnings,
    trl_warnings,
)
from ideal.errors import IdealError
from ideal.report.run import write_report
from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir, qa_rows, require_extra

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHATML_MARKED = CHATML.replace(
    "{{ '<|im_start|>' + m['role']",
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% endif %}{{ '<|im_start|>' + m['role']",
)


def model_with(root: Path, template: str | None) -> Path:
    tokenizer = char_tokenizer(chat_template=template is not None)
    if template is not None:
        tokenizer.chat_template = template
    return save_model_dir(root, tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "chatml": model_with(root / "chatml", CHATML),
        "marked": model_with(root / "marked", CHATML_MARKED),
        "tiny": model_with(root / "tiny", "<|user|>{{ messages[0].content }}"),
        "none": model_with(root / "none", None),
    }


def test_chat_template_families_from_their_markers():
    assert chat_template_family("<|start_header_id|>user<|end_header_id|>") == "llama3"
    assert chat_template_family(CHATML) == "chatml"
    assert chat_template_family("<start_of_turn>user\n") == "gemma"
    assert chat_template_family("[INST] {{ m }} [/INST]") == "mistral"
    assert chat_template_family("<|user|>{{ m }}") is None
    assert chat_template_family(None) is None


def test_llamafactory_template_and_prompt_loss(models):
    where = "lf-base.yaml"
    (line,) = llamafactory_warnings({}, where, models["chatml"])
    assert line.startswith("lf-base.yaml: no `template`")
    (line,) = llamafactory_warnings({"template": "llama3"}, where, models["chatml"])
    assert line.startswith("lf-base.yaml: `template: llama3` does not match the model's chat")
    assert "(chatml)" in line
    assert llamafactory_warnings({"template": "chatml"}, where, models["chatml"]) == []
    # qwen writes Qwen's default system prompt into rows without one; this ChatML model does not
    (line,) = llamafactory_warnings({"template": "qwen"}, where, models["chatml"])
    assert line.startswith("lf-base.yaml: `template: qwen` writes the system prompt 'You are Qwen")
    assert line.endswith('set `default_system: ""` in the base config')
    quiet = {"template": "qwen", "default_system": ""}
    assert llamafactory_warnings(quiet, where, models["chatml"]) == []
    (line,) = llamafactory_warnings(quiet, where, models["none"])
    assert "no chat template" in line and "plain template" in line
    (line,) = llamafactory_warnings(quiet, where, models["tiny"])
    assert "of no family ideal knows" in line
    lines = llamafactory_warnings(
        {"template": "chatml", "train_on_prompt": True, "mask_history": True}, where, None
    )
    assert [line[: line.index("`", line.index("`") + 1) + 1] for line in lines] == [
        f"{where}: `template: chatml`",
        f"{where}: `train_on_prompt: true`",
        f"{where}: `mask_history: true`",
    ]
    assert "ideal's influence counts assistant tokens only" in lines[1]
    assert "could not be read" in lines[0]  # no model directory to check against


def test_axolotl_roles_inputs_and_chat_template(models):
    where = "axolotl-base.yaml"
    base = {
        "datasets": [{"path": "a.jsonl", "roles_to_train": ["user", "assistant"]},
                     {"path": "b.jsonl", "roles_to_train": ["assistant"]}],
        "train_on_inputs": True,
        "chat_template": "llama3",
    }  # fmt: skip
    lines = axolotl_warnings(base, where, models["chatml"])
    assert len(lines) == 3 and all(line.startswith(f"{where}: `") for line in lines)
    assert lines[0].startswith(f"{where}: `datasets[0].roles_to_train: ['user', 'assistant']`")
    assert "`chat_template: llama3` does not match" in lines[1]
    assert "tokenizer_default" in lines[1]
    assert lines[2].startswith(f"{where}: `train_on_inputs: true`")
    fine = {"chat_template": "chatml", "datasets": [{"roles_to_train": ["assistant"]}]}
    assert axolotl_warnings(fine, where, models["chatml"]) == []
    assert axolotl_warnings({"chat_template": "tokenizer_default"}, where, models["tiny"]) == []


QWEN25 = (  # Qwen2.5's template, shortened: a default system prompt when a row has none
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = 'You are Qwen, created by Alibaba "
    "Cloud. You are a helpful assistant.' %}{% set rest = messages %}{% endif %}"
    "{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{% for m in rest %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_a_default_system_prompt_is_found_in_the_models_template(models, tmp_path):
    qwen = model_with(tmp_path / "qwen", QWEN25)
    tokenizer = model_tokenizer(qwen)
    assert injected_system(tokenizer) == (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )
    assert injected_system(model_tokenizer(models["chatml"])) is None
    assert injected_system(model_tokenizer(models["none"])) is None  # ideal's plain template
    # the model writes what LLaMA-Factory's qwen writes: nothing to say; chatml writes none
    assert llamafactory_warnings({"template": "qwen"}, "lf.yaml", qwen) == []
    (line,) = llamafactory_warnings({"template": "chatml"}, "lf.yaml", qwen)
    assert line.startswith("lf.yaml: `template: chatml` writes no system prompt into rows")
    assert 'set `default_system: "You are Qwen, created by Alibaba Cloud.' in line


def test_trl_assistant_only_loss_and_generation_markers(models, tmp_path):
    where = "trl-base.yaml"
    (line,) = trl_cli_warnings({"assistant_only_loss": False}, where, models["marked"])
    assert line.startswith(f"{where}: `assistant_only_loss: false` trains on every token")
    # no markers and no training template of TRL's for this one: TRL would stop, so do we
    with pytest.raises(IdealError) as caught:
        trl_cli_warnings({}, where, models["chatml"])
    message = str(caught.value)
    assert message.startswith(f"{where}: `assistant_only_loss: true` (absent: ideal sets it true)")
    assert "{% generation %}...{% endgeneration %}" in message  # the fix
    assert "train.backend: trl" in message and "\n" not in message
    assert trl_cli_warnings({}, where, models["marked"]) == []
    assert trl_cli_warnings({"assistant_only_loss": True}, where, models["marked"]) == []
    # a template TRL knows: it swaps in its training template, which renders rows the same
    qwen2_5_chat_template = require_extra("trl.chat_template_utils", "trl").qwen2_5_chat_template

    known = model_with(tmp_path / "known", qwen2_5_chat_template)
    assert trl_cli_warnings({}, where, known) == []
    (line,) = trl_warnings({"loss_type": "dft"}, "run.yaml")
    assert line.startswith("run.yaml: `train.trl_args.loss_type: dft`")
    with pytest.raises(IdealError, match="run.yaml: `train.trl_args.assistant_only_loss: true`"):
        trl_warnings({"loss_type": "dft", "assistant_only_loss": True}, "run.yaml")
    assert trl_warnings({"loss_type": "nll", "packing": True}, "run.yaml") == []
    assert masking_warnings("builtin", None, "run.yaml", models["chatml"]) == []
    assert masking_warnings("command", None, "run.yaml", models["chatml"]) == []


def test_ideal_check_prints_the_trainer_warnings(cli, models, tmp_path):
    train = make_data_dir(tmp_path / "train", {"add": qa_rows("add", 3)})
    base = tmp_path / "lf-base.yaml"
    base.write_text(yaml.safe_dump({"template": "llama3", "train_on_prompt": True}))
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump({
            "model": str(models["chatml"]), "train_data": str(train),
            "reference_data": str(train), "test_data": str(train),
            "train": {"backend": "llamafactory", "base_config": str(base)},
        })
    )  # fmt: skip
    result = cli("check", "--config", config)
    assert result.code == 0, result.err
    lines = [line for line in result.out.splitlines() if line.startswith("warning: ")]
    assert len(lines) == 2
    assert lines[0].startswith(f"warning: {base}: `template: llama3` does not match")
    assert lines[1].startswith(f"warning: {base}: `train_on_prompt: true`")
    assert "target tokens" in result.out  # the data table, rendered by the config's model
    trl = tmp_path / "trl.yaml"
    trl.write_text(
        yaml.safe_dump({
            "model": str(models["chatml"]), "train_data": str(train),
            "reference_data": str(train), "test_data": str(train),
            "train": {"backend": "trl", "trl_args": {"loss_type": "dft"}},
        })
    )  # fmt: skip
    result = cli("check", train, "--config", trl)
    assert result.code == 0, result.err
    assert f"warning: {trl}: `train.trl_args.loss_type: dft`" in result.out
    # TRL's collator over ideal's rows, in this process: the same ids and labels (parity.py)
    assert "parity with TRL" in result.out and "ids differ" in result.out
    assert "have other input ids" not in result.out and "other tokens" not in result.out
    plain = cli("check", train)
    assert plain.code == 0 and "warning:" not in plain.out


def test_the_report_lists_the_trainers_warnings(tmp_path):
    run = tmp_path / "run"
    rounds = []
    for k in range(2):
        (run / f"round-{k}").mkdir(parents=True)
        warnings = ["lf-base.yaml: `train_on_prompt: true` puts loss on prompt tokens"]
        if k == 1:
            warnings.append("lf-base.yaml: `template: llama3` does not match <this> & that")
        (run / f"round-{k}" / "train.json").write_text(json.dumps({"warnings": warnings}))
        rounds.append({
            "round": k, "volumes": {"a": 4}, "test_accuracy": {"c": 0.5},
            "test_accuracy_mean": 0.5, "test_accuracy_worst": 0.5, "reference_loss": {"c": 1.0},
            "reference_loss_mean": 1.0, "predicted_reference_loss_change": None,
            "realised_reference_loss_change": None,
            "seconds": {"train": 1.0, "influence": None, "eval": 1.0},
        })  # fmt: skip
    (run / "summary.json").write_text(json.dumps({"rounds": rounds}))
    page = write_report(run).read_text()
    assert "<h2>Trainer warnings</h2>" in page
    assert "`train_on_prompt: true` puts loss on prompt tokens <small>(round 0, 1)</small>" in page
    assert "does not match &lt;this&gt; &amp; that <small>(round 1)</small>" in page
    (run / "round-0" / "train.json").write_text(json.dumps({"warnings": []}))
    (run / "round-1" / "train.json").write_text(json.dumps({"backend": "builtin"}))
    assert "Trainer warnings" not in write_report(run).read_text()
