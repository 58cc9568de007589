"""Export a mixture to the files another SFT tool reads, reproducing its volumes exactly.

    ideal export --mixture RUN/round-2/mixture.json --format llamafactory|trl|axolotl --out DIR

Every format gets one `<domain>.jsonl` per domain, each row written as many times as the mixture
counts it, in the conversational form `{"messages": [{"role", "content"}, ...]}`, plus:

    llamafactory  dataset_info.json: one sharegpt-formatted dataset per domain (`ideal_<domain>`);
                  train with `dataset: ideal_add,ideal_code,...` and `dataset_dir: DIR`
    trl           mixture.yaml: a `datasets:` list (TRL's dataset-mixture config) of json data files
    axolotl       datasets.yaml: a `datasets:` list of chat_template json datasets, to paste in a config

Paths inside the tool's file are relative to the export directory, so the directory can move: run
the trainer from inside it, or prefix the paths with its location. The loop's own exports (a
round's `export/` for an external trainer) hold absolute paths.

A row LLaMA-Factory would drop (its turns do not alternate user, assistant, ... after one optional
leading system turn) is refused for `llamafactory`, with its file and line: the export would
otherwise hold fewer rows than the mixture counts. It is not mended: joining two turns' texts
with a separator the user never wrote, or moving a system turn, would train on another row than
the one ideal measures; the fix is the user's, in the data.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ideal.artifacts import atomic_dir
from ideal.data.mixture_io import MANIFEST, load_training_set
from ideal.errors import IdealError

FORMATS = ("llamafactory", "trl", "axolotl")


def _llamafactory(domains: list[str]) -> dict[str, str]:
    info = {
        f"ideal_{d}": {
            "file_name": f"{d}.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "system_tag": "system",
            },
        }
        for d in domains
    }
    return {"dataset_info.json": json.dumps(info, indent=2) + "\n"}


def _trl(domains: list[str], base: str) -> dict[str, str]:
    entries = [
        {
            "path": "json",
            "data_files": f"{base}{d}.jsonl",
            "split": "train",
            "columns": ["messages"],
        }
        for d in domains
    ]
    return {"mixture.yaml": yaml.safe_dump({"datasets": entries}, sort_keys=False)}


def _axolotl(domains: list[str], base: str) -> dict[str, str]:
    entries: list[dict[str, Any]] = [
        {
            "path": f"{base}{d}.jsonl",
            "ds_type": "json",
            "type": "chat_template",
            "field_messages": "messages",
            "message_property_mappings": {"role": "role", "content": "content"},
        }
        for d in domains
    ]
    return {"datasets.yaml": yaml.safe_dump({"datasets": entries}, sort_keys=False)}


def llamafactory_problem(messages: Sequence[dict[str, str]]) -> str | None:
    """Why LLaMA-Factory's sharegpt reader drops this conversation, or None when it keeps it: after
    one optional leading system turn, the turns must alternate user, assistant, ... and end with an
    assistant turn (its `SharegptDatasetConverter`)."""
    roles = [m["role"] for m in messages]
    skip = 1 if roles[:1] == ["system"] else 0  # messages[skip + k] is roles[k]: turn skip + k + 1
    roles = roles[skip:]
    for k, role in enumerate(roles):
        if role == ("user" if k % 2 == 0 else "assistant"):
            continue
        turn = skip + k + 1
        if role == "system":
            return f"a system turn that is not the first (turn {turn})"
        if k and roles[k - 1] == role:
            return f"consecutive {role} turns (turns {turn - 1} and {turn})"
        return f"a conversation that starts with an {role} turn"
    if not roles or len(roles) % 2:
        return "a conversation that does not end with an assistant turn"
    return None


def check_llamafactory_rows(examples: Iterable[Any]) -> None:
    """Raise at the first row (an Example: messages, source) that LLaMA-Factory would drop."""
    for example in examples:
        problem = llamafactory_problem(example.messages)
        if problem is not None:
            raise IdealError(
                f"{example.source}: LLaMA-Factory would drop this row ({problem}): merge or "
                "reorder its turns in your data (or train with axolotl or trl-cli, which keep it)"
            )


def export_mixture(
    mixture_file: str | Path, fmt: str, out: str | Path, absolute: bool = False
) -> dict[str, int]:
    """Write the export; returns the rows written per domain (= the mixture's volumes). Paths in
    the tool's file are relative to `out`, or absolute with `absolute` (the loop's exports, which
    a trainer's command reads from wherever it runs)."""
    if fmt not in FORMATS:
        raise IdealError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    mixture_file = Path(mixture_file)
    if mixture_file.name != MANIFEST or not mixture_file.is_file():
        raise IdealError(
            f"{mixture_file}: expected a {MANIFEST} written by ideal (ideal run, ideal reweight)"
        )
    training = load_training_set(mixture_file.parent)
    if fmt == "llamafactory":
        for domain in training.mixture.domains:
            check_llamafactory_rows(training.examples(domain))
    out = Path(out)
    written: dict[str, int] = {}
    with atomic_dir(out) as tmp:
        for domain in training.mixture.domains:
            rows = [json.dumps({"messages": list(ex.messages)}) for ex in training.examples(domain)]
            (tmp / f"{domain}.jsonl").write_text("".join(r + "\n" for r in rows), encoding="utf-8")
            written[domain] = len(rows)
        domains = training.mixture.domains
        base = f"{out.resolve()}/" if absolute else ""
        files = {
            "llamafactory": lambda: _llamafactory(domains),
            "trl": lambda: _trl(domains, base),
            "axolotl": lambda: _axolotl(domains, base),
        }[fmt]()
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
    return written
