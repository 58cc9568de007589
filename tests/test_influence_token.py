"""`influence.loss: token`: the influence step differentiates the token-normalised objective.

L(S) = sum of token NLLs over S / target tokens of S (TRL, LLaMA-Factory, axolotl). The references
here are dense float64 computations written independently of the engine (autograd on a padded batch
for the gradients, Jacobians and the softmax Hessian for the Gauss-Newton, explicit per-example loops
for the K-FAC factors), on a tiny model whose examples have DIFFERENT target lengths, so that token
and example normalisation differ measurably.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ideal.data.rows import Tokenized
from ideal.errors import IdealError
from ideal.influence.capture import layer_shape, select_layers
from ideal.influence.engine import domain_influence
from ideal.influence.exact import dense_gauss_newton
from ideal.influence.passes import make_batches
from ideal.influence.refine import GaussNewton
from ideal.influence.results import WeightedSet
from ideal.influence.settings import InfluenceSettings
from ideal.influence.statistics import domain_means
from ideal.influence.step import recorded_loss, resolve_loss
from ideal.lm import collate
from ideal.run.config import load_config
from ideal.tiny import char_tokenizer, save_model_dir, tiny_causal_lm
from tests.helpers import make_data_dir, tokenize_pairs

DAMPING = 0.01  # absolute: the same lambda for the engine and the references


@pytest.fixture(scope="module")
def problem():
    """A float64 tiny Llama (1 block; MLP 288 weights) and three domains whose answers have 1-2,
    4-7 and 9-15 characters (+ EOS), with copies 1-3; two references of mixed lengths."""
    tokenizer = char_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer), hidden_size=8, num_layers=1,
                           num_heads=2, intermediate_size=12, seed=3).double().eval()  # fmt: skip
    rng = np.random.default_rng(0)
    answers = {
        "short": lambda i: str(i % 10) * (1 + i % 2),
        "medium": lambda i: "ab" * (2 + i % 2) + "c" * (i % 4),
        "long": lambda i: "the answer is " + "xyz"[i % 3] * (i % 2),
    }
    domains = {
        name: WeightedSet(
            tokenize_pairs(tokenizer, [(f"{name[0]}{i}?", answer(i)) for i in range(6)]),
            [float(rng.integers(1, 4)) for _ in range(6)],
        )
        for name, answer in answers.items()
    }
    references = {
        "r_mixed": WeightedSet.uniform(
            tokenize_pairs(tokenizer, [("q1", "7"), ("q22", "abab"), ("q3", "the answer is z")])
        ),
        "r_long": WeightedSet.uniform(
            tokenize_pairs(tokenizer, [("w", "the answer is x"), ("ww", "abababcc")])
        ),
    }
    counts = {d: sorted({i.num_targets for i in ws.items}) for d, ws in domains.items()}
    assert counts["short"][-1] < counts["medium"][0] and counts["medium"][-1] < counts["long"][0]
    return model, domains, references


def flat_params(layers) -> list[torch.Tensor]:
    return [m.weight for m in layers.values()]  # Llama's MLP has no bias: [W] per layer


def set_loss(model, items, weights, loss: str) -> torch.Tensor:
    """L(S) from one right-padded batch, written out: token NLLs by log_softmax and gather."""
    batch = collate(items, 0, weights)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    labels = batch.labels[:, 1:]
    mask = (labels != -100).double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask  # (B, T-1)
    w = batch.weights.double()
    if loss == "token":
        return (w * nll.sum(1)).sum() / (w * mask.sum(1)).sum()
    return (w * nll.sum(1) / mask.sum(1)).sum() / w.sum()


def set_gradient(model, layers, ws: WeightedSet, loss: str) -> torch.Tensor:
    """grad L(S) over the layers' weights, flattened row-major (out, in) in layer order."""
    grads = torch.autograd.grad(set_loss(model, ws.items, ws.weights, loss), flat_params(layers))
    return torch.cat([g.reshape(-1) for g in grads]).double().detach()


def reference_gauss_newton(model, layers, ws: WeightedSet, loss: str) -> torch.Tensor:
    """sum_z c_z sum_t J_t^T (diag p_t - p_t p_t^T) J_t / sum_z m_z with the Jacobians of one
    unpadded forward per example; (c, m) = (w, w T) for token, (w / T, w) for example."""
    names = [f"{n}.weight" for n in layers]
    shapes = [m.weight.shape for m in layers.values()]
    sizes = [int(np.prod(s)) for s in shapes]
    theta = torch.cat([m.weight.detach().reshape(-1) for m in layers.values()])
    total, mass = torch.zeros(len(theta), len(theta), dtype=torch.float64), 0.0
    for item, w in zip(ws.items, ws.weights, strict=True):
        ids = torch.tensor([item.input_ids])
        target = torch.tensor(
            [t for t in range(len(item.labels) - 1) if item.labels[t + 1] != -100]
        )

        def logits(flat, ids=ids, target=target):
            parts = dict(zip(names, (p.reshape(s) for p, s in zip(flat.split(sizes), shapes,
                                                                    strict=True)), strict=True))  # fmt: skip
            out = torch.func.functional_call(model, parts, (ids,))
            return out.logits[0, target].double()  # (T, V)

        jac = torch.func.jacrev(logits)(theta).detach()  # (T, V, P)
        probs = torch.softmax(logits(theta), dim=-1).detach()
        for t in range(len(target)):
            h = torch.diag(probs[t]) - torch.outer(probs[t], probs[t])  # (V, V)
            g = jac[t].T @ h @ jac[t]
            total += (w if loss == "token" else w / len(target)) * g
        mass += w * len(target) if loss == "token" else w
    return total / mass


def reference_scores(model, layers, domains, references, loss: str) -> np.ndarray:
    """s_ji = g_Rj^T (G + lambda I)^{-1} gbar_i, everything dense float64."""
    mixture = WeightedSet.merged(domains)
    g = reference_gauss_newton(model, layers, mixture, loss)
    system = g + DAMPING * torch.eye(g.shape[0], dtype=torch.float64)
    gbar = torch.stack([set_gradient(model, layers, ws, loss) for ws in domains.values()])
    g_ref = torch.stack([set_gradient(model, layers, ws, loss) for ws in references.values()])
    return (g_ref @ torch.linalg.solve(system, gbar.T)).detach().numpy()


def relative(x, y) -> float:
    return float(np.linalg.norm(np.asarray(x) - np.asarray(y)) / np.linalg.norm(np.asarray(y)))


def test_exact_token_influence_equals_a_dense_float64_reference(problem):
    model, domains, references = problem
    layers = select_layers(model)  # gate, up, down: 3 x 96 weights
    for p in model.parameters():
        p.requires_grad_(True)
    expected = {loss: reference_scores(model, layers, domains, references, loss)
                for loss in ("token", "example")}  # fmt: skip
    got = {}
    for loss in ("token", "example"):
        settings = InfluenceSettings(curvature="exact", damping_abs=DAMPING, batch_size=4,
                                     loss=loss)  # fmt: skip
        result = domain_influence(model, layers, domains, references, settings, pad_id=0)
        assert result.loss == loss
        got[loss] = result.scores
        # the engine's batch products run in float32 on this float64 model: measured 5.7e-8
        # (token) and 3.2e-8 (example) relative; the bound leaves 17x for other BLAS paths
        assert relative(got[loss], expected[loss]) < 1e-6, loss
    # the two objectives are measurably different problems here (measured: 0.31 relative)
    assert relative(expected["token"], expected["example"]) > 0.05
    assert relative(got["token"], got["example"]) > 0.05


def test_dense_gauss_newton_weighs_examples_by_their_target_tokens(problem):
    model, domains, _ = problem
    layers = select_layers(model, ["*.down_proj"])
    sample = WeightedSet.merged(domains)
    for loss in ("token", "example"):
        ours = dense_gauss_newton(model, layers, {"c": sample}, 0, loss)
        theirs = reference_gauss_newton(model, layers, sample, loss)
        assert relative(ours, theirs) < 1e-10, loss  # both float64 end to end
    token = dense_gauss_newton(model, layers, {"c": sample}, 0, "token")
    example = dense_gauss_newton(model, layers, {"c": sample}, 0, "example")
    assert relative(token, example) > 0.05


def explicit_factors(model, name: str, layer, ws: WeightedSet):
    """Token-weighted K-FAC factors and EK-FAC eigenvalues by explicit per-example loops (float64):
    A over every real position weighted by w_z, S = sum_z w_z sum_t g g^T / sum_z w_z T_z and
    Lambda = sum_z w_z (Q_S^T G_z Q_A)^2 / sum_z w_z T_z, G_z by autograd on the weight."""
    d_out, d_in = layer_shape(layer)
    a_sum, s_sum = (
        torch.zeros(d_in, d_in, dtype=torch.float64),
        torch.zeros(d_out, d_out, dtype=torch.float64),
    )
    positions = tokens = 0.0
    per_example = []
    for item, w in zip(ws.items, ws.weights, strict=True):
        seen: dict[str, torch.Tensor] = {}

        def hook(module, args, out, seen=seen):
            seen.update(a=args[0].detach()[0], out=out)

        handle = layer.register_forward_hook(hook)
        try:
            batch = collate([item], 0)
            logits = model(input_ids=batch.input_ids).logits
        finally:
            handle.remove()
        logp = torch.log_softmax(logits[0, :-1].double(), dim=-1)
        labels = batch.labels[0, 1:]
        keep = labels != -100
        nll = -logp[keep].gather(-1, labels[keep].unsqueeze(-1)).sum()
        g_out, g_weight = torch.autograd.grad(nll, [seen["out"], layer.weight])
        a, g = seen["a"].double(), g_out[0].double()
        a_sum += w * a.T @ a
        s_sum += w * g.T @ g
        positions += w * a.shape[0]
        tokens += w * int(keep.sum())
        per_example.append((w, g_weight.double()))
    a_cov, s_cov = a_sum / positions, s_sum / tokens
    a_values, q_a = torch.linalg.eigh(a_cov)
    s_values, q_s = torch.linalg.eigh(s_cov)
    corrected = sum(w * (q_s.T @ grad @ q_a) ** 2 for w, grad in per_example) / tokens
    return q_a, q_s, torch.outer(s_values, a_values), corrected


@pytest.mark.parametrize("curvature", ["ekfac", "kfac"])
def test_ekfac_and_kfac_under_token_equal_dense_token_weighted_references(problem, curvature):
    model, domains, references = problem
    name = "model.layers.0.mlp.down_proj"
    layers = {name: select_layers(model)[name]}
    for p in model.parameters():
        p.requires_grad_(True)
    q_a, q_s, kfac, ekfac = explicit_factors(model, name, layers[name], WeightedSet.merged(domains))
    values = ekfac if curvature == "ekfac" else kfac
    basis = torch.kron(q_s, q_a)  # row-major vec(Q_S X Q_A^T) = (Q_S (x) Q_A) vec(X)
    dense = basis @ torch.diag(values.reshape(-1)) @ basis.T
    system = dense + DAMPING * torch.eye(dense.shape[0], dtype=torch.float64)
    gbar = torch.stack([set_gradient(model, layers, ws, "token") for ws in domains.values()])
    g_ref = torch.stack([set_gradient(model, layers, ws, "token") for ws in references.values()])
    expected = (g_ref @ torch.linalg.solve(system, gbar.T)).detach().numpy()
    settings = InfluenceSettings(curvature=curvature, fisher="empirical", damping_abs=DAMPING,
                                 batch_size=4, loss="token")  # fmt: skip
    result = domain_influence(model, layers, domains, references, settings, pad_id=0)
    # float32 batch statistics and eigenbases on a float64 model: measured 7.4e-8 (ekfac) and
    # 8.2e-8 (kfac) relative; the bound leaves 12x. Example normalisation is 0.41 away.
    assert relative(result.scores, expected) < 1e-6
    example = domain_influence(model, layers, domains, references,
                               InfluenceSettings(curvature=curvature, fisher="empirical",
                                                 damping_abs=DAMPING, batch_size=4), 0)  # fmt: skip
    assert relative(example.scores, expected) > 0.05


def test_refine_products_are_the_token_weighted_gauss_newton(problem):
    model, domains, _ = problem
    layers = select_layers(model)
    for p in model.parameters():
        p.requires_grad_(any(p is m.weight for m in layers.values()))
    sample = WeightedSet.merged(domains)
    batches = make_batches(sample, 4, 0)
    assert any(bool((b.attention_mask == 0).any()) for b in batches)  # padding inside a batch
    k = 2
    torch.manual_seed(0)
    vectors = {n: torch.randn(k, *layer_shape(m), dtype=torch.float64) for n, m in layers.items()}
    product = GaussNewton(model, layers, batches, sample.mass("token"), loss="token")(vectors)
    dense = dense_gauss_newton(model, layers, {"c": sample}, 0, "token")
    flat = torch.cat([vectors[n].reshape(k, -1) for n in layers], dim=1)
    got = torch.cat([product[n].reshape(k, -1) for n in layers], dim=1)
    # as test_refine: Llama's RMSNorm runs in float32 inside a float64 model (5e-8 measured)
    assert float((got - (dense @ flat.T).T).norm() / (dense @ flat.T).norm()) < 1e-6
    for p in model.parameters():
        p.requires_grad_(True)


def test_refine_under_token_reaches_the_exact_token_scores(problem):
    model, domains, references = problem
    layers = select_layers(model)

    def scores(**kwargs):
        settings = InfluenceSettings(batch_size=6, damping_abs=DAMPING, loss="token", **kwargs)
        return domain_influence(model, layers, domains, references, settings, pad_id=0).scores

    exact = scores(curvature="exact")
    # measured: EK-FAC 2.0e-3 relative from exact, 10 refinement steps 4.4e-8 (float32 round-off
    # of the products); the bound leaves 200x
    refined, ekfac = relative(scores(refine=10), exact), relative(scores(), exact)
    assert refined < 1e-5 and refined < 1e-2 * ekfac


def fake_items(targets: list[int]) -> list[Tokenized]:
    return [
        Tokenized([1] * (t + 2), [-100, -100] + [5] * t, f"x:{i}") for i, t in enumerate(targets)
    ]


def test_token_means_are_the_ratio_estimator_with_its_delta_method_error():
    """A population of 400 copies with target lengths 1-30 and contributions that grow with the
    length: the ratio estimator is the token-weighted mean, and its standard error matches the
    spread of the estimate over 3000 redrawn samples of 60 copies (without replacement)."""
    rng = np.random.default_rng(0)
    population = 400
    lengths = rng.integers(1, 31, size=population)
    values = np.stack([0.05 * lengths + rng.normal(0, 1, population),
                       -0.02 * lengths + rng.normal(0, 0.5, population)], axis=1)  # fmt: skip
    items = fake_items(lengths.tolist())
    whole = {"d": WeightedSet(items, [1.0] * population)}
    scores, stderr, _, _ = domain_means(whole, {"d": values}, 2, "token")
    truth = (lengths[:, None] * values).sum(0) / lengths.sum()
    np.testing.assert_allclose(scores[:, 0], truth, rtol=1e-12)
    assert (stderr == 0).all()  # the whole population: no sampling error
    estimates, errors = [], []
    for _ in range(3000):
        pick = rng.choice(population, size=60, replace=False)
        sample = {"d": WeightedSet([items[i] for i in pick], [1.0] * 60, population=population)}
        s, e, _, _ = domain_means(sample, {"d": values[pick]}, 2, "token")
        estimates.append(s[:, 0])
        errors.append(e[:, 0])
    spread, predicted = np.std(estimates, axis=0), np.sqrt(np.mean(np.square(errors), axis=0))
    # Monte Carlo: 3000 draws give the spread to ~1.3 %; the delta method's bias at m = 60 is
    # of order 1/m. Measured: predicted / spread = 1.003 and 1.006
    np.testing.assert_allclose(predicted, spread, rtol=0.06)
    np.testing.assert_allclose(np.mean(estimates, axis=0), truth, atol=0.1 * spread.max())
    # with a single target length the ratio estimator is the example mean, error included
    same = fake_items([7] * 50)
    sample = {"d": WeightedSet(same, [1.0, 2.0] * 25, population=200.0)}
    token = domain_means(sample, {"d": values[:50]}, 2, "token")
    example = domain_means(sample, {"d": values[:50]}, 2, "example")
    for a, b in zip(token[:3], example[:3], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10)


def test_loss_setting_is_checked():
    with pytest.raises(IdealError, match="--loss must be one of"):
        InfluenceSettings(loss="sequence")


# --- where the value comes from: the run config, the CLI, the model directory ---------------

TINY = """
model: base
train_data: train
reference_data: reference
test_data: test
"""


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ([], "example"),
        (["train.loss_normalization=token"], "token"),
        (["train.backend=trl"], "token"),
        (["train.backend=command", "train.command=train.sh {model}"], "token"),
        (["train.backend=llamafactory", "train.base_config=lf.yaml"], "token"),
        (["train.backend=trl", "influence.loss=example"], "example"),
        (["influence.loss=token"], "token"),
    ],
)
def test_influence_loss_auto_follows_the_trainer(tmp_path, overrides, expected):
    path = tmp_path / "c.yaml"
    path.write_text(TINY)
    config = load_config(path, overrides)
    loss, source = config.influence_loss()
    assert loss == expected and config.influence_job().settings.loss == expected
    if any(o.startswith("influence.loss") for o in overrides):
        assert source == "influence.loss"
    else:
        assert "auto" in source and config.train.backend in source
    with pytest.raises(IdealError, match="influence.loss must be one of auto, example, token"):
        load_config(path, ["influence.loss=tokens"])


def test_the_model_directory_record_says_which_loss(tmp_path):
    trl = tmp_path / "trl"
    trl.mkdir()
    (trl / "train_settings.json").write_text(json.dumps({"backend": "trl", "loss": "token"}))
    builtin = tmp_path / "builtin"
    builtin.mkdir()
    (builtin / "train_settings.json").write_text(
        json.dumps({"settings": {"loss_normalization": "example"}})
    )
    assert recorded_loss(trl) == ("token", f"{trl / 'train_settings.json'}: loss")
    assert recorded_loss(builtin)[0] == "example"
    assert "settings.loss_normalization" in recorded_loss(builtin)[1]
    assert recorded_loss(tmp_path) is None
    assert resolve_loss(tmp_path, None) == (
        "example", f"default (no trainer record of the loss in {tmp_path})",
    )  # fmt: skip
    assert resolve_loss(trl, "example") == ("example", "--loss")
    assert resolve_loss(trl, None)[0] == "token"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("token")
    tokenizer = char_tokenizer()
    save_model_dir(root / "model", tiny_causal_lm("llama", vocab_size=len(tokenizer), seed=1),
                   tokenizer)  # fmt: skip
    rows = {
        "short": [{"prompt": f"s{i}?", "completion": str(i)} for i in range(6)],
        "long": [{"prompt": f"l{i}?", "completion": f"a long answer {i}" * 2} for i in range(4)],
    }
    make_data_dir(root / "train", rows)
    make_data_dir(root / "reference", {"r": [{"prompt": "q?", "completion": "some answer"}] * 3})
    return root


def test_cli_records_the_loss_and_uses_token_shares_as_the_size_factor(cli, workspace, tmp_path):
    base = ["influence", "--model", workspace / "model", "--train", workspace / "train",
            "--reference", workspace / "reference", "--curvature", "identity", "--sample", "1.0"]  # fmt: skip
    result = cli(*base, "--loss", "token", "--out", tmp_path / "token")
    assert result.code == 0, result.err
    doc = json.loads((tmp_path / "token" / "influence.json").read_text())
    assert doc["loss"] == "token" and doc["loss_source"] == "--loss"
    assert doc["settings"]["loss"] == "token"
    assert doc["objective"]["size_factor_of"] == "target tokens"
    # t_i: the completion's characters + EOS of every row (the char tokenizer: one per character)
    tokens = {"short": sum(len(str(i)) + 1 for i in range(6)),
              "long": sum(len(f"a long answer {i}" * 2) + 1 for i in range(4))}  # fmt: skip
    assert doc["target_tokens"] == tokens
    share = np.array([tokens[d] for d in doc["domains"]], float) / sum(tokens.values())
    alpha = -share * np.array(doc["scores"]).mean(0)
    assert [doc["sensitivity"][d] for d in doc["domains"]] == pytest.approx(alpha.tolist())
    assert share.tolist() != pytest.approx([0.6, 0.4])  # token shares, not the volumes' 6:4

    # without --loss: the model directory has no trainer record, so example, and it says so
    result = cli(*base, "--out", tmp_path / "default")
    assert result.code == 0, result.err
    doc = json.loads((tmp_path / "default" / "influence.json").read_text())
    assert doc["loss"] == "example" and doc["loss_source"].startswith("default (no trainer record")
    assert doc["target_tokens"] is None and doc["objective"]["size_factor_of"] == "volumes"
    volumes = np.array([doc["volumes"][d] for d in doc["domains"]], float) / 10
    alpha = -volumes * np.array(doc["scores"]).mean(0)
    assert [doc["sensitivity"][d] for d in doc["domains"]] == pytest.approx(alpha.tolist())

    # a model trained by a token-normalising trainer: its record decides
    (workspace / "model" / "train_settings.json").write_text(json.dumps({"loss": "token"}))
    try:
        result = cli(*base, "--out", tmp_path / "recorded")
    finally:
        (workspace / "model" / "train_settings.json").unlink()
    assert result.code == 0, result.err
    doc = json.loads((tmp_path / "recorded" / "influence.json").read_text())
    assert doc["loss"] == "token" and doc["loss_source"].endswith("train_settings.json: loss")
    assert doc["loss_recorded"]["loss"] == "token"


LOOP = """
suite:
  domains:
    - {name: add, task: add, pool: 20, volume: 12}
    - {name: reverse, task: reverse, pool: 20, volume: 8}
  capabilities: [add, reverse]
  reference_size: 4
  test_size: 4
  hidden_size: 16
  num_layers: 1
  num_heads: 2
  intermediate_size: 32
rounds: 1
train: {max_steps: 3, lr: 0.003, batch_size: 8, threads: 1, loss_normalization: token}
influence: {curvature: identity, batch_size: 16}
eval: {max_new_tokens: 2}
"""


def test_the_loop_differentiates_what_the_builtin_trainer_minimised(tmp_path):
    from ideal.run.loop import run_loop

    path = tmp_path / "c.yaml"
    path.write_text(LOOP)
    run_loop(load_config(path), tmp_path / "run")
    here = tmp_path / "run" / "round-0"
    assert json.loads((here / "train.json").read_text())["loss"] == "token"
    doc = json.loads((here / "influence.json").read_text())
    assert doc["loss"] == "token" and "train.loss_normalization" in doc["loss_source"]
    assert doc["loss_recorded"]["loss"] == "token"  # the model's own record agrees
    assert set(doc["target_tokens"]) == {"add", "reverse"}


@pytest.mark.slow
def test_two_processes_give_the_same_token_influence_as_one(tmp_path):
    """Under token normalisation the shards' sums (token-weighted gradients, ratio-estimator sums,
    the Gauss-Newton normaliser sum_z w_z T_z of --refine) add up across processes."""
    from tests.test_distributed import one_and_two_processes, tiny_model_dir

    tiny_model_dir(tmp_path / "model")
    rows = {  # odd sizes (uneven shards) and answers of 1 to 30 characters
        "add": [{"prompt": f"a{i}?", "completion": "x" * (1 + i * 2)} for i in range(13)],
        "mul": [{"prompt": f"m{i}?", "completion": str(i)} for i in range(7)],
    }
    make_data_dir(tmp_path / "train", rows)
    make_data_dir(
        tmp_path / "reference",
        {"r": [{"prompt": f"q{i}", "completion": "y" * (2 + 3 * i)} for i in range(5)]},
    )
    one_and_two_processes(tmp_path, ["influence", "--model", str(tmp_path / "model"), "--train",
                                     str(tmp_path / "train"), "--reference", str(tmp_path / "reference"),
                                     "--batch-size", "2", "--refine", "2", "--loss", "token"])  # fmt: skip
    a = json.loads((tmp_path / "one" / "influence.json").read_text())
    b = json.loads((tmp_path / "two" / "influence.json").read_text())
    assert (a["processes"], b["processes"]) == (1, 2) and a["loss"] == b["loss"] == "token"
    # regrouping the float32 batch products into shards: measured on this data 1.1e-5 (scores) and
    # 1.6e-5 (stderr) relative under token, and 3.0e-5 / 1.6e-5 under example normalisation (the
    # same run with --loss example), above the 1e-5 of test_distributed's equal-length rows for
    # either objective; the bound leaves 3x over the example objective's
    np.testing.assert_allclose(np.array(b["scores"]), np.array(a["scores"]), rtol=1e-4)
    np.testing.assert_allclose(np.array(b["stderr"]), np.array(a["stderr"]), rtol=1e-4)
    assert (np.array(a["stderr"]) > 0).all()  # half of each domain: a sampling error
    assert b["target_tokens"] == a["target_tokens"]
    assert b["reference_loss"] == pytest.approx(a["reference_loss"], rel=1e-6)
