"""Where an external trainer renders rows or masks the loss differently from `ideal`.

The influence step renders every row with the tokenizer's chat template (ideal's plain template when
it has none) and counts the loss on every assistant turn and its end-of-turn token, never on
prompts (SPEC.md "Data"). A trainer that renders or masks otherwise trained the model on another
objective than the one the influence step differentiates. The settings known to do so:

    llamafactory   `template` missing (LLaMA-Factory parses the tokenizer's template into its own)
                   or of another family than the model's chat template; `train_on_prompt: true`;
                   `mask_history: true` (the last turn only)
    axolotl        `chat_template` other than tokenizer_default (or of another family);
                   `train_on_inputs: true`; a dataset's `roles_to_train` other than [assistant]
                   (ideal's rendered config replaces it, and says so)
    trl-cli        `assistant_only_loss: false` (TRL then trains on every token of the `messages`
                   rows); with assistant-only loss, a chat template without {% generation %}
                   markers (TRL swaps in its own training template for the family, or stops)
    trl            `trl_args.loss_type` other than nll; `trl_args.assistant_only_loss` (the rows
                   arrive tokenized, with ideal's labels: TRL refuses it on them)

(`completion_only_loss` is not among them: it acts on prompt-completion rows, and every trainer
here gets `messages` rows or ideal's own labels.) Each warning is one line naming the file and the
key. `ideal check --config RUN.yaml` prints them before a run; each round's train.json keeps them
(`warnings`) and the run report shows them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ideal.errors import IdealError

#: (marker in the model's chat template, family, name prefixes of the LLaMA-Factory templates and
#: axolotl chat_templates that render that family). First match wins: the order matters.
FAMILIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("<|start_header_id|>", "llama3", ("llama3", "mllama")),
    ("<|header_start|>", "llama4", ("llama4",)),
    ("<start_of_turn>", "gemma", ("gemma",)),
    ("<｜User｜>", "deepseek", ("deepseek",)),
    ("<|start_of_role|>", "granite", ("granite",)),
    ("<|im_start|>", "chatml", ("chatml", "qwen", "yi", "smollm", "phi4")),
    ("[INST]", "mistral", ("mistral", "ministral", "llama2")),
    ("<|end|>", "phi3", ("phi",)),
)


def chat_template_family(template: str | None) -> str | None:
    """The family of a chat template, from its markers (FAMILIES), or None when unknown."""
    if not template:
        return None
    for marker, family, _ in FAMILIES:
        if marker in template:
            return family
    return None


def renders_family(name: str, family: str) -> bool:
    """Whether a tool's template `name` (LLaMA-Factory's `template`, axolotl's `chat_template`)
    belongs to `family`."""
    prefixes = next(p for _, f, p in FAMILIES if f == family)
    return str(name).lower().startswith(prefixes)


def model_chat_template(model_dir: str | Path | None) -> tuple[bool, str | None]:
    """(known, template) of a model directory's tokenizer: known False when it cannot be read
    (no directory, no tokenizer yet); template None when the tokenizer has none."""
    if model_dir is None:
        return False, None
    from ideal.hf import load_tokenizer  # transformers: only when a model is checked

    try:
        template = load_tokenizer(model_dir).chat_template
    except (IdealError, OSError, ValueError):
        return False, None
    if isinstance(template, dict):  # named variants: the default one renders
        template = template.get("default")
    return True, template if isinstance(template, str) else None


def _template_warning(where: str, key: str, name: Any, model_dir: Path | None, tool: str) -> str:
    """The one line about a tool's own template `name` against the model's chat template."""
    known, template = model_chat_template(model_dir)
    if not known:
        return (
            f"{where}: `{key}: {name}`: {tool} renders rows with its own template; the model's "
            "chat template could not be read to check that it agrees with what ideal renders"
        )
    if template is None:
        return (
            f"{where}: `{key}: {name}`: the model's tokenizer has no chat template, so ideal renders "
            f"rows with its plain template and {tool}'s renders them differently"
        )
    family = chat_template_family(template)
    if family is None:
        return (
            f"{where}: `{key}: {name}`: {tool} renders rows with its own template; the model's "
            "chat template is of no family ideal knows: check that they agree"
        )
    if not renders_family(name, family):
        return (
            f"{where}: `{key}: {name}` does not match the model's chat template ({family}): "
            f"{tool} renders rows differently from ideal's influence step"
        )
    return ""


def llamafactory_warnings(base: dict[str, Any], where: str, model_dir: Path | None) -> list[str]:
    out: list[str] = []
    template = base.get("template")
    if template is None:
        out.append(
            f"{where}: no `template`: LLaMA-Factory parses the tokenizer's chat template into its "
            "own, which may render rows differently from the template ideal's influence uses"
        )
    else:
        out.append(_template_warning(where, "template", template, model_dir, "LLaMA-Factory"))
    if base.get("train_on_prompt"):
        out.append(
            f"{where}: `train_on_prompt: true` puts loss on prompt tokens; ideal's influence "
            "counts assistant tokens only"
        )
    if base.get("mask_history"):
        out.append(
            f"{where}: `mask_history: true` trains on the last assistant turn only; ideal's "
            "influence counts every assistant turn"
        )
    return [w for w in out if w]


def axolotl_warnings(base: dict[str, Any], where: str, model_dir: Path | None) -> list[str]:
    out: list[str] = []
    for i, entry in enumerate(base.get("datasets") or []):
        roles = entry.get("roles_to_train") if isinstance(entry, dict) else None
        if roles is not None and list(roles) != ["assistant"]:
            out.append(
                f"{where}: `datasets[{i}].roles_to_train: {list(roles)}` trains on more than the "
                "assistant turns ideal's influence counts; ideal's rendered config replaces it by "
                "[assistant]"
            )
    chat_template = base.get("chat_template")
    if chat_template not in (None, "tokenizer_default") and not str(chat_template).startswith(
        "tokenizer_default"
    ):
        line = _template_warning(where, "chat_template", chat_template, model_dir, "axolotl")
        if line:
            out.append(line + " (or use `chat_template: tokenizer_default`)")
    if base.get("train_on_inputs"):
        out.append(
            f"{where}: `train_on_inputs: true` puts loss on prompt tokens; ideal's influence "
            "counts assistant tokens only"
        )
    return out


_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


def trl_cli_warnings(base: dict[str, Any], where: str, model_dir: Path | None) -> list[str]:
    if base.get("assistant_only_loss") is False:
        return [
            f"{where}: `assistant_only_loss: false` trains on every token of the `messages` "
            "rows; ideal's influence counts assistant tokens only"
        ]
    known, template = model_chat_template(model_dir)
    if known and template is not None and not _GENERATION.search(template):
        set_by = "" if "assistant_only_loss" in base else " (absent: ideal sets it true)"
        return [
            f"{where}: `assistant_only_loss: true`{set_by} needs {{% generation %}} markers, "
            "which the model's chat template lacks: TRL swaps in its own training template for "
            "the family (check that it renders as the tokenizer's) or stops"
        ]
    return []


def trl_warnings(trl_args: dict[str, Any], where: str) -> list[str]:
    out: list[str] = []
    loss_type = trl_args.get("loss_type")
    if loss_type not in (None, "nll"):
        out.append(
            f"{where}: `train.trl_args.loss_type: {loss_type}` trains on another loss than the "
            "token NLL that influence.loss differentiates"
        )
    if trl_args.get("assistant_only_loss"):
        out.append(
            f"{where}: `train.trl_args.assistant_only_loss: true`: TRL refuses it on the rows "
            "ideal hands it (tokenized, with ideal's assistant-only labels already): remove it"
        )
    return out


PRESET_WARNINGS = {
    "llamafactory": llamafactory_warnings,
    "axolotl": axolotl_warnings,
    "trl-cli": trl_cli_warnings,
}


def masking_warnings(
    backend: str,
    base: dict[str, Any] | None,
    where: str,
    model_dir: str | Path | None,
    trl_args: dict[str, Any] | None = None,
) -> list[str]:
    """The warnings of `train.backend` (module docstring): `base` is a preset's base YAML and
    `where` its file (for `trl`, the run config's); `model_dir` the base model, whose chat
    template the tool's is checked against. Other backends: none known."""
    model = Path(model_dir) if model_dir is not None else None
    if backend in PRESET_WARNINGS:
        return PRESET_WARNINGS[backend](base or {}, where, model)
    if backend == "trl":
        return trl_warnings(trl_args or {}, where)
    return []
