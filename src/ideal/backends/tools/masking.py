"""Where an external trainer renders rows or masks the loss differently from `ideal`.

The influence step renders every row with the tokenizer's chat template (ideal's plain template when
it has none) and counts the loss on every assistant turn and its end-of-turn token, never on
prompts (SPEC.md "Data"). A trainer that renders or masks otherwise trained the model on another
objective than the one the influence step differentiates. The settings known to do so:

    llamafactory   `template` missing (LLaMA-Factory parses the tokenizer's template into its own)
                   or of another family than the model's chat template; a template that writes a
                   default system prompt into rows without one where the model's template writes
                   none or another (`template: qwen` over a plain ChatML model; the fix is
                   `default_system`); `train_on_prompt: true`; `mask_history: true` (the last
                   turn only)
    axolotl        `chat_template` other than tokenizer_default (or of another family);
                   `train_on_inputs: true`; a dataset's `roles_to_train` other than [assistant]
                   (ideal's rendered config replaces it, and says so)
    trl-cli        `assistant_only_loss: false` (TRL then trains on every token of the `messages`
                   rows); with assistant-only loss, a chat template without {% generation %}
                   markers: TRL swaps in a training template of its own for the templates it
                   knows (a warning where that renders rows otherwise than the model's), and
                   stops with a ValueError for any other: that is an error here, with the fix
    trl            `trl_args.loss_type` other than nll; `trl_args.assistant_only_loss` is an error
                   (the rows arrive tokenized, with ideal's labels: TRL refuses it on them)

(`completion_only_loss` is not among them: it acts on prompt-completion rows, and every trainer
here gets `messages` rows or ideal's own labels.) Each warning is one line naming the file and the
key; the two errors are IdealErrors of one line. `ideal check --config RUN.yaml` prints them before
a run; each round's train.json keeps them (`warnings`) and the run report shows them.
"""

from __future__ import annotations

import json
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


def model_tokenizer(model_dir: str | Path | None) -> Any:
    """A model directory's tokenizer, or None when it cannot be read (no directory, no tokenizer
    yet)."""
    if model_dir is None:
        return None
    from ideal.hf import load_tokenizer  # transformers: only when a model is checked

    try:
        return load_tokenizer(model_dir)
    except (IdealError, OSError, ValueError):
        return None


def model_chat_template(model_dir: str | Path | None) -> tuple[bool, str | None]:
    """(known, template) of a model directory's tokenizer: known False when it cannot be read
    (no directory, no tokenizer yet); template None when the tokenizer has none."""
    tokenizer = model_tokenizer(model_dir)
    if tokenizer is None:
        return False, None
    template = tokenizer.chat_template
    if isinstance(template, dict):  # named variants: the default one renders
        template = template.get("default")
    return True, template if isinstance(template, str) else None


_SAMPLE = ({"role": "user", "content": "u"}, {"role": "assistant", "content": "a"})


def injected_system(tokenizer: Any) -> str | None:
    """The system prompt that the tokenizer's chat template writes into a conversation without a
    system turn (Qwen2.5's "You are Qwen, ..."), or None when it writes none.

    Rendered once with a marker as the system turn and once without one: the template injects D
    when the second rendering is the first with the marker replaced by D."""
    if not getattr(tokenizer, "chat_template", None):
        return None  # ideal's plain template: no system prompt of its own
    marker = "IDEAL-SYSTEM-MARKER"
    try:
        plain = tokenizer.apply_chat_template(list(_SAMPLE), tokenize=False)
        marked = tokenizer.apply_chat_template(
            [{"role": "system", "content": marker}, *_SAMPLE], tokenize=False
        )
    except Exception:  # a template that refuses the sample says nothing about its system prompt
        return None
    if not isinstance(plain, str) or not isinstance(marked, str) or marker not in marked:
        return None
    before, after = marked.split(marker, 1)
    if (
        all(m["content"] in after for m in _SAMPLE)  # the turns follow the system prompt
        and len(plain) > len(before) + len(after)
        and plain.startswith(before)
        and plain.endswith(after)
    ):
        return plain[len(before) : len(plain) - len(after)]
    return None


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


def system_prompt_warning(base: dict[str, Any], where: str, tokenizer: Any) -> str:
    """LLaMA-Factory's `template` (or `default_system`) writes a system prompt into rows without
    one that the model's chat template does not write, or another: the line, or ""."""
    from ideal.backends.tools.llamafactory_systems import LLAMAFACTORY_DEFAULT_SYSTEMS

    name = base.get("template")
    if name is None or tokenizer is None:
        return ""  # parsed from the tokenizer's template: its default system prompt with it
    if base.get("default_system") is not None:
        theirs, key = str(base["default_system"]), f"default_system: {base['default_system']!r}"
    else:
        theirs, key = LLAMAFACTORY_DEFAULT_SYSTEMS.get(str(name), ""), f"template: {name}"
    ours = injected_system(tokenizer) or ""
    if theirs == ours:
        return ""
    fix = f"set `default_system: {json.dumps(ours)}` in the base config"
    if not theirs:
        return (
            f"{where}: `{key}` writes no system prompt into rows without one, but the model's "
            f"chat template writes {ours!r}, which ideal's influence step sees: {fix}"
        )
    has = f"writes {ours!r}" if ours else "writes none"
    return (
        f"{where}: `{key}` writes the system prompt {theirs!r} into every row without one; the "
        f"model's chat template {has}, as ideal's influence step sees the rows: {fix}"
    )


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
        out.append(system_prompt_warning(base, where, model_tokenizer(model_dir)))
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


_MULTI_TURN = (
    {"role": "system", "content": "s"},
    {"role": "user", "content": "u"},
    {"role": "assistant", "content": "a"},
    {"role": "user", "content": "v"},
    {"role": "assistant", "content": "b"},
)
GENERATION_FIX = (
    "wrap each assistant turn's content and its end-of-turn token in {% generation %}...{% "
    "endgeneration %} in the model's chat template (chat_template.jinja or tokenizer_config.json), "
    "or use `train.backend: trl` (ideal hands TRL its own labels: no markers needed)"
)


def trl_training_template(tokenizer: Any) -> tuple[str, str | None]:
    """What TRL (importable here) does to a chat template without {% generation %} markers under
    assistant_only_loss: ("patched", its training template), ("refused", None) where it raises,
    or ("unknown", None) without TRL."""
    try:
        from trl.chat_template_utils import get_training_chat_template
    except ImportError:
        return "unknown", None
    try:
        return "patched", get_training_chat_template(tokenizer)
    except ValueError:
        return "refused", None


def trl_cli_warnings(base: dict[str, Any], where: str, model_dir: Path | None) -> list[str]:
    """Raises where TRL will stop: assistant_only_loss over a chat template without
    {% generation %} markers that TRL has no training template for."""
    if base.get("assistant_only_loss") is False:
        return [
            f"{where}: `assistant_only_loss: false` trains on every token of the `messages` "
            "rows; ideal's influence counts assistant tokens only"
        ]
    tokenizer = model_tokenizer(model_dir)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not isinstance(template, str) or _GENERATION.search(template):
        return []
    set_by = "" if "assistant_only_loss" in base else " (absent: ideal sets it true)"
    what, training = trl_training_template(tokenizer)
    if what == "refused":
        raise IdealError(
            f"{where}: `assistant_only_loss: true`{set_by} needs {{% generation %}} markers in the "
            f"model's chat template, which it lacks, and TRL has no training template for it (TRL "
            f"stops with a ValueError): {GENERATION_FIX}"
        )
    if what == "patched" and training is not None:
        sample = list(_MULTI_TURN)
        mine = tokenizer.apply_chat_template(sample, tokenize=False)
        theirs = tokenizer.apply_chat_template(sample, tokenize=False, chat_template=training)
        if mine == theirs:
            return []
        return [
            f"{where}: `assistant_only_loss: true`{set_by}: the model's chat template has no "
            "{% generation %} markers, and the training template TRL swaps in for it renders "
            f"rows otherwise than the model's: {GENERATION_FIX}"
        ]
    return [
        f"{where}: `assistant_only_loss: true`{set_by} needs {{% generation %}} markers, which "
        "the model's chat template lacks: TRL swaps in its own training template for the "
        f"templates it knows and stops on any other (TRL is not installed here to tell): "
        f"{GENERATION_FIX}"
    ]


def trl_warnings(trl_args: dict[str, Any], where: str) -> list[str]:
    """Raises for `assistant_only_loss`, which TRL refuses on the rows ideal hands it."""
    if trl_args.get("assistant_only_loss"):
        raise IdealError(
            f"{where}: `train.trl_args.assistant_only_loss: true`: TRL refuses it on the rows "
            "ideal hands it (tokenized, with ideal's assistant-only labels already, which is what "
            "it asks for): remove it"
        )
    out: list[str] = []
    loss_type = trl_args.get("loss_type")
    if loss_type not in (None, "nll"):
        out.append(
            f"{where}: `train.trl_args.loss_type: {loss_type}` trains on another loss than the "
            "token NLL that influence.loss differentiates"
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
