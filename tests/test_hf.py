"""A model given as a hub id is looked up in the local Hugging Face cache, never downloaded: a fake
cache is built in tmp_path (models--Org--Name/snapshots/<commit>/ + refs/main) and the environment
points there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ideal.errors import IdealError
from ideal.hf import (
    hub_cache_dir,
    load_causal_lm,
    load_tokenizer,
    looks_like_hub_id,
    resolve_model_dir,
)
from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(cache: Path, repo_id: str, with_model: bool = False) -> Path:
    """The layout huggingface_hub writes: the snapshot of `main`, named by its commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    if with_model:
        tokenizer = char_tokenizer()
        save_model_dir(snapshot, tiny_causal_lm("llama", vocab_size=len(tokenizer)), tokenizer)
    else:
        (snapshot / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    path = tmp_path / "hub"
    path.mkdir()
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.chdir(tmp_path)  # "Org/Name" is not a local directory here
    return path


def test_a_hub_id_in_the_cache_resolves_to_its_snapshot(cache):
    snapshot = fake_cache(cache, "Org/Name")
    assert resolve_model_dir("Org/Name") == snapshot


def test_the_cache_follows_the_environment_at_each_call(tmp_path, cache, monkeypatch):
    assert hub_cache_dir() == cache
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache_dir() == tmp_path / "home" / "hub"
    snapshot = fake_cache(tmp_path / "home" / "hub", "Org/Other")
    assert resolve_model_dir("Org/Other") == snapshot


def test_a_local_directory_wins_over_the_cache(tmp_path, cache):
    fake_cache(cache, "Org/Name")
    local = tmp_path / "Org" / "Name"
    local.mkdir(parents=True)
    assert resolve_model_dir("Org/Name") == Path("Org/Name")


def test_a_hub_id_not_in_the_cache_says_how_to_download_it(cache):
    fake_cache(cache, "Org/Other")
    with pytest.raises(IdealError) as err:
        resolve_model_dir("Org/Name")
    assert str(err.value) == (
        f"Org/Name: not a local directory and not in the Hugging Face cache ({cache}); "
        "download it first: hf download Org/Name"
    )


def test_a_missing_path_that_is_no_hub_id_is_a_missing_directory(tmp_path, cache):
    for name in (tmp_path / "nope", "a/b/c", "./nope", "Org/Na--me"):
        with pytest.raises(IdealError, match="model directory not found"):
            resolve_model_dir(name)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("Qwen/Qwen2.5-0.5B", True),
        ("gpt2", False),  # no namespace: a local path
        ("/abs/path", False),
        ("runs/../x", False),
        ("Org/Name.git", False),
    ],
)
def test_what_looks_like_a_hub_id(name, expected):
    assert looks_like_hub_id(name) is expected


def test_the_loaders_take_a_hub_id_from_the_cache(cache):
    fake_cache(cache, "Org/Tiny", with_model=True)
    tokenizer = load_tokenizer("Org/Tiny")
    assert tokenizer.eos_token == char_tokenizer().eos_token
    model = load_causal_lm("Org/Tiny")
    assert model.config.model_type == "llama"
    with pytest.raises(IdealError, match="Org/Missing: not a local directory and not in the"):
        load_tokenizer("Org/Missing")


def test_an_adapters_base_model_may_be_a_hub_id_in_the_cache(tmp_path, cache):
    from ideal.hf import adapter_base

    snapshot = fake_cache(cache, "Org/Base")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "Org/Base"})
    )
    assert adapter_base(adapter) == snapshot
    (adapter / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "Org/Gone"})
    )
    with pytest.raises(IdealError) as err:
        adapter_base(adapter)
    assert str(err.value).startswith(
        f"{adapter / 'adapter_config.json'}: base model Org/Gone: not a local directory and not "
        "in the Hugging Face cache"
    )
