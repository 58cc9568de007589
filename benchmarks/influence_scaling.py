"""How the influence step scales: with data size, with the number of layers, with processes.

    python benchmarks/influence_scaling.py [--size cpu] [--threads 1] [--parts data,layers,probe,processes]

Every measurement is `ideal influence` (EK-FAC, sampled Fisher, --sample 1.0 so the example count is
what the row says) in a fresh subprocess on the same generated data, so peak resident memory is per
row. Parts:
  data       examples per domain 50, 100, 200, 400 (3 domains), default layers: seconds per stage,
             seconds per example of the passes, peak RSS; expect the passes linear in the examples
             and the eigendecomposition constant
  layers     the MLPs of the first 1, 2, 4, 6 blocks at 100 examples per domain
  processes  the same job in 1 process and under torchrun with 2 (gloo, 1 thread each), wall time
             of the whole command (start-up included) and of the influence stages; their ratio
  probe      the time estimate of `ideal influence --plan` (a timed probe on 16 examples) against
             the measured step, at 200 examples per domain
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from influence_overhead import SIZES, make_data, make_model  # noqa: E402

PASSES = ("pass1_factors_and_domain_gradients", "pass2_eigenvalue_correction", "references")


def stage(model: Path, data: Path, layers: str | None) -> dict:
    from ideal.influence.settings import InfluenceConfig, InfluenceJob
    from ideal.influence.step import compute_influence

    start = time.perf_counter()
    config = InfluenceConfig(sample=1.0, batch_size=8,
                             layers=tuple(layers.split(",")) if layers else None)  # fmt: skip
    _, doc = compute_influence(model, data / "train", data / "reference", InfluenceJob(config))
    return {
        "seconds": time.perf_counter() - start - doc["seconds"]["load_and_tokenize"],
        "stages": doc["seconds"],
        "layers": len(doc["layers"]),
        "examples": sum(doc["sampled_examples"].values()),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_stage(model: Path, data: Path, layers: str | None, threads: int) -> dict:
    args = [sys.executable, __file__, "--stage", "--model", str(model), "--data", str(data),
            "--threads", str(threads)] + (["--layers", layers] if layers else [])  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(label: str, result: dict) -> str:
    stages = result["stages"]
    per_example = sum(stages[k] for k in PASSES[:2]) / result["examples"]
    return (
        f"  {label:<16} {result['seconds']:7.2f} s   pass1 {stages[PASSES[0]]:6.2f}  "
        f"pass2 {stages.get(PASSES[1], 0):6.2f}  refs {stages[PASSES[2]]:5.2f}  "
        f"eigh {stages.get('eigendecomposition', 0):5.2f}  "
        f"{1000 * per_example:6.1f} ms/example (passes)   peak RSS {result['peak_rss_mib']:6.0f} MiB"
    )


def data_part(tmp: Path, model: Path, threads: int) -> None:
    print("\n[data] examples per domain (3 domains), default layers")
    results = {}
    for n in (50, 100, 200, 400):
        data = tmp / f"data-{n}"
        make_data(data, n)
        results[n] = run_stage(model, data, None, threads)
        print(row(f"{n} x 3", results[n]))
    base = results[50]
    for n, r in results.items():
        passes = sum(r["stages"][k] for k in PASSES[:2])
        base_passes = sum(base["stages"][k] for k in PASSES[:2])
        print(f"  {n} x 3: passes {passes / base_passes:.2f}x of 50 x 3 for {n / 50:.0f}x the data")


def layers_part(tmp: Path, model: Path, threads: int, blocks: int) -> None:
    print("\n[layers] MLP projections of the first K blocks, 100 examples per domain")
    data = tmp / "data-100"
    if not data.exists():
        make_data(data, 100)
    for k in sorted({1, 2, 4, blocks} & set(range(1, blocks + 1))):
        patterns = ",".join(f"model.layers.{i}.mlp.*" for i in range(k))
        result = run_stage(model, data, patterns, threads)
        print(row(f"{k} block(s) ({result['layers']} layers)", result))


def processes_part(tmp: Path, model: Path) -> None:
    print("\n[processes] 1 process vs torchrun --nproc_per_node 2 (gloo, 1 thread each)")
    data = tmp / "data-200"
    if not data.exists():
        make_data(data, 200)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = ["-m", "ideal", "influence", "--model", str(model), "--train", str(data / "train"),
           "--reference", str(data / "reference"), "--sample", "1.0"]  # fmt: skip
    launchers = {
        1: [sys.executable],
        2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    }
    walls, stages = {}, {}
    for n, launcher in launchers.items():
        out = tmp / f"influence-{n}"
        start = time.perf_counter()
        subprocess.run([*launcher, *job, "--out", str(out)], env=env, check=True,
                       capture_output=True)  # fmt: skip
        walls[n] = time.perf_counter() - start
        seconds = json.loads((out / "influence.json").read_text())["seconds"]
        stages[n] = seconds["total"] - seconds["load_and_tokenize"]
        print(f"  {n} process(es): command {walls[n]:6.2f} s, influence stages {stages[n]:6.2f} s")
    print(f"  speed-up with 2 processes: command {walls[1] / walls[2]:.2f}x, "
          f"influence stages {stages[1] / stages[2]:.2f}x")  # fmt: skip


def probe_part(tmp: Path, model: Path, threads: int) -> None:
    print("\n[probe] --plan's time estimate vs the measured step, 200 examples per domain")
    data = tmp / "data-200"
    if not data.exists():
        make_data(data, 200)
    args = [sys.executable, __file__, "--probe", "--model", str(model), "--data", str(data),
            "--threads", str(threads)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    estimate = json.loads(out.stdout.strip().splitlines()[-1])
    measured = run_stage(model, data, None, threads)
    print(f"  estimate {estimate['estimate_total']:7.2f} s (probe {estimate['probe_wall']:.2f} s), "
          f"measured {measured['seconds']:7.2f} s: estimate/measured = "
          f"{estimate['estimate_total'] / measured['seconds']:.2f}")  # fmt: skip


def probe(model: Path, data: Path) -> dict:
    from ideal.influence.settings import InfluenceConfig, InfluenceJob
    from ideal.influence.step import probe_seconds

    start = time.perf_counter()
    job = InfluenceJob(InfluenceConfig(sample=1.0, batch_size=8))
    result = probe_seconds(model, data / "train", data / "reference", job)
    return {**result, "probe_wall": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parts", default="data,layers,probe,processes")
    parser.add_argument("--stage", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--layers", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args.stage:
        print(json.dumps(stage(args.model, args.data, args.layers)))
        return
    if args.probe:
        print(json.dumps(probe(args.model, args.data)))
        return
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        params = make_model(tmp / "model", args.size)
        print(f"torch {torch.__version__}, {args.threads} thread(s), model '{args.size}' "
              f"{params / 1e6:.2f}M parameters, {SIZES[args.size][1]} blocks")  # fmt: skip
        if "data" in parts:
            data_part(tmp, tmp / "model", args.threads)
        if "layers" in parts:
            layers_part(tmp, tmp / "model", args.threads, SIZES[args.size][1])
        if "probe" in parts:
            probe_part(tmp, tmp / "model", args.threads)
        if "processes" in parts:
            processes_part(tmp, tmp / "model")


if __name__ == "__main__":
    main()
