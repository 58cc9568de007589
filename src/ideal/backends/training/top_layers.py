"""Top-layer training: only the top K transformer blocks train, from cached frozen features.

    ideal train ... --top-layers 8 [--lora] [--no-feature-cache]

With K > 0 the embeddings, the L-K blocks below, the final norm and the head stay frozen (the final
norm is above the blocks, but it is not a block: frozen, as the head is). Then the hidden states
that enter block L-K depend on a row's token ids and the frozen weights only, never on what trains
above: they are computed once per row (`FeatureCache.fill`: the bottom under no_grad, stopped at
block L-K) and every training forward runs blocks L-K..L-1, the final norm and the head at the
target positions (ideal.lm.target_logits) from them. Exact: the same operations on the same
inputs as the whole model, only the bottom's batching differs (round-off).

How the top runs: the decoder body (`model.model` of a transformers causal LM, through peft) is
called with `inputs_embeds=<cached states>` while its `layers` ModuleList holds only the top K
blocks; it derives the rotary embeddings and the causal mask from inputs_embeds and the attention
mask as it does from the embeddings. Qwen2's per-layer `config.layer_types` (which mask each block
takes) is sliced along. Families that transform the embeddings inside the forward (Gemma's
`normalizer`), or whose blocks are not a `layers` list run in order, are refused with one line.

The cache: one directory per (base weights hash, K, max_length, precision) under the cache root,
safetensors files of fills (one per 256 MiB of states) holding one (T_row, hidden) tensor per row,
named by the hash of the row's token ids. The precision is the weights' dtype and the autocast dtype the fill runs under
(`autocast`: the builtin trainer's bf16 mixed precision on a GPU; None elsewhere): a fill computes
in its cache's precision whatever autocast surrounds it, so a float32 pass never reads states a
bf16 autocast made. Changing the model, K, max_length or the precision changes the directory, a
changed row its name: nothing stale is ever read. A fill is announced (rows, size) before it is
written, written atomically (temporary file + rename), and a later run (a resumed one, the next
round, another method or seed) finds it.

What a cache costs to use: its files are indexed by their headers and a batch's rows read when it
asks for them (never a whole file into memory), and the bottom's weights hash is computed once
per model directory (`bottom_hash`: keyed by the directory's files, kept in the process and in
the cache root), so that making a cache in every stage of every round reads neither the fills
nor the frozen weights. Measured on SmolLM2-135M (docs/results.md): benchmarks/feature_cache.py.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ideal.data.rows import Tokenized
from ideal.errors import IdealError
from ideal.lm import Batch, TargetLogits, collate, target_logits

log = logging.getLogger(__name__)

Tensor = torch.Tensor

#: model_type of the families whose decoder runs `inputs_embeds` through `layers` in order, with
#: no scaling of the embeddings inside the forward (Gemma multiplies them by sqrt(hidden))
FAMILIES = ("llama", "qwen2", "mistral")


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers causal LM inside DDP, torch.compile and peft wrappers."""
    for _ in range(8):
        if hasattr(model, "get_base_model"):
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            break
    return model


def decoder_body(model: nn.Module) -> nn.Module:
    """The decoder (embeddings, `layers`, final norm) of a supported causal LM, or one line."""
    base = transformers_model(model)
    config = getattr(base, "config", None)
    family = getattr(config, "model_type", type(base).__name__)
    body = getattr(base, "model", None)
    layers = getattr(body, "layers", None)
    if family not in FAMILIES or not isinstance(layers, nn.ModuleList):
        raise IdealError(
            f"train.top_layers: {family} models are not supported (only {', '.join(FAMILIES)}: "
            "blocks run in order from a given hidden state); use top_layers 0"
        )
    scaled = any(hasattr(body, name) for name in ("normalizer", "embed_scale"))
    if scaled or getattr(config, "scale_embedding", False):  # inside the forward: not cacheable
        raise IdealError(
            f"train.top_layers: {family} scales its embeddings inside the forward; use top_layers 0"
        )
    return body


def check_top_layers(model: nn.Module, k: int) -> int:
    """The model's number of blocks L, after checking 0 < k <= L (one line naming the key)."""
    blocks = len(decoder_body(model).layers)
    if k > blocks:
        raise IdealError(f"train.top_layers is {k}, but the model has {blocks} blocks")
    return blocks


def freeze_below(model: nn.Module, k: int) -> None:
    """Full fine-tuning of the top k blocks: every other parameter stops requiring a gradient."""
    body = decoder_body(model)
    top = {id(p) for block in list(body.layers)[-k:] for p in block.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in top)


def top_block_indices(model: nn.Module, k: int) -> list[int]:
    """The indices of the top k blocks (peft's `layers_to_transform`)."""
    blocks = check_top_layers(model, k)
    return list(range(blocks - k, blocks))


def top_linear_names(model: nn.Module, k: int) -> list[str]:
    """The full names of the linear layers in the top k blocks: LoRA's "all-linear" restricted to
    them (peft takes `layers_to_transform` only with a list of names)."""
    body = decoder_body(model)
    inside = {id(m) for block in list(body.layers)[-k:] for m in block.modules()}
    return [
        name
        for name, module in model.named_modules()
        if id(module) in inside and isinstance(module, nn.Linear)
    ]


@contextmanager
def top_blocks(model: nn.Module, k: int) -> Iterator[None]:
    """Within: the decoder's `layers` holds only its top k blocks (and Qwen2's `layer_types` the
    top k entries), so that a forward from `inputs_embeds` runs only them."""
    body = decoder_body(model)
    layers = body.layers
    config = body.config
    types = getattr(config, "layer_types", None)
    body.layers = nn.ModuleList(list(layers)[-k:])
    if types is not None:
        config.layer_types = list(types)[-k:]
    try:
        yield
    finally:
        body.layers = layers
        if types is not None:
            config.layer_types = types


class _Reached(Exception):
    def __init__(self, hidden: Tensor) -> None:
        self.hidden = hidden


@torch.no_grad()
def bottom_states(model: nn.Module, batch: Batch, k: int) -> Tensor:
    """(B, T, hidden): the hidden states that enter block L-k, from the frozen embeddings and
    blocks below it, no gradient. The forward stops there (nothing above runs)."""
    body = decoder_body(model)
    entry = body.layers[len(body.layers) - k]

    def reach(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        raise _Reached(args[0] if args else kwargs["hidden_states"])

    handle = entry.register_forward_pre_hook(reach, with_kwargs=True)
    try:
        body(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _Reached as reached:
        return reached.hidden.detach()
    finally:
        handle.remove()
    raise IdealError(f"train.top_layers: block {len(body.layers) - k} never ran")


def top_modules(model: nn.Module, k: int, modules: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Those of `modules` (by full name) that lie inside the top k blocks."""
    body = decoder_body(model)
    inside = {id(m) for block in list(body.layers)[-k:] for m in block.modules()}
    return {name: m for name, m in modules.items() if id(m) in inside}


def check_inside_top(
    model: nn.Module, k: int, modules: dict[str, nn.Module], key: str,
    top_key: str = "train.top_layers",
) -> None:  # fmt: skip
    """One line naming the first of `modules` outside the top k blocks: with cached features the
    blocks below never run, so hooks there would see nothing. `top_key` names where k was set."""
    outside = [name for name in modules if name not in top_modules(model, k, modules)]
    if outside:
        blocks = len(decoder_body(model).layers)
        raise IdealError(
            f"{key}: {outside[0]} lies outside the top {k} blocks ({blocks - k}..{blocks - 1}) "
            f"that {top_key} {k} trains and runs from cached features; choose layers "
            "inside them (the default does)"
        )


#: a fill writes a file each time it holds this many bytes of states (and at its end)
FILL_FILE_BYTES = 256 * 2**20
#: the frozen bottom's hash per model source (`bottom_hash`), in this process
_BOTTOM_HASHES: dict[str, str] = {}
#: beside the fills, under the cache root: the same, for the next process
HASHES_FILE = "bottom-hashes.json"


def bottom_hash(model: nn.Module, k: int, root: str | Path | None) -> str:
    """`frozen_hash(model, k)`, computed once per model directory: a model loaded from a
    directory (transformers' `name_or_path`) whose bottom holds no adapter is what that
    directory's files say, so its hash is keyed by their names, sizes and modification times,
    the dtypes it was loaded in, k and the library versions, and kept in this process and in
    `root`/HASHES_FILE. The bottom below the top k blocks never changes after loading (it is
    frozen wherever a cache is made). Anything else is hashed each time."""
    source = _source_key(model, k)
    if source is None:
        return frozen_hash(model, k)
    if source in _BOTTOM_HASHES:
        return _BOTTOM_HASHES[source]
    file = None if root is None else Path(root) / HASHES_FILE
    stored: dict[str, Any] = {}
    if file is not None and file.is_file():
        try:
            stored = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            stored = {}  # unreadable: hashed again, and written anew
    value = stored.get(source) if isinstance(stored, dict) else None
    if not isinstance(value, str):
        from ideal.distributed import is_main

        value = frozen_hash(model, k)
        if file is not None and is_main():
            from ideal.artifacts import atomic_write_json

            file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(file, {**(stored if isinstance(stored, dict) else {}), source: value})
    _BOTTOM_HASHES[source] = value
    return value


def _source_key(model: nn.Module, k: int) -> str | None:
    """What the bottom of a model loaded from a directory is made of (`bottom_hash`), or None."""
    import transformers

    base = transformers_model(model)
    name = getattr(base, "name_or_path", "") or getattr(base.config, "_name_or_path", "")
    directory = Path(name) if name else None
    if directory is None or not directory.is_dir():
        return None
    body = decoder_body(model)
    below = [body.embed_tokens, *list(body.layers)[: len(body.layers) - k]]
    names = [n for module in below for n, _ in module.named_parameters()]
    if any("lora_" in n or "base_layer" in n for n in names):  # an adapter's weights below
        return None
    files = sorted(
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".")
    )
    dtypes = sorted({str(p.dtype) for module in below for p in module.parameters()})
    what = [str(directory.resolve()), k, files, dtypes, transformers.__version__, torch.__version__]
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()


def frozen_hash(model: nn.Module, k: int) -> str:
    """sha256 of what the features depend on: the config and the embeddings and blocks below the
    top k (names, dtypes, shapes, bytes)."""
    body = decoder_body(model)
    blocks = len(body.layers)
    config = transformers_model(model).config.to_dict()
    # where it was loaded from and by which version, and a switch of generation: not numbers
    for key in ("_name_or_path", "_commit_hash", "transformers_version", "use_cache"):
        config.pop(key, None)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    below = [("embed_tokens", body.embed_tokens)]
    below += [(f"layers.{i}", body.layers[i]) for i in range(blocks - k)]
    for prefix, module in below:
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            digest.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().data)  # no copy of the bytes
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def row_key(item: Tokenized) -> str:
    return hashlib.sha256(
        torch.tensor(item.input_ids, dtype=torch.long).numpy().tobytes()
    ).hexdigest()[:32]


def check_right_padded(batch: Batch) -> None:
    """One line unless every row of `batch` is right-padded and holds its row's ids: the cached
    states of a row start at its first token, and `states` pads them on the right."""
    mask = batch.attention_mask.bool()  # (B, T)
    real = mask.sum(1)  # (B,)
    right = torch.arange(mask.shape[1], device=mask.device) < real[:, None]  # (B, T)
    if not torch.equal(mask, right):
        row = int((mask != right).any(1).nonzero()[0])
        raise IdealError(
            f"feature cache: the batch is not right-padded (row {row} has padding before a real "
            "token); the cached states start at each row's first token: collate it with right "
            "padding"
        )
    lengths = [len(item.input_ids) for item in batch.rows]
    if len(lengths) != len(real):
        raise IdealError(
            f"feature cache: the batch holds {len(real)} rows but names {len(lengths)}: "
            "collate it from the rows (ideal.lm.collate)"
        )
    for row, (n, expected) in enumerate(zip(real.tolist(), lengths, strict=True)):
        if n != expected:
            raise IdealError(
                f"feature cache: row {row} of the batch holds {n} tokens, its cached row "
                f"{expected}: the batch's rows are not the rows it was collated from"
            )


class FeatureCache:
    """The hidden states entering the trained blocks, per row (module docstring). `root` None keeps
    them in memory only (one process, one run).

    Rows on disk are read when a batch asks for them (each fill file indexed by its header, never
    loaded whole); `rows` holds only what this process computed and did not write."""

    def __init__(
        self, root: str | Path | None, model: nn.Module, k: int, max_length: int | None,
        autocast: torch.dtype | None = None,
    ) -> None:  # fmt: skip
        self.k = k
        self.autocast = autocast
        precision = _dtype_name(decoder_body(model).embed_tokens.weight.dtype)
        if autocast is not None:
            precision += f"-autocast-{_dtype_name(autocast)}"
        key = f"{bottom_hash(model, k, root)[:24]}-k{k}-len{max_length or 'none'}-{precision}"
        self.dir = None if root is None else Path(root) / key
        self.filled_seconds = 0.0  # computing rows through this cache (its own item of compute)
        self.rows: dict[str, Tensor] = {}  # computed here and not written
        self._files: dict[str, Path] = {}  # row -> the fill file that holds it
        self._indexed: set[str] = set()  # fill files whose headers were read

    def _index(self) -> None:
        """Learn which rows the fill files on disk hold (their headers only)."""
        from safetensors import safe_open

        if self.dir is None or not self.dir.is_dir():
            return
        for path in sorted(self.dir.glob("fill-*.safetensors")):
            if path.name in self._indexed:
                continue
            self._indexed.add(path.name)
            with safe_open(path, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    self._files.setdefault(name, path)

    def _cached(self, name: str) -> bool:
        return name in self.rows or name in self._files

    def fill(
        self, model: nn.Module, items: Sequence[Tokenized], pad_id: int, batch_size: int,
        write: bool = True,
    ) -> float:  # fmt: skip
        """Compute the rows not yet cached (on disk or in memory), save them (`write`: the main
        process; a file per FILL_FILE_BYTES of states, so a large fill is never held whole),
        and return the seconds spent computing."""
        import time

        self._index()
        missing: dict[str, Tokenized] = {}
        for item in items:
            name = row_key(item)
            if not self._cached(name):
                missing.setdefault(name, item)
        if not missing:  # the usual case once filled: said only in the debug log
            log.debug(
                "feature cache: %d rows found in %s", len(self.rows) + len(self._files), self.dir
            )
            return 0.0
        body = decoder_body(model)
        hidden = body.config.hidden_size
        itemsize = body.embed_tokens.weight.element_size()
        size = sum(len(item.input_ids) for item in missing.values()) * hidden * itemsize
        to_disk = self.dir is not None and write
        where = f" into {self.dir}" if to_disk else " (in memory)"
        log.info("feature cache: %d rows, %.1f MiB%s", len(missing), size / 2**20, where)
        device = next(model.parameters()).device
        order = sorted(missing, key=lambda name: len(missing[name].input_ids))  # little padding
        seconds = 0.0
        pending: dict[str, Tensor] = {}
        for start in range(0, len(order), batch_size):
            began = time.perf_counter()
            names = order[start : start + batch_size]
            batch = collate([missing[n] for n in names], pad_id).to(device)
            with self.precision(device):
                states = bottom_states(model, batch, self.k)  # (B, T, hidden)
            for row, name in enumerate(names):
                n = len(missing[name].input_ids)
                pending[name] = states[row, :n].to("cpu", copy=True).contiguous()  # (T_row, hidden)
            seconds += time.perf_counter() - began
            self.filled_seconds += time.perf_counter() - began
            last = start + batch_size >= len(order)
            held = sum(t.numel() * t.element_size() for t in pending.values())
            if not to_disk:
                self.rows.update(pending)
                pending = {}
            elif last or held >= FILL_FILE_BYTES:
                path = self._write(pending)
                self._files.update(dict.fromkeys(pending, path))
                self._indexed.add(path.name)
                pending = {}
        return seconds

    def precision(self, device: torch.device) -> Any:
        """The autocast a fill runs under: the cache's own (its key says it), never the caller's."""
        enabled = self.autocast is not None
        return torch.autocast(device.type, dtype=self.autocast or torch.bfloat16, enabled=enabled)

    def _write(self, new: dict[str, Tensor]) -> Path:
        from safetensors.torch import save_file

        from ideal.artifacts import writing

        assert self.dir is not None
        fill = hashlib.sha256("".join(sorted(new)).encode()).hexdigest()[:16]
        path = self.dir / f"fill-{fill}.safetensors"
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with writing(path, cleanup=tmp):
            save_file(new, str(tmp))
        os.replace(tmp, path)
        return path

    def _read(self, names: Sequence[str]) -> dict[str, Tensor]:
        """The rows `names` from memory or from their fill files (each file opened once, only
        their tensors read)."""
        from safetensors import safe_open

        found = {name: self.rows[name] for name in names if name in self.rows}
        by_file: dict[Path, list[str]] = {}
        for name in names:
            if name not in found:
                by_file.setdefault(self._files[name], []).append(name)
        for path, inside in by_file.items():
            with safe_open(path, framework="pt") as f:
                for name in inside:
                    found[name] = f.get_tensor(name)  # a copy: the file is closed after
        return found

    def fill_shared(
        self, model: nn.Module, items: Sequence[Tokenized], pad_id: int, batch_size: int
    ) -> float:
        """`fill` in every process of a group: the main process computes and writes, the others
        then read it (and compute in memory only what they still miss)."""
        from ideal.distributed import barrier, is_main

        seconds = self.fill(model, items, pad_id, batch_size) if is_main() else 0.0
        barrier()
        if not is_main():
            self.fill(model, items, pad_id, batch_size, write=False)
        return seconds

    def target_logits(
        self, model: nn.Module, batch: Batch, real_positions: bool = False, full: bool = False
    ) -> TargetLogits:
        """`ideal.lm.target_logits(model, batch)` with the bottom's states taken from the cache
        (the batch's `rows`, filled before): only the top k blocks, the norm and the head run."""
        check_right_padded(batch)
        states = self.states(batch.rows, batch.input_ids.device)
        with top_blocks(model, self.k):
            return target_logits(model, batch, real_positions, full, inputs_embeds=states)

    def states(self, items: Sequence[Tokenized], device: torch.device) -> Tensor:
        """(B, T, hidden) the cached states of `items`, right-padded with zeros as `collate`
        pads their ids (padding is masked out of attention and loss)."""
        names = [row_key(item) for item in items]
        if not all(self._cached(name) for name in names):
            self._index()  # written since (by another process of the group)
        for item, name in zip(items, names, strict=True):
            if not self._cached(name):
                raise IdealError(f"feature cache: row {item.source!r} is missing from {self.dir}")
        read = self._read(names)
        rows = [read[name] for name in names]
        length = max(r.shape[0] for r in rows)
        out = rows[0].new_zeros((len(rows), length, rows[0].shape[1]))
        for row, r in enumerate(rows):
            out[row, : r.shape[0]] = r
        return out.to(device)  # the dtype of the fill: the residual stream's
