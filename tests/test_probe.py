"""The uniform probe (`update.first_round: uniform`): round 1 is the uniform mixture, and the IDEAL
updates go on from whichever of D0 and the probe has the lower mean reference loss Q."""

from __future__ import annotations

import json

import pytest

from ideal.errors import IdealError
from ideal.methods.trust import StepDecision
from ideal.run.compare import method_config
from ideal.run.config import load_config
from ideal.run.loop import run_loop, step_decision
from ideal.run.rundir import RunPaths
from tests.test_loop import TINY
from tests.test_trust import write_round


def config_file(tmp_path, text=TINY):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_step_decision_after_the_probe(tmp_path):
    probing = load_config(config_file(tmp_path), ["update.first_round=uniform"])
    run = tmp_path / "run"
    paths = RunPaths(run, run, run, run, run)
    write_round(run, 0, 1.0)
    write_round(run, 1, 1.2, {"rule": "uniform", "step": 0.3, "from_round": 0})
    write_round(run, 2, 0.9, {"rule": "ideal", "step": 0.3, "from_round": 0})
    # the probe raised Q: IDEAL goes on from D0, with update.step (the probe was no IDEAL step)
    assert step_decision(probing, paths, 1) == StepDecision(0.3, 0, False)
    assert step_decision(probing, paths, 2) == StepDecision(0.3, 2, True)  # then as usual
    (run / "round-1" / "metrics.json").write_text(json.dumps({"reference_loss_mean": 0.7}))
    assert step_decision(probing, paths, 1) == StepDecision(0.3, 1, True)
    # with the trust region too, m is kept after the probe and the trust region resumes after it
    both = load_config(
        config_file(tmp_path), ["update.first_round=uniform", "update.trust_region=true"]
    )
    assert step_decision(both, paths, 1) == StepDecision(0.3, 1, True)
    (run / "round-2" / "mixture.json").write_text(
        json.dumps({"update": {"rule": "ideal", "step": 0.3, "from_round": 1}})
    )
    assert step_decision(both, paths, 2) == StepDecision(0.15, 1, False)  # 0.9 > Q(1) = 0.7


def test_the_probing_loop(tmp_path, cli):
    run = tmp_path / "run"
    result = cli("run", config_file(tmp_path), "update.first_round=uniform", "--out", run)
    assert result.code == 0, result.err
    summary = json.loads((run / "summary.json").read_text())
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first = json.loads((run / "round-1" / "mixture.json").read_text())
    assert first["update"]["rule"] == "uniform" and first["update"]["from_round"] == 0
    volumes = list(rounds[1]["volumes"].values())
    assert sum(volumes) == sum(rounds[0]["volumes"].values()) and max(volumes) - min(volumes) <= 1
    losses = [r["reference_loss_mean"] for r in rounds]
    base = 1 if losses[1] < losses[0] else 0
    second = json.loads((run / "round-2" / "mixture.json").read_text())["update"]
    assert second["rule"] == "ideal" and second["from_round"] == base
    previous = json.loads((run / f"round-{base}" / "mixture.json").read_text())
    assert second["previous_volumes"] == {d: e["volume"] for d, e in previous["domains"].items()}
    # influence only where an IDEAL update started: the base round, never the other
    assert (run / f"round-{base}" / "influence.json").is_file()
    assert not (run / f"round-{1 - base}" / "influence.json").is_file()
    assert summary["selected_round"] == min(range(3), key=lambda k: (losses[k], k))
    said = " ".join(result.out.split())  # rich may wrap the line
    where = "round 1 (uniform)" if base == 1 else "round 0 (D0)"
    assert (
        f"round 1 is the uniform probe (update.first_round); the IDEAL updates went on from {where}"
        in said
    )


@pytest.mark.parametrize(
    ("change", "rounds"),
    [(("volume: 20", "volume: 40"), 2), (("", ""), 1)],
    ids=["d0-already-uniform", "a-single-round"],
)
def test_where_a_probe_is_pointless_round_1_is_the_ideal_step(tmp_path, change, rounds):
    config = load_config(
        config_file(tmp_path, TINY.replace(*change)),
        ["update.first_round=uniform", f"rounds={rounds}", "train.max_steps=10"],
    )
    run = tmp_path / "run"
    run_loop(config, run)
    update = json.loads((run / "round-1" / "mixture.json").read_text())["update"]
    assert update["rule"] == "ideal"  # docs/method.md's step
    assert (run / "round-0" / "influence.json").is_file()


def test_first_round_is_validated_and_reaches_compare(tmp_path):
    path = config_file(tmp_path)
    with pytest.raises(IdealError, match="update.first_round must be one of ideal, uniform"):
        load_config(path, ["update.first_round=doremi"])
    loaded = load_config(path)
    assert method_config(loaded, "ideal-uniform-probe", 0).update.first_round == "uniform"
    assert method_config(loaded, "ideal", 0).update.first_round == "ideal"


def test_the_probe_on_a_bpe_chatml_model_with_lora(tmp_path, monkeypatch):
    """The default loop (probe, then an IDEAL update by candidate steps) on a real-model
    stand-in: a byte-level BPE with a ChatML template, LoRA training, answers that start with a
    newline, unequal volumes. One candidate (m 0.3) and no noise threshold: three reference rows
    give no sensitivity beyond 2 standard errors."""
    from ideal.hf import load_tokenizer
    from ideal.tiny import byte_bpe_tokenizer, save_model_dir, tiny_causal_lm
    from tests.helpers import make_data_dir

    tokenizer = byte_bpe_tokenizer()
    assert "<|im_start|>" in tokenizer.chat_template
    base = save_model_dir(
        tmp_path / "base", tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1), tokenizer
    )
    assert load_tokenizer(base).chat_template == tokenizer.chat_template

    def rows(domain, n, offset=0):
        return [{"prompt": f"{domain} {i}?", "completion": f"\n{i}", "answer": f"{i}"}
                for i in range(offset, offset + n)]  # fmt: skip

    make_data_dir(tmp_path / "train", {"add": rows("add", 12), "mul": rows("mul", 4)})
    make_data_dir(tmp_path / "ref", {"add": rows("add", 3, 20), "mul": rows("mul", 3, 20)})
    make_data_dir(tmp_path / "test", {"add": rows("add", 3, 30), "mul": rows("mul", 3, 30)})
    (tmp_path / "c.yaml").write_text(
        f"model: {base}\ntrain_data: {tmp_path / 'train'}\nreference_data: {tmp_path / 'ref'}\n"
        f"test_data: {tmp_path / 'test'}\nrounds: 2\n"
        "train: {max_steps: 4, batch_size: 4, lr: 0.01, lora: true, lora_r: 2, threads: 1}\n"
        "influence: {batch_size: 8}\nupdate: {candidates: [0.3], min_z: 0.0}\n"
        "eval: {max_new_tokens: 3}\n"
    )
    # three reference rows cannot separate a step from its base: the candidate is made to beat
    # it (its held-out losses lowered), so that the kept adapter's round is what is checked
    import ideal.run.stages as stages

    real = stages.evaluate_round

    def better(config, paths, model_dir, round_=None, decode=None):
        metrics = real(config, paths, model_dir, round_, decode)
        if model_dir.parent.parent.name.startswith("step-"):
            for entry in metrics["capabilities"].values():
                entry["reference_row_losses"] = [x - 1.0 for x in entry["reference_row_losses"]]
        return metrics

    monkeypatch.setattr(stages, "evaluate_round", better)
    run = tmp_path / "run"
    summary = run_loop(load_config(tmp_path / "c.yaml"), run).to_json()  # default: the probe
    volumes = [r["volumes"] for r in summary["rounds"]]
    assert volumes[0] == {"add": 12, "mul": 4} and volumes[1] == {"add": 8, "mul": 8}
    losses = [r["reference_loss_mean"] for r in summary["rounds"]]
    base_round = 1 if losses[1] < losses[0] else 0
    second = json.loads((run / "round-2" / "mixture.json").read_text())["update"]
    assert second["rule"] == "ideal" and second["from_round"] == base_round
    assert second["candidate"] == "m0.300" and (run / "round-2" / "model").is_dir()
    assert (run / "round-2" / "model" / "adapter_config.json").is_file()  # the kept adapter
    assert (run / f"round-{base_round}" / "model" / "adapter_config.json").is_file()
    influence = json.loads((run / f"round-{base_round}" / "influence.json").read_text())
    assert influence["volumes"] == volumes[base_round]
    # influence.json's beta is the step the run took, at the run's m (update.step: 0.3)
    assert influence["step"] == 0.3
    assert max(abs(b) for b in influence["beta"].values()) == pytest.approx(0.3)
    # the summary says once what each round was; the console and the report read it
    assert [r["kind"] for r in summary["rounds"]] == ["D0", "uniform probe", "ideal"]
    assert summary["probe_round"] == 1 and summary["continued_from"] == base_round
    assert summary["rounds"][2]["from_round"] == base_round
    report = (run / "report.html").read_text()
    assert "round 1 is the uniform probe" in report.lower()
    assert f"ideal step from round {base_round}" in report
    assert "previous round's" not in report
