"""The external trainers for real: LLaMA-Factory 0.9.5 and axolotl 0.19.0 from the virtual
environments `make backends` builds, and TRL's CLI from this one (`make backends-test`).

For each: `ideal check --config`'s parity check (the export through the tool's own data pipeline,
row by row against ideal's rows) with its numbers pinned, then a one-round `ideal run` through the
preset on a tiny byte-level BPE / ChatML Llama (built here; no hub, no network).

Marked `tools`: `make test` leaves them out (pyproject's addopts). Where a tool cannot be run the
test skips with the reason, and fails instead under `make backends-test` (IDEAL_TOOLS_REQUIRED)
or on CI (CI=true): a tool test is never skipped silently.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from ideal.run.config import load_config
from ideal.run.preflight import config_parity
from ideal.tiny import byte_bpe_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import require_extra, write_jsonl

pytestmark = [pytest.mark.tools, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
EXECUTABLES = {"llamafactory": "llamafactory-cli", "axolotl": "axolotl", "trl-cli": "trl"}
SUBCOMMANDS = {"llamafactory": "train {config}", "axolotl": "train {config}",
               "trl-cli": "sft --config {config}"}  # fmt: skip

#: ChatML with {% generation %} markers around each answer and its end-of-turn token: what TRL's
#: assistant_only_loss needs of a template it has no training template for
MARKED = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}"
    "{% endgeneration %}{{ '\\n' }}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: the recipe of each tool's base config: a few steps of full fine-tuning on CPU, nothing saved
#: but the model
RECIPES = {
    "llamafactory": {"stage": "sft", "finetuning_type": "full", "template": "chatml",
                     "cutoff_len": 256, "per_device_train_batch_size": 2, "max_steps": 2,
                     "learning_rate": 1.0e-4, "report_to": "none", "save_strategy": "no"},
    "axolotl": {"sequence_len": 256, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
                "max_steps": 2, "learning_rate": 1.0e-4, "optimizer": "adamw_torch",
                "lr_scheduler": "constant", "chat_template": "tokenizer_default",
                "save_strategy": "no", "bf16": False, "fp16": False, "tf32": False},
    "trl-cli": {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1.0e-4,
                "report_to": "none", "save_strategy": "no", "use_cpu": True, "bf16": False},
}  # fmt: skip
TELEMETRY_OFF = {"AXOLOTL_DO_NOT_TRACK": "1", "DO_NOT_TRACK": "1"}  # offline: no upload retries


def unavailable(why: str) -> None:
    """Skip with the reason; fail where the tools must run."""
    if os.environ.get("IDEAL_TOOLS_REQUIRED") or os.environ.get("CI") == "true":
        pytest.fail(f"{why} (the tool tests must run here: make backends)", pytrace=False)
    pytest.skip(why)


def tool_command(backend: str) -> str:
    """The preset's command with the tool's own executable (its venv: `make backends`)."""
    if backend == "trl-cli":  # TRL's CLI from this environment (the `trl` extra)
        bin_dir = Path(sys.executable).parent
    else:
        default = ROOT / f".venv-{backend}"
        bin_dir = Path(os.environ.get(f"IDEAL_{backend.upper()}_VENV", default)) / "bin"
        if not bin_dir.is_absolute():
            bin_dir = ROOT / bin_dir
    executable = bin_dir / EXECUTABLES[backend]
    if not executable.is_file():
        unavailable(f"{executable} not found: `make backends` builds it")
    return f"{executable} {SUBCOMMANDS[backend]}"


def chat(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer}], "answer": answer}  # fmt: skip


def rows(domain: str, n: int) -> list[dict]:
    if domain == "add":
        return [chat(f"What is {i}+{i}?", f"{2 * i}") for i in range(n)]
    if domain == "code":
        return [chat(f"Write a function {i}.", f"def f{i}(a, b):\n    return a + b")
                for i in range(n)]  # fmt: skip
    return [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": f"Hello {i}."},
                          {"role": "user", "content": "Again, in more words please"},
                          {"role": "assistant", "content": "Hello again, at more length."}],
             "answer": "x"} for i in range(n)]  # fmt: skip


#: rows per domain of train/ (unequal: round 1, the uniform probe, trains another mixture),
#: and the assistant turns each row has
SIZES = {"add": 10, "chat": 8, "code": 5}
TURNS = {"add": 1, "chat": 2, "code": 1}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tools")
    for name, template in (("base", None), ("marked", MARKED)):
        tokenizer = (
            byte_bpe_tokenizer() if template is None else byte_bpe_tokenizer(chat_template=template)
        )
        model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1)
        save_model_dir(root / name, model, tokenizer)
    for split, scale in (("train", 1), ("reference", 0), ("test", 0)):
        for domain, n in SIZES.items():
            write_jsonl(root / split / domain / "data.jsonl", rows(domain, n if scale else 3))
    return root


def run_config(
    workspace: Path, out: Path, backend: str, base: dict, model: str = "base", **train
) -> Path:
    command = tool_command(backend)
    (out / "base.yaml").parent.mkdir(parents=True, exist_ok=True)
    (out / "base.yaml").write_text(yaml.safe_dump(base))
    config = {
        "model": str(workspace / model),
        "train_data": str(workspace / "train"),
        "reference_data": str(workspace / "reference"),
        "test_data": str(workspace / "test"),
        "rounds": 1,
        "tolerance": 0.0,  # round 1 trains whatever step the tiny model's influence asks for
        # one step, every sensitivity whole (docs/method.md's): the tool trains round 1 whatever
        # the tiny model's noise (candidate steps would keep the base when none beats it)
        "update": {"candidates": [], "min_z": 0.0},
        "train": {"backend": backend, "base_config": str(out / "base.yaml"), "command": command,
                  "env": TELEMETRY_OFF, "parity": "on", **train},
    }  # fmt: skip
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def parity_of(config: Path):
    parity, why = config_parity(load_config(config), config)
    if parity is None:
        unavailable(f"no parity check: {why}")
    return parity


def check_run(cli, config: Path, out: Path) -> dict:
    """A one-round run through the preset: each round checked and trained by the tool; returns
    round 0's influence.json."""
    result = cli("run", config, "--out", out / "run")
    assert result.code == 0, result.err[-3000:]
    for k in (0, 1):
        record = json.loads((out / "run" / f"round-{k}" / "train.json").read_text())
        assert record["exit_code"] == 0 and "skipped" not in record["parity"], record
        assert record["parity"]["errors"] == []
    return json.loads((out / "run" / "round-0" / "influence.json").read_text())


def test_llamafactory(cli, workspace, tmp_path):
    config = run_config(workspace, tmp_path, "llamafactory", RECIPES["llamafactory"])
    parity = parity_of(config)
    assert parity.tool == "LLaMA-Factory 0.9.5" and parity.errors == []
    for d in parity.domains:  # the same ids; every row also trains the "\n" after <|im_end|>
        assert (d.rows, d.kept, d.ids_differ, d.masks_differ) == (SIZES[d.domain],) * 2 + (
            0,
            d.rows,
        )
        assert d.targets_theirs - d.targets_ours == SIZES[d.domain] * TURNS[d.domain]
        assert list(d.mask_causes) == [
            "the trainer also trains on '\\n' after the end-of-turn token"
        ]
    # `template: qwen` writes its default system prompt into every row: said before, named after
    qwen = run_config(workspace, tmp_path / "qwen", "llamafactory",
                      {**RECIPES["llamafactory"], "template": "qwen"})  # fmt: skip
    result = cli("check", "--config", qwen)
    assert result.code == 0, result.err
    assert "`template: qwen` writes the system prompt 'You are Qwen" in result.out
    parity = parity_of(qwen)
    # every row without a system turn of its own (the chat rows have one)
    assert {d.domain: d.ids_differ for d in parity.domains} == {"add": 10, "chat": 0, "code": 5}
    assert "inserts '<|im_start|>system\\nYou are Qwen" in parity.warnings[0]
    influence = check_run(cli, config, tmp_path)
    # LLaMA-Factory saves its own ChatML template with the model: the base model's is put back
    record = json.loads((tmp_path / "run" / "round-0" / "train.json").read_text())
    assert any("the base model's was put back" in n for n in record["model"]["notes"])
    saved = (tmp_path / "run" / "round-0" / "model" / "chat_template.jinja").read_text()
    assert saved == (workspace / "base" / "chat_template.jinja").read_text()
    recorded = influence["trainer_target_tokens"]
    assert recorded["differs"] and recorded["tool"] == "LLaMA-Factory 0.9.5"
    report = (tmp_path / "run" / "report.html").read_text()
    assert "target tokens per domain, ideal -&gt; LLaMA-Factory 0.9.5: add 25 -&gt; 35" in report
    for domain, n in SIZES.items():
        assert recorded["trainer"][domain] - recorded["ideal"][domain] == n * TURNS[domain]


def test_axolotl(cli, workspace, tmp_path):
    config = run_config(workspace, tmp_path, "axolotl", RECIPES["axolotl"])
    parity = parity_of(config)
    assert parity.tool == "axolotl 0.19.0" and parity.errors == [] and parity.warnings == []
    for d in parity.domains:  # ids and trained tokens: the same, row by row
        assert (d.rows, d.kept, d.ids_differ, d.masks_differ) == (SIZES[d.domain],) * 2 + (0, 0)
        assert d.targets_theirs == d.targets_ours
    # a sequence_len below the chat rows' length: axolotl drops them, and that is an error
    short = run_config(workspace, tmp_path / "short", "axolotl",
                       {**RECIPES["axolotl"], "sequence_len": 40})  # fmt: skip
    result = cli("check", "--config", short)
    assert result.code == 1
    assert "`sequence_len: 40`: 8 rows are longer (chat 8;" in result.out
    assert "would not train the mixture's volumes: chat 8 -> 0 (8 longer than sequence_len 40)" in (
        result.err
    )
    influence = check_run(cli, config, tmp_path)
    assert influence["trainer_target_tokens"]["differs"] is False


def test_trl_cli(cli, workspace, tmp_path):
    require_extra("trl", "trl")
    config = run_config(workspace, tmp_path, "trl-cli", RECIPES["trl-cli"], model="marked")
    parity = parity_of(config)
    assert parity.tool.startswith("TRL ") and parity.errors == [] and parity.warnings == []
    for d in parity.domains:
        assert (d.rows, d.kept, d.ids_differ, d.masks_differ) == (SIZES[d.domain],) * 2 + (0, 0)
    influence = check_run(cli, config, tmp_path)
    assert influence["trainer_target_tokens"]["differs"] is False
