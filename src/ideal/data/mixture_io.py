"""A mixture on disk: read a training directory into (pool, mixture); write a mixture directory.

A training directory is either plain data (`<dir>/<domain>/*.jsonl`: every row is one unique example,
used once) or a mixture directory written by `ideal` (`ideal reweight`, `ideal run`):

    <dir>/mixture.json        the manifest: pool location and sha256 of its files, seed, round, and per
                              domain its volume, unique count, max repeats and copies of each pool row
    <dir>/<domain>/data.jsonl the rows, each written as many times as it is counted (any SFT tool can
                              read the directory as it is)

Reading a mixture directory goes back to its pool, so that a later round can upsample examples that
an earlier round dropped (incremental resampling needs the pool, not only the current multiset).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ideal.artifacts import atomic_dir, atomic_write_json, read_json
from ideal.data.files import fingerprint
from ideal.data.mixture import Mixture
from ideal.data.rows import Domain, Example, OnInvalid, load_domains
from ideal.errors import IdealError

MANIFEST = "mixture.json"
FORMAT = "ideal-mixture/1"


@dataclass
class TrainingSet:
    """The pool of unique examples per domain and the mixture drawn from it."""

    pool_dir: Path
    pool: dict[str, Domain]
    mixture: Mixture
    files: dict[
        str, str
    ]  # "domain/file.jsonl" -> sha256 (of a datasets directory: files.fingerprint)
    on_invalid: OnInvalid = "error"
    manifest: dict[str, Any] = field(default_factory=dict)  # as read, for a mixture directory

    @property
    def skipped(self) -> list[str]:
        return [line for domain in self.pool.values() for line in domain.skipped]

    def examples(self, domain: str) -> list[Example]:
        """The domain's multiset: each pool example repeated as many times as it is counted."""
        counts = self.mixture.counts[domain]
        return [
            ex for ex, c in zip(self.pool[domain].examples, counts, strict=True) for _ in range(c)
        ]


def _hash_pool(pool_dir: Path, pool: dict[str, Domain]) -> dict[str, str]:
    return {
        f"{name}/{file.name}": fingerprint(file)
        for name, domain in pool.items()
        for file in domain.files
    }


def load_training_set(path: str | Path, on_invalid: OnInvalid = "error") -> TrainingSet:
    """Read plain data (each row once) or a mixture directory (back to its pool, checked by hash)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        pool = load_domains(path, on_invalid)
        sizes = {d: len(domain.examples) for d, domain in pool.items()}
        return TrainingSet(path, pool, Mixture.full(sizes), _hash_pool(path, pool), on_invalid)

    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise IdealError(f"{manifest_path}: not an ideal mixture manifest (format {FORMAT})")
    pool_dir = Path(manifest["pool"]["path"])
    recorded_invalid = manifest["pool"].get("on_invalid", "error")
    pool = load_domains(pool_dir, recorded_invalid)
    files = _hash_pool(pool_dir, pool)
    if files != manifest["pool"]["files"]:
        changed = sorted(set(files.items()) ^ set(manifest["pool"]["files"].items()))
        raise IdealError(
            f"{manifest_path}: the pool {pool_dir} changed since this mixture was written "
            f"(first difference: {changed[0][0]})"
        )
    mixture = Mixture.from_dict(manifest)
    for domain, counts in mixture.counts.items():
        if domain not in pool or len(counts) != len(pool[domain].examples):
            raise IdealError(f"{manifest_path}: domain '{domain}' does not match the pool")
    return TrainingSet(pool_dir, pool, mixture, files, recorded_invalid, manifest)


def write_mixture_dir(
    out: str | Path,
    training: TrainingSet,
    mixture: Mixture,
    extra: dict[str, Any] | None = None,
    data_subdir: str = "",
) -> dict[str, Any]:
    """Write `mixture` over `training`'s pool as a mixture directory, atomically. Returns the manifest.

    The rows go to `out/<data_subdir>/<domain>/data.jsonl` (a run's round directory keeps them under
    `data/`, beside the round's other artifacts); the manifest to `out/mixture.json`.
    """
    manifest: dict[str, Any] = {
        "format": FORMAT,
        **mixture.to_dict(),
        "pool": {
            "path": str(training.pool_dir.resolve()),
            "files": training.files,
            "on_invalid": training.on_invalid,
            "skipped_rows": len(training.skipped),
            "skipped": training.skipped,
        },
        "data": data_subdir or ".",
        **(extra or {}),
    }
    with atomic_dir(out) as tmp:
        for domain, counts in mixture.counts.items():
            rows = training.pool[domain].examples
            lines = [ex.raw for ex, c in zip(rows, counts, strict=True) for _ in range(c)]
            (tmp / data_subdir / domain).mkdir(parents=True)
            (tmp / data_subdir / domain / "data.jsonl").write_text(
                "".join(f"{x}\n" for x in lines), encoding="utf-8"
            )
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def domain_report(
    training: TrainingSet,
    tokenizer: Any = None,
    max_length: int | None = None,
    on_invalid: OnInvalid = "error",
) -> list[dict[str, Any]]:
    """`ideal check`'s rows: per domain its files, file kinds and row formats, rows, volume and
    skipped rows; with a tokenizer also tokens, target tokens, truncated, no-target and
    re-tokenized rows."""
    from ideal.data.tokens import tokenize_examples

    rows = []
    for name, domain in training.pool.items():
        row: dict[str, Any] = {
            "domain": name,
            "files": len(domain.files),
            "formats": ", ".join(sorted(set(domain.formats.values()))),
            "rows": len(domain.examples),
            "volume": training.mixture.volumes[name],
            "skipped": len(domain.skipped),
        }
        if tokenizer is not None:
            _, report = tokenize_examples(domain.examples, tokenizer, max_length, on_invalid)
            row.update({"tokens": report.tokens, "target tokens": report.target_tokens,
                        "truncated": report.truncated, "no target": len(report.no_target),
                        "re-tokenized": report.retokenized})  # fmt: skip
        rows.append(row)
    return rows
