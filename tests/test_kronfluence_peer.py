"""Peer check: our EK-FAC domain scores equal kronfluence 1.0.1's on the same tiny model.

kronfluence is a test-only extra, installed by `make test` and CI with --no-deps (its torchvision
dependency breaks `import transformers` beside the CPU torch build). Conventions line up as follows,
with the empirical Fisher and a train loss of sum_z l(z) (l = mean target NLL):
kronfluence's Lambda is sum_z (Q_S^T grad l_z Q_A)^2 / N, ours sum_z (Q_S^T G_z Q_A)^2 / (T_z N) with
G_z = T_z grad l_z; every example here has T_z = T = 2 target tokens (one digit + EOS), so theirs is
ours / T, and with the same relative damping (0.1 x mean Lambda) their inverse is T x ours. With
aggregated (summed) gradients their score is then T |R_j| n_i x ours.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from ideal.influence.capture import select_layers
from ideal.influence.engine import domain_influence
from ideal.influence.results import WeightedSet
from ideal.influence.settings import InfluenceSettings
from ideal.lm import collate, example_losses
from ideal.tiny import char_tokenizer, tiny_causal_lm
from tests.helpers import tokenize_pairs

if os.environ.get("IDEAL_PEER_CHECK"):  # `make test` installed it: a missing peer is a failure
    import kronfluence  # noqa: F401
else:
    pytest.importorskip("kronfluence", reason="installed by `make test` (see Makefile)")
from kronfluence.analyzer import Analyzer, prepare_model  # noqa: E402
from kronfluence.arguments import FactorArguments, ScoreArguments  # noqa: E402
from kronfluence.task import Task  # noqa: E402
from kronfluence.utils.dataset import DataLoaderKwargs  # noqa: E402


class SFTTask(Task):
    def __init__(self, modules: list[str]):
        super().__init__()
        self.modules = modules

    def compute_train_loss(self, batch, model, sample=False):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert not sample  # empirical Fisher
        return example_losses(logits, batch["labels"]).sum()

    def compute_measurement(self, batch, model):
        return self.compute_train_loss(batch, model)

    def get_influence_tracked_modules(self):
        return self.modules

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


def collate_dict(items):
    batch = collate(items, 0)
    return {
        "input_ids": batch.input_ids,
        "attention_mask": batch.attention_mask,
        "labels": batch.labels,
    }


def test_ekfac_scores_equal_kronfluence(tmp_path):
    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=2).eval()
    domains = {
        name: tokenize_pairs(tokenizer, [(f"{name} {i * k}", str(i * k % 10)) for i in range(n)])
        for name, k, n in (("add", 3, 9), ("mul", 7, 8), ("sub", 1, 6))
    }
    references = {
        name: tokenize_pairs(tokenizer, [(f"{name} {i}?", str(i)) for i in range(n)])
        for name, n in (("math", 4), ("chat", 3))
    }
    assert all(
        item.num_targets == 2
        for items in [*domains.values(), *references.values()]
        for item in items
    )
    layers = select_layers(model)
    ours = domain_influence(
        model,
        layers,
        {d: WeightedSet.uniform(items) for d, items in domains.items()},
        {r: WeightedSet.uniform(items) for r, items in references.items()},
        InfluenceSettings(curvature="ekfac", fisher="empirical", batch_size=4),
        pad_id=0,
    ).scores

    peer_model = prepare_model(copy.deepcopy(model), SFTTask(list(layers)))
    analyzer = Analyzer(
        "peer",
        peer_model,
        SFTTask(list(layers)),
        output_dir=str(tmp_path),
        disable_tqdm=True,
        cpu=True,
    )
    loader = DataLoaderKwargs(collate_fn=collate_dict)
    train = [item for items in domains.values() for item in items]
    factor_args = FactorArguments(
        strategy="ekfac", use_empirical_fisher=True, lambda_dtype=torch.float64
    )
    analyzer.fit_all_factors(
        "f", train, per_device_batch_size=4, dataloader_kwargs=loader, factor_args=factor_args
    )
    score_args = ScoreArguments(
        damping_factor=None,  # 0.1 x mean(Lambda), as ours
        aggregate_query_gradients=True,
        aggregate_train_gradients=True,
        precondition_dtype=torch.float64,
        per_sample_gradient_dtype=torch.float64,
        score_dtype=torch.float64,
    )
    theirs = np.zeros_like(ours)
    for j, (ref, ref_items) in enumerate(references.items()):
        for i, (domain, items) in enumerate(domains.items()):
            analyzer.compute_pairwise_scores(
                f"s_{ref}_{domain}", "f", ref_items, items, per_device_query_batch_size=8,
                per_device_train_batch_size=8, dataloader_kwargs=loader, score_args=score_args,
            )  # fmt: skip
            scores = analyzer.load_pairwise_scores(f"s_{ref}_{domain}")
            theirs[j, i] = float(scores["all_modules"].sum()) / (2 * len(ref_items) * len(items))
    print(f"\nmax relative difference to kronfluence: {np.abs(ours / theirs - 1).max():.2e}")
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
