"""Backends (issue 19): command templates, what an external trainer produced, scores files, the
OpenCompass parser, presets, the config keys; and a whole `ideal run` whose trainer and evaluator
are commands (a fake trainer that calls `ideal train`, a fake evaluator), failing once and resumed."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from ideal.backends.evaluation.opencompass import newest_summary, parse_summary
from ideal.backends.protocol import TrainJob, find_trained_model, read_scores
from ideal.backends.tools.external import (
    CommandTrainer,
    child_environment,
    fill,
    run_command,
    split_command,
)
from ideal.backends.tools.presets import preset_trainer
from ideal.errors import IdealError
from ideal.run.config import load_config
from ideal.run.loop import run_loop
from tests.helpers import require_extra
from tests.test_loop import TINY

# --- command templates -------------------------------------------------------------------------


def test_placeholders_fill_each_argument_and_unknown_ones_are_named():
    argv = split_command("train.py --data '{data_dir}/x y' --n {{literal}}", "train.command")
    assert fill(argv, {"data_dir": "/d"}, "train.command") == [
        "train.py",
        "--data",
        "/d/x y",
        "--n",
        "{literal}",
    ]
    with pytest.raises(IdealError, match=r"unknown placeholder \{modle\}.*\{data_dir\}"):
        fill(["{modle}"], {"data_dir": "/d"}, "train.command")


def test_child_environment_exports_ideal_values_and_drops_the_process_group(monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    env = child_environment({"data_dir": "/d", "round": "2"}, {"FORCE_TORCHRUN": "1"})
    assert env["IDEAL_DATA_DIR"] == "/d" and env["IDEAL_ROUND"] == "2"
    assert env["FORCE_TORCHRUN"] == "1"
    assert not {"MASTER_PORT", "RANK", "TORCHELASTIC_RUN_ID"} & set(env)


def test_a_timeout_ends_the_command_and_is_recorded(tmp_path):
    script = "import subprocess, sys, time; print('started', flush=True); time.sleep(60)"
    start = time.perf_counter()
    result = run_command([sys.executable, "-c", script], tmp_path / "x.log", {}, timeout=1.0)
    assert result.timed_out and result.exit_code is None
    assert time.perf_counter() - start < 30
    text = (tmp_path / "x.log").read_text()
    assert "started" in text and "timed out" in text


# --- what an external trainer produced ---------------------------------------------------------


def _touch(path: Path, text: str = "{}") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_full_model_an_adapter_and_axolotls_merged_are_accepted(tmp_path):
    _touch(tmp_path / "full" / "config.json")
    _touch(tmp_path / "full" / "model-00001-of-00002.safetensors", "")
    assert find_trained_model(tmp_path / "full").kind == "full"
    _touch(tmp_path / "lora" / "adapter_config.json")
    _touch(tmp_path / "lora" / "adapter_model.safetensors", "")
    _touch(tmp_path / "lora" / "checkpoint-10" / "trainer_state.json")
    found = find_trained_model(tmp_path / "lora")
    assert (found.kind, found.path) == ("adapter", tmp_path / "lora")
    _touch(tmp_path / "axolotl" / "adapter_config.json")  # the adapter, then merge-lora's merged/
    _touch(tmp_path / "axolotl" / "adapter_model.safetensors", "")
    _touch(tmp_path / "axolotl" / "merged" / "config.json")
    _touch(tmp_path / "axolotl" / "merged" / "model.safetensors", "")
    found = find_trained_model(tmp_path / "axolotl")
    assert (found.kind, found.path) == ("full", tmp_path / "axolotl" / "merged")


def test_sharded_deepspeed_and_fsdp_checkpoints_are_refused_with_the_fix(tmp_path):
    _touch(tmp_path / "ds" / "config.json")
    _touch(tmp_path / "ds" / "global_step8" / "zero_pp_rank_0_mp_rank_00_model_states.pt", "")
    with pytest.raises(IdealError, match="DeepSpeed.*stage3_gather_16bit_weights_on_model_save"):
        find_trained_model(tmp_path / "ds")
    _touch(tmp_path / "fsdp" / "config.json")
    _touch(tmp_path / "fsdp" / "pytorch_model_fsdp_0" / "__0_0.distcp", "")
    with pytest.raises(IdealError, match="FSDP.*FULL_STATE_DICT"):
        find_trained_model(tmp_path / "fsdp")
    (tmp_path / "empty").mkdir()
    with pytest.raises(IdealError, match="wrote nothing"):
        find_trained_model(tmp_path / "empty")
    _touch(tmp_path / "junk" / "notes.txt")
    with pytest.raises(IdealError, match="no model there"):
        find_trained_model(tmp_path / "junk")


# --- scores ------------------------------------------------------------------------------------


def test_the_scores_file_format(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(
        json.dumps(
            {
                "capabilities": {
                    "math": {"score": 0.41, "metric": "em", "n": 500, "stderr": 0.02},
                    "code": 0.25,
                }
            }
        )
    )
    scores = read_scores(path)
    assert (scores["math"].score, scores["math"].n, scores["math"].stderr) == (0.41, 500, 0.02)
    assert scores["code"].score == 0.25 and scores["code"].metric is None
    path.write_text(
        json.dumps({"capabilities": {"math": {"score": 3.1, "higher_is_better": False}}})
    )
    with pytest.raises(IdealError, match="lower-is-better"):
        read_scores(path)
    path.write_text(json.dumps({"capabilities": {"math": {"score": "high"}}}))
    with pytest.raises(IdealError, match=r"capabilities\.math: score must be a finite number"):
        read_scores(path)
    with pytest.raises(IdealError, match="did not write"):
        read_scores(tmp_path / "missing.json")


# The layout OpenCompass's default summarizer writes (summarizers/default.py): a header of
# dataset,version,metric,mode,<model abbrs>, values in percent with two decimals, "-" for a
# missing result, and a dataset whose result is missing written as a row of dashes.
OPENCOMPASS_SUMMARY = """\
dataset,version,metric,mode,round-1_hf,base_hf
gsm8k,1d7fe4,accuracy,gen,57.87,41.20
bbh,5b92b0,naive_average,gen,44.10,39.00
humaneval,8e312c,humaneval_pass@1,gen,-,12.80
ifeval,-,-,-,-,-
mmlu,4d595a,accuracy,ppl,60.00,58.00
mmlu,4d595a,accuracy_stderr,ppl,1.00,1.00
"""


def test_the_opencompass_summary_parser(tmp_path):
    older = tmp_path / "20260101_000000" / "summary" / "summary_20260101_000000.csv"
    newer = tmp_path / "20260102_000000" / "summary" / "summary_20260102_000000.csv"
    _touch(older, OPENCOMPASS_SUMMARY.replace("57.87", "1.00"))
    _touch(newer, OPENCOMPASS_SUMMARY)
    path = newest_summary(tmp_path)
    assert path == newer
    scores = parse_summary(
        path,
        {
            "math": {"dataset": "gsm8k", "model": "round-1_hf"},
            "reasoning": {"dataset": "bbh", "model": "round-1_hf", "scale": 1},
            "knowledge": {"dataset": "mmlu", "metric": "accuracy", "model": "base_hf"},
        },
    )
    assert scores["math"].score == pytest.approx(0.5787)
    assert scores["reasoning"].score == pytest.approx(44.10)
    assert scores["knowledge"].score == pytest.approx(0.58)
    assert scores["knowledge"].metric == "accuracy"
    with pytest.raises(IdealError, match="several model columns"):
        parse_summary(path, {"math": {"dataset": "gsm8k"}})
    with pytest.raises(IdealError, match="no result for humaneval"):
        parse_summary(path, {"code": {"dataset": "humaneval", "model": "round-1_hf"}})
    with pytest.raises(IdealError, match="no row for dataset 'ifeval'"):
        parse_summary(path, {"if": {"dataset": "ifeval", "model": "round-1_hf"}})
    with pytest.raises(IdealError, match="several metrics"):
        parse_summary(path, {"k": {"dataset": "mmlu", "model": "base_hf"}})


# --- presets -----------------------------------------------------------------------------------


def _export_job(tmp_path: Path) -> TrainJob:
    """A round directory with a two-domain mixture, as the loop writes it."""
    from ideal.data.mixture import Mixture
    from ideal.data.mixture_io import load_training_set, write_mixture_dir
    from tests.helpers import make_data_dir, qa_rows

    pool = make_data_dir(tmp_path / "pool", {"add": qa_rows("add", 4), "sub": qa_rows("sub", 3)})
    training = load_training_set(pool)
    counts = {"add": np.array([2, 1, 0, 1]), "sub": np.array([1, 1, 1])}
    mixture = Mixture(counts, seed=0, round=1)
    write_mixture_dir(tmp_path / "round-1", training, mixture, data_subdir="data")
    (tmp_path / "base").mkdir()
    return TrainJob(
        tmp_path / "base",
        tmp_path / "round-1",
        tmp_path / "round-1" / "model",
        1,
        tmp_path,
        tmp_path / "config.yaml",
    )


def _rendered(tmp_path: Path, preset: str, base: dict) -> tuple[dict, list[str], list[str]]:
    """Render `preset` over `base` with a recording command; returns (yaml, argv, warnings)."""
    job = _export_job(tmp_path)
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    recorder = tmp_path / "argv.json"
    command = [
        sys.executable,
        "-c",
        f"import json, sys; json.dump(sys.argv[1:], open({str(recorder)!r}, 'w'))",
        "{config}",
    ]
    # the recorder is no tool: nothing to compare rows with (backends/tools/parity.py)
    trainer = preset_trainer(preset, tmp_path / "base.yaml", command, parity="off")
    with pytest.raises(IdealError, match="wrote nothing"):  # the recorder trains nothing
        trainer.train(job)
    record = json.loads((job.mixture_dir / "train.json").read_text())
    assert record["backend"] == preset and record["loss"] == "token"
    assert record["attempts"][0]["exit_code"] == 0
    config = yaml.safe_load((job.mixture_dir / "trainer.yaml").read_text())
    return config, json.loads(recorder.read_text()), record["warnings"]


def test_llamafactory_preset_renders_the_round_and_warns_about_its_template(tmp_path):
    base = {"stage": "sft", "template": "llama3", "finetuning_type": "lora", "max_samples": 100}
    config, argv, warnings = _rendered(tmp_path, "llamafactory", base)
    export = tmp_path / "round-1" / "export"
    assert argv == [str((tmp_path / "round-1" / "trainer.yaml").resolve())]
    assert config["dataset_dir"] == str(export.resolve())
    assert config["dataset"] == "ideal_add,ideal_sub" and config["mix_strategy"] == "concat"
    assert config["model_name_or_path"] == str((tmp_path / "base").resolve())
    assert config["finetuning_type"] == "lora" and "max_samples" not in config
    info = json.loads((export / "dataset_info.json").read_text())
    assert info["ideal_add"]["file_name"] == "add.jsonl"
    assert len((export / "add.jsonl").read_text().splitlines()) == 4  # the volume, repeated rows
    assert any(f"{tmp_path / 'base.yaml'}: `template: llama3`" in w for w in warnings)
    assert any("max_samples" in w for w in warnings)


def test_axolotl_and_trl_cli_presets_patch_datasets_and_masking(tmp_path):
    base = {"chat_template": "chatml", "train_on_inputs": True, "val_set_size": 0.05}
    config, _, warnings = _rendered(tmp_path / "a", "axolotl", base)
    assert [Path(d["path"]).name for d in config["datasets"]] == ["add.jsonl", "sub.jsonl"]
    assert all(d["roles_to_train"] == ["assistant"] for d in config["datasets"])
    assert config["base_model"] == str((tmp_path / "a" / "base").resolve())
    for key in ("chat_template: chatml", "train_on_inputs", "val_set_size"):
        assert any(key in w for w in warnings), key
    config, _, warnings = _rendered(tmp_path / "t", "trl-cli", {"dataset_name": "x/y", "lr": 1})
    assert config["assistant_only_loss"] is True and "dataset_name" not in config
    assert [d["columns"] for d in config["datasets"]] == [["messages"], ["messages"]]
    assert config["output_dir"].endswith("trainer-output")


# --- config ------------------------------------------------------------------------------------


def test_backend_keys_in_the_run_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(TINY)
    config = load_config(path, ["train.backend=command", "train.command=run.sh {model}"])
    assert config.train.command == "run.sh {model}"
    config = load_config(path, ["train.backend=command", "train.command=[run.sh, '{model}']"])
    assert config.train.command == ("run.sh", "{model}")
    assert config.train.settings().max_steps == 30  # the loop's settings alone
    with pytest.raises(IdealError, match="train.backend must be one of"):
        load_config(path, ["train.backend=deepspeed"])
    with pytest.raises(IdealError, match="give train.command"):
        load_config(path, ["train.backend=command"])
    with pytest.raises(IdealError, match="give train.base_config"):
        load_config(path, ["train.backend=axolotl"])
    with pytest.raises(IdealError, match="eval.tasks"):
        load_config(path, ["eval.backend=lm-eval"])
    own = {"model": "m", "train_data": "t", "reference_data": "r"}
    with pytest.raises(IdealError, match="test_data"):
        load_config(None, [], base=own)
    evaluated = load_config(None, ["eval.backend=command", "eval.command=x {scores}"], base=own)
    assert evaluated.test_data is None


# --- a whole run with a command trainer and a command evaluator ---------------------------------

FAKE_TRAINER = """\
import json, os, shutil, sys
from pathlib import Path

model, data, out, round_ = sys.argv[1:5]
assert os.environ["IDEAL_DATA_DIR"] == data and os.environ["IDEAL_OUTPUT_DIR"] == out
assert os.environ["IDEAL_ROUND"] == round_ and os.environ["IDEAL_MODEL"] == model
print(f"fake trainer: round {round_}", flush=True)
marker = Path(os.environ["FAKE_FAIL_ONCE"])
if round_ == "1" and not marker.exists():
    marker.write_text("failed once")
    print("fake trainer: failing on purpose", flush=True)
    sys.exit(3)
work = Path(out).parent / "fake-data"  # `ideal train` reads <dir>/<domain>/*.jsonl
shutil.rmtree(work, ignore_errors=True)
for file in sorted(Path(data).glob("*.jsonl")):
    (work / file.stem).mkdir(parents=True)
    shutil.copy(file, work / file.stem / "data.jsonl")
from ideal.cli import main

sys.exit(main(["train", "--model", model, "--train", str(work), "--out", out, "--max-steps", "6",
               "--lr", "3e-3", "--batch-size", "8", "--loss-normalization", "token"]))
"""

FAKE_EVALUATOR = """\
import json, os, sys
from pathlib import Path

model, scores = sys.argv[1:3]
assert (Path(model) / "model.safetensors").is_file(), model
k = int(os.environ["IDEAL_ROUND"])
json.dump({"capabilities": {"add": {"score": 0.1 * (k + 1), "metric": "fake", "n": 8},
                            "reverse": 0.5}}, open(scores, "w"))
"""


@pytest.mark.slow
def test_a_run_with_a_command_trainer_and_evaluator_fails_once_and_resumes(tmp_path):
    (tmp_path / "fake_train.py").write_text(FAKE_TRAINER)
    (tmp_path / "fake_eval.py").write_text(FAKE_EVALUATOR)
    (tmp_path / "c.yaml").write_text(TINY)
    marker = tmp_path / "failed-once"
    train = f"{sys.executable} {tmp_path / 'fake_train.py'} {{model}} {{data_dir}} {{output_dir}} {{round}}"
    overrides = [
        "rounds=1",
        "train.backend=command",
        f"train.command={train}",
        f"train.env={{FAKE_FAIL_ONCE: '{marker}'}}",
        "eval.backend=command",
        f"eval.command={sys.executable} {tmp_path / 'fake_eval.py'} {{model}} {{scores}}",
    ]
    config = load_config(tmp_path / "c.yaml", overrides)
    run = tmp_path / "run"
    with pytest.raises(IdealError) as failed:
        run_loop(config, run)
    message = str(failed.value)
    assert "round 1: the trainer exited with code 3" in message
    assert "fake trainer: failing on purpose" in message  # the log's last lines
    assert (run / "round-0" / "metrics.json").is_file() and not (run / "round-1" / "model").exists()

    summary = run_loop(config, run, resume=True).to_json()
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    for k in (0, 1):
        here = run / f"round-{k}"
        record = json.loads((here / "train.json").read_text())
        assert record["backend"] == "command" and record["loss"] == "token"
        assert record["exit_code"] == 0 and record["seconds"] > 0
        assert record["command"][2:] == [
            str((run / "suite" / "base").resolve()),
            str((here / "export").resolve()),
            str((here / "trainer-output").resolve()),
            str(k),
        ]
        assert [a["exit_code"] for a in record["attempts"]] == ([0] if k == 0 else [3, 0])
        assert f"fake trainer: round {k}" in (here / "train.log").read_text()
        assert record["model"]["kind"] == "full"
        assert (here / "model" / "model.safetensors").is_file()
        volumes = json.loads((here / "mixture.json").read_text())["domains"]
        for domain, entry in volumes.items():  # the trainer saw the round's volumes
            rows = (here / "export" / f"{domain}.jsonl").read_text().splitlines()
            assert len(rows) == entry["volume"]
        metrics = json.loads((here / "metrics.json").read_text())
        add = metrics["capabilities"]["add"]
        assert add["test_accuracy"] == pytest.approx(0.1 * (k + 1)) and add["scorer"] == "command"
        assert add["test_scored"] == 8 and add["reference_loss"] > 0 and add["test_loss"] > 0
        assert metrics["test_accuracy_mean"] == pytest.approx((0.1 * (k + 1) + 0.5) / 2)
        assert summary["rounds"][k]["seconds"]["train"] == pytest.approx(record["seconds"])
    assert (run / "round-0" / "influence.json").is_file() and (run / "report.html").is_file()


def test_a_trainer_that_is_not_found_fails_with_one_line(tmp_path):
    job = _export_job(tmp_path)
    trainer = CommandTrainer(["no-such-trainer-19", "{config}"])
    with pytest.raises(IdealError, match="cannot run 'no-such-trainer-19'"):
        trainer.train(job)


# --- TRL and lm-eval in this process (optional extras; `make test` installs them) ---------------


@pytest.mark.slow
def test_trl_trains_on_ideals_tokens_with_the_token_mean_over_the_whole_step(tmp_path):
    require_extra("trl", "trl")
    import torch

    from ideal.backends.tools.trl_sft import TrlTrainer
    from ideal.backends.training.builtin import TrainSettings
    from ideal.data.rows import load_domains, tokenize_examples
    from ideal.hf import load_causal_lm
    from ideal.lm import collate, example_losses, token_nll
    from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm
    from tests.helpers import make_data_dir, qa_rows

    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=16, num_layers=1)
    base = save_model_dir(tmp_path / "base", model, tokenizer)
    rows = {  # answers of different lengths: the token mean is not the mean of example means
        "add": qa_rows("add", 5),
        "copy": [{"prompt": f"copy {i}", "completion": "ab" * (i + 2)} for i in range(3)],
    }
    data = make_data_dir(tmp_path / "train", rows)
    examples = [e for d in load_domains(data).values() for e in d.examples]
    items, _ = tokenize_examples(examples, tokenizer)
    batch = collate(items, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        nll, mask = token_nll(logits, batch.labels)
        token_mean = float(nll.sum() / mask.sum())
        example_mean = float(example_losses(logits, batch.labels).mean())
    assert abs(token_mean - example_mean) > 1e-3  # the two objectives are told apart here

    # one step = all 8 examples, as one batch or as 2 micro-batches of 4 (LoRA starts at the base)
    for batch_size, grad_accum, lora in ((8, 1, False), (4, 2, True)):
        settings = TrainSettings(
            max_steps=2, lr=1e-2, batch_size=batch_size, grad_accum=grad_accum, lora=lora
        )
        out = tmp_path / f"model-{batch_size}"
        job = TrainJob(base, data, out, 0, tmp_path, tmp_path / "config.yaml")
        record = TrlTrainer(settings).train(job)
        assert record["loss"] == "token" and record["steps"] == 2
        history = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
        # float32 sums over ~100 tokens in other batch shapes: round-off well below 1e-5
        assert history[0]["loss"] == pytest.approx(token_mean, rel=1e-5)
        assert json.loads((out / "train_settings.json").read_text())["seconds"] > 0
        trained = load_causal_lm(out)
        if lora:
            adapter = json.loads((out / "adapter_config.json").read_text())
            assert adapter["base_model_name_or_path"] == str(base.resolve())
        else:
            before = dict(model.named_parameters())
            changed = [n for n, p in trained.named_parameters() if not torch.equal(p, before[n])]
            assert changed  # two steps moved the weights
    assert not (tmp_path / "model-8.partial").exists()


LM_EVAL_TASK = """\
task: toy_add
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}} ="
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.mark.slow
def test_lm_eval_scores_a_local_task_offline_and_its_results_file_parses(tmp_path):
    require_extra("lm_eval", "lm-eval")
    import torch

    from ideal.artifacts import read_json
    from ideal.backends.evaluation.lmeval import LmEvalEvaluator, newest_results, parse_results
    from ideal.backends.protocol import EvalJob
    from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm

    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=16, num_layers=1, seed=4)
    model_dir = save_model_dir(tmp_path / "model", model, tokenizer)
    docs = [
        {"question": f"{i}+{i}", "choices": [str(2 * i), str(2 * i + 1), "x"], "label": i % 3}
        for i in range(8)
    ]
    data = tmp_path / "tasks" / "toy_add.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    task = LM_EVAL_TASK.format(data=data, cache=tmp_path / "hf-datasets")
    (tmp_path / "tasks" / "toy_add.yaml").write_text(task)

    evaluator = LmEvalEvaluator(
        {"add": {"task": "toy_add", "metric": "acc"}},
        str(tmp_path / "tasks"),
        batch_size=4,
        include_defaults=False,  # indexing lm-eval's thousands of shipped tasks takes ~30 s
    )
    job = EvalJob(model_dir, model_dir, tmp_path / "eval", 0, tmp_path, tmp_path / "c.yaml", None)
    scores = evaluator.evaluate(job)

    # the same accuracy from our own forward passes: the choice " <text>" after the context
    # whose summed log-likelihood is largest (lm-eval's multiple_choice `acc`)
    def loglik(context: str, continuation: str) -> float:
        ids = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
        n = len(tokenizer(context, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        return float(sum(logp[t - 1, ids[t]] for t in range(n, len(ids))))

    right = [
        max(range(3), key=lambda c, d=d: loglik(f"{d['question']} =", " " + d["choices"][c]))
        == d["label"]
        for d in docs
    ]
    assert scores["add"].score == pytest.approx(sum(right) / len(docs))
    assert scores["add"].metric == "acc,none" and scores["add"].n == 8

    path = newest_results(job.work_dir)  # the file lm-eval itself wrote, in the round directory
    again = parse_results(read_json(path), {"add": "toy_add/acc,none"}, str(path))
    assert again["add"].score == scores["add"].score
    with pytest.raises(IdealError, match="no metric 'f1'"):
        parse_results(read_json(path), {"add": {"task": "toy_add", "metric": "f1"}})
    with pytest.raises(IdealError, match="task not in the results"):
        parse_results(read_json(path), {"add": {"task": "gsm8k"}})


@pytest.mark.slow
def test_a_run_trains_its_round_with_trl(tmp_path):
    require_extra("trl", "trl")
    (tmp_path / "c.yaml").write_text(TINY)
    config = load_config(tmp_path / "c.yaml", ["rounds=0", "train.backend=trl"])
    summary = run_loop(config, tmp_path / "run").to_json()
    here = tmp_path / "run" / "round-0"
    record = json.loads((here / "train.json").read_text())
    assert (record["backend"], record["loss"], record["steps"]) == ("trl", "token", 30)
    assert record["examples"] == sum(summary["rounds"][0]["volumes"].values())
    assert summary["rounds"][0]["seconds"]["train"] == pytest.approx(record["seconds"])
    assert json.loads((here / "metrics.json").read_text())["capabilities"]["add"]["scorer"]


def test_a_missing_extra_names_the_distribution_ideal_mix(monkeypatch):
    """The optional extras install as `ideal-mix[...]` (the name `ideal` on PyPI is another
    project): every message that says how to install one names it so."""
    from ideal.backends.evaluation.lmeval import LmEvalEvaluator
    from ideal.backends.settings import TrainSettings
    from ideal.backends.tools.trl_sft import TrlTrainer
    from ideal.run.preflight import _check_imports

    monkeypatch.setitem(sys.modules, "trl", None)  # `import trl` raises ImportError
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(
        IdealError, match=r"^train\.backend trl needs TRL: pip install 'ideal-mix\[trl\]'$"
    ):
        TrlTrainer(TrainSettings()).train(None)
    with pytest.raises(IdealError, match=r"pip install 'ideal-mix\[lm-eval\]'$"):
        LmEvalEvaluator(tasks={}).evaluate(None)
    config = load_config(None, base={"suite": {}, "train": {"backend": "trl"}})
    with pytest.raises(
        IdealError,
        match=r"^train\.backend trl: trl is not installed; pip install 'ideal-mix\[trl\]'$",
    ):
        _check_imports(config)
    config = load_config(
        None, base={"suite": {}, "eval": {"backend": "lm-eval", "tasks": {"a": "t"}}}
    )
    with pytest.raises(
        IdealError, match=r"lm_eval is not installed; pip install 'ideal-mix\[lm-eval\]'$"
    ):
        _check_imports(config)
