"""merge.py: the merging methods of Sec. 4.1 (and TIES, DARE), Gram collection, the distances of
Sec. 7 (Table 5, Eq. 1), merge_modalities on the naming convention, and the errors that name a key.

Every reference below is computed independently of merge.py: explicit sums, torch.linalg.lstsq or
inv for RegMean, numbers written out by hand for the metrics."""
import inspect
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import merge
from merge import (METHODS, MODALITIES, collect_grams, cosine_dissimilarity, dare, interpolate,
                   l2_distance, merge_modalities, merged_key, modality_weights, regmean, ssd,
                   task_arithmetic, ties, tssd)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def random_state(seed, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"fc.weight": (5, 4), "fc.bias": (5,), "norm.weight": (4,)}
    return {k: torch.randn(*s, generator=g) for k, s in shapes.items()}


def spd_gram(n, seed, tokens=32):
    """A Gram matrix XᵀX of random tokens, and the tokens themselves."""
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x.T @ x, x


# --- a small modality-specific state dict and its maa key set, written out by hand ------------------

DIM = 4
SUBLAYER_PARAMS = {  # sublayer -> {parameter: shape}
    "norm1": {"weight": (DIM,), "bias": (DIM,)},
    "attn": {"qkv.weight": (3 * DIM, DIM), "qkv.bias": (3 * DIM,), "proj.weight": (DIM, DIM)},
    "mlp": {"fc1.weight": (2 * DIM, DIM), "fc2.weight": (DIM, 2 * DIM)},
}
LAYER_EXPERTS = {0: ("v", "l"), 1: ("v", "l", "vl")}  # block 1 is a fusion layer (top M = 1)
SHARED = {"patch_embed.proj.weight": (DIM, 3), "word_embed.weight": (10, DIM),
          "modality_embed": (2, DIM), "itm_head.weight": (2, DIM), "itm_head.bias": (2,)}


def fake_msa(seed=0, identical=False):
    """(msa state dict, maa shapes): experts under .v/.l/.vl, the final norm with three experts,
    embeddings, a head and an integer buffer. identical=True gives every expert the same weights."""
    g = torch.Generator().manual_seed(seed)
    msa = {k: torch.randn(*s, generator=g) for k, s in SHARED.items()}
    msa["text_position_ids"] = torch.arange(7)  # an integer buffer: copied as it is
    maa = {k: s for k, s in SHARED.items()}
    maa["text_position_ids"] = (7,)
    sublayers = [(f"blocks.{i}.{sub}", params, LAYER_EXPERTS[i])
                 for i in LAYER_EXPERTS for sub, params in SUBLAYER_PARAMS.items()]
    sublayers.append(("norm", {"weight": (DIM,), "bias": (DIM,)}, ("v", "l", "vl")))
    for prefix, params, experts in sublayers:
        for param, shape in params.items():
            common = torch.randn(*shape, generator=g)
            for m in experts:
                msa[f"{prefix}.{m}.{param}"] = common.clone() if identical else torch.randn(*shape, generator=g)
            maa[f"{prefix}.{param}"] = shape
    return msa, maa


def expert(sd, maa_key, modality):
    """The expert tensor of maa_key, found by re-inserting the segment before the parameter path."""
    for key, tensor in sd.items():
        if merged_key(key) == (maa_key, modality):
            return tensor
    raise KeyError(maa_key)


def expert_grams(msa, seed=0):
    """A random positive-definite Gram matrix for every 2-D expert weight, keyed by its msa key."""
    grams = {}
    for i, (key, tensor) in enumerate(msa.items()):
        if merged_key(key)[1] is not None and tensor.dim() == 2:
            grams[key] = spd_gram(tensor.shape[1], seed + i)[0]
    return grams


# --- generic methods ------------------------------------------------------------------------------

def test_interpolate_equals_weighted_sum():
    models = [random_state(s) for s in range(3)]
    weights = [0.2, 0.5, 0.3]
    out = interpolate(models, weights)
    for k in models[0]:
        expected = sum(w * m[k].double() for w, m in zip(weights, models))
        assert rel_err(out[k], expected) < 1e-6


def test_task_arithmetic_adds_lambda_times_task_vectors():
    base, models = random_state(10), [random_state(s) for s in range(3)]
    out = task_arithmetic(base, models, lam=0.4)
    for k in base:
        expected = base[k].double() + 0.4 * sum(m[k].double() - base[k].double() for m in models)
        assert rel_err(out[k], expected) < 1e-6


def test_task_arithmetic_lambda_zero_returns_base():
    base, models = random_state(10), [random_state(s) for s in range(2)]
    out = task_arithmetic(base, models, lam=0.0)
    assert all(torch.equal(out[k], base[k]) for k in base)


def test_regmean_gamma_one_minimizes_feature_distance():
    # RegMean's W minimizes Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²: a least-squares problem on the stacked X_i.
    models = [random_state(s) for s in range(3)]
    xs = [spd_gram(4, 20 + s)[1] for s in range(3)]
    grams = [{"fc.weight": x.T @ x} for x in xs]
    out = regmean(models, grams, gamma=1.0)
    stacked_x = torch.cat(xs)
    stacked_y = torch.cat([x @ m["fc.weight"].double().T for x, m in zip(xs, models)])
    expected = torch.linalg.lstsq(stacked_x, stacked_y).solution.T
    assert rel_err(out["fc.weight"], expected) < 1e-5
    for k in ("fc.bias", "norm.weight"):  # everything that is not a linear weight is averaged
        assert rel_err(out[k], sum(m[k].double() for m in models) / 3) < 1e-6


def test_regmean_gamma_half_shrinks_off_diagonal():
    models = [random_state(s) for s in range(2)]
    grams = [{"fc.weight": spd_gram(4, 30 + s)[0]} for s in range(2)]
    out = regmean(models, grams, gamma=0.5)
    shrunk = [0.5 * g["fc.weight"] + 0.5 * torch.diag(torch.diag(g["fc.weight"])) for g in grams]
    expected = (torch.linalg.inv(sum(shrunk))
                @ sum(g @ m["fc.weight"].double().T for g, m in zip(shrunk, models))).T
    assert rel_err(out["fc.weight"], expected) < 1e-5


def test_regmean_gamma_zero_weights_each_input_feature_by_its_diagonal():
    # γ = 0: W[:, j] = Σ_i d_ij W_i[:, j] / Σ_i d_ij with d_i = diag(G_i)
    models = [random_state(s) for s in range(3)]
    grams = [{"fc.weight": spd_gram(4, 40 + s)[0]} for s in range(3)]
    out = regmean(models, grams, gamma=0.0)
    diagonals = [torch.diag(g["fc.weight"]) for g in grams]  # (in,)
    expected = torch.zeros(5, 4, dtype=torch.float64)
    for j in range(4):
        total = sum(d[j] for d in diagonals)
        expected[:, j] = sum(d[j] * m["fc.weight"][:, j].double() for d, m in zip(diagonals, models)) / total
    assert rel_err(out["fc.weight"], expected) < 1e-6


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
def test_regmean_equals_average_when_all_grams_are_equal(gamma):
    models = [random_state(s) for s in range(3)]
    gram = spd_gram(4, 50)[0]
    out = regmean(models, [{"fc.weight": gram}] * 3, gamma=gamma)
    assert rel_err(out["fc.weight"], sum(m["fc.weight"].double() for m in models) / 3) < 1e-6


def test_ties_matches_hand_computation():
    base = {"w": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    tau1 = torch.tensor([3.0, -1.0, 0.5, 2.0])
    tau2 = torch.tensor([-2.0, -4.0, 0.1, 1.0])
    models = [{"w": base["w"] + tau1}, {"w": base["w"] + tau2}]
    # density 0.5 keeps 2 entries each: τ̂1 = [3, 0, 0, 2], τ̂2 = [-2, -4, 0, 0];
    # elected signs of Σ τ̂ = [1, -4, 0, 2]: [+, -, none, +]; disjoint means [3, -4, 0, 2]
    out = ties(base, models, density=0.5, lam=0.5)
    assert torch.equal(out["w"], torch.tensor([1 + 1.5, 1 - 2.0, 1.0, 1 + 1.0]))


def test_dare_keeps_or_drops_each_entry_and_rescales_by_one_over_one_minus_p():
    base = {"w": torch.zeros(10_000)}
    tau = torch.full((10_000,), 2.0)
    out = dare(base, [{"w": tau}], p=0.3, lam=1.0, seed=0)["w"]
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 2.0 / 0.7))
    assert abs((~kept).float().mean().item() - 0.3) < 0.02  # each entry dropped with probability p


def test_dare_is_deterministic_under_a_seed_and_differs_across_seeds():
    base, models = random_state(10), [random_state(s) for s in range(2)]
    first = dare(base, models, p=0.5, lam=1.0, seed=3)
    again = dare(base, models, p=0.5, lam=1.0, seed=3)
    other = dare(base, models, p=0.5, lam=1.0, seed=4)
    assert all(torch.equal(first[k], again[k]) for k in base)
    assert not torch.equal(first["fc.weight"], other["fc.weight"])


def test_dare_with_p_zero_equals_task_arithmetic():
    base, models = random_state(10), [random_state(s) for s in range(3)]
    out = dare(base, models, p=0.0, lam=0.7, seed=0)
    reference = task_arithmetic(base, models, lam=0.7)
    assert all(torch.equal(out[k], reference[k]) for k in base)


def test_bf16_inputs_keep_their_dtype():
    models = [{k: v.bfloat16() for k, v in random_state(s).items()} for s in range(2)]
    out = interpolate(models, [0.5, 0.5])
    assert {v.dtype for v in out.values()} == {torch.bfloat16}
    expected = (0.5 * models[0]["fc.weight"].float() + 0.5 * models[1]["fc.weight"].float()).bfloat16()
    assert torch.equal(out["fc.weight"], expected)  # computed in float32, rounded once


# --- collect_grams -----------------------------------------------------------------------------------

class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 6)
        self.fc2 = nn.Linear(6, 3)
        self.unused = nn.Linear(5, 2)  # never called: must get no Gram entry

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def all_hooks(model):
    return [h for m in model.modules() for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())]


def test_collect_grams_equals_xtx_over_all_tokens_of_all_batches():
    torch.manual_seed(0)
    model = TwoLinears()
    batches = [torch.randn(2, 4, 5), torch.randn(3, 7, 5)]  # (B, T, D): every token counts
    grams = collect_grams(model, batches)
    assert set(grams) == {"fc1.weight", "fc2.weight"}  # the unused linear has no entry
    expected_fc1 = sum(x.reshape(-1, 5).double().T @ x.reshape(-1, 5).double() for x in batches)
    with torch.no_grad():
        hidden = [torch.relu(model.fc1(x)).reshape(-1, 6).double() for x in batches]
    expected_fc2 = sum(h.T @ h for h in hidden)
    assert grams["fc1.weight"].dtype == torch.float64
    assert rel_err(grams["fc1.weight"], expected_fc1) < 1e-6
    assert rel_err(grams["fc2.weight"], expected_fc2) < 1e-6
    assert all_hooks(model) == []


def test_collect_grams_over_many_batches_folds_float32_partials_into_float64_exactly():
    torch.manual_seed(0)
    model = TwoLinears()
    batches = [torch.randn(3, 5) + 100.0 for _ in range(2 * merge._GramSums.FOLD + 5)]  # two folds + a rest
    grams = collect_grams(model, batches, modules=[model.fc1])
    expected = sum(x.double().T @ x.double() for x in batches)
    assert grams["fc1.weight"].dtype == torch.float64
    assert rel_err(grams["fc1.weight"], expected) < 1e-6


def test_collect_grams_only_for_the_given_modules_with_a_custom_forward():
    model = TwoLinears()
    x = torch.randn(2, 3, 5)
    grams = collect_grams(model, [{"x": x}], forward=lambda m, batch: m(batch["x"]), modules=[model.fc2])
    assert list(grams) == ["fc2.weight"]


def test_collect_grams_removes_hooks_even_when_forward_raises():
    model = TwoLinears()

    def failing_forward(m, batch):
        m(batch)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        collect_grams(model, [torch.randn(2, 5)], forward=failing_forward)
    assert all_hooks(model) == []


# --- merge_modalities on the naming convention ------------------------------------------------------------

def test_merged_key_deletes_the_modality_segment():
    assert merged_key("blocks.3.attn.v.qkv.weight") == ("blocks.3.attn.qkv.weight", "v")
    assert merged_key("blocks.11.mlp.vl.fc1.bias") == ("blocks.11.mlp.fc1.bias", "vl")
    assert merged_key("norm.l.weight") == ("norm.weight", "l")
    assert merged_key("word_embed.weight") == ("word_embed.weight", None)
    assert merged_key("level.vlx.weight") == ("level.vlx.weight", None)  # only whole segments count
    assert MODALITIES == ("v", "l", "vl")
    assert METHODS == ("interpolation", "modality_arithmetic", "regmean", "ties", "dare")


def test_declared_options_are_each_methods_keyword_arguments():
    # METHOD_OPTIONS / TECHNIQUE_OPTIONS are what users read and what errors list; the small functions
    # receive them as keyword-only arguments, so the two must name the same options in the same order.
    for functions, declared in ((merge._MERGERS, merge.METHOD_OPTIONS),
                                (merge._TECHNIQUES, merge.TECHNIQUE_OPTIONS)):
        assert list(functions) == list(declared)
        for name, function in functions.items():
            keyword_only = [p.name for p in inspect.signature(function).parameters.values()
                            if p.kind is p.KEYWORD_ONLY]
            assert keyword_only == list(declared[name]), name
    assert merge.METHOD_OPTIONS["regmean"]["gamma"] == 1.0 and merge.TECHNIQUE_OPTIONS["magmax"]["lam"] == 1.0


def test_defaults_are_filled_in_and_required_options_named():
    msa, _ = fake_msa()
    grams = expert_grams(msa)
    assert all(torch.equal(a, b) for a, b in zip(merge_modalities(msa, "regmean", grams=grams).values(),
                                                 merge_modalities(msa, "regmean", grams=grams, gamma=1.0).values()))
    with pytest.raises(ValueError, match=r"method 'dare' needs option 'seed' \(options: p, lam, seed, init_state\)"):
        merge_modalities(msa, "dare", p=0.5, lam=1.0, init_state={})
    with pytest.raises(ValueError, match="unknown option 'gama' for method 'regmean'; valid options: grams, gamma"):
        merge_modalities(msa, "regmean", grams=grams, gama=0.5)


def method_options(msa, seed_state):
    return {
        "interpolation": dict(alpha=0.3),
        "modality_arithmetic": dict(lam=0.5, init_state=seed_state),
        "regmean": dict(grams=expert_grams(msa), gamma=0.9),
        "ties": dict(density=0.5, lam=1.0, init_state=seed_state),
        "dare": dict(p=0.3, lam=1.0, seed=0, init_state=seed_state),
    }


@pytest.mark.parametrize("method", METHODS)
def test_merged_keys_and_shapes_are_exactly_the_maa_ones(method):
    msa, maa_shapes = fake_msa()
    seed_state = {k: torch.randn(s) for k, s in maa_shapes.items()}
    out = merge_modalities(msa, method, **method_options(msa, seed_state)[method])
    assert {k: tuple(v.shape) for k, v in out.items()} == maa_shapes
    for key in SHARED:  # Sec. 4: the embeddings (and heads) are not merged
        assert torch.equal(out[key], msa[key]) and out[key] is not msa[key]
    assert torch.equal(out["text_position_ids"], torch.arange(7))


def test_interpolation_is_alpha_weighted_with_one_third_for_the_fusion_expert():
    msa, _ = fake_msa()
    out = merge_modalities(msa, "interpolation", alpha=0.3)
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.norm1.bias"):  # v and l only
        expected = 0.3 * expert(msa, key, "v").double() + 0.7 * expert(msa, key, "l").double()
        assert rel_err(out[key], expected) < 1e-6
    for key in ("blocks.1.mlp.fc2.weight", "norm.weight"):  # ⅔(αW_v + (1−α)W_l) + ⅓W_vl
        v, l, vl = (expert(msa, key, m).double() for m in MODALITIES)
        assert rel_err(out[key], 2 / 3 * (0.3 * v + 0.7 * l) + 1 / 3 * vl) < 1e-6


def test_interpolation_alpha_one_returns_vision_expert():
    msa, _ = fake_msa()
    out = merge_modalities(msa, "interpolation", alpha=1.0)
    for key in ("blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight", "blocks.0.mlp.fc1.weight"):
        assert torch.equal(out[key], expert(msa, key, "v"))  # bit for bit


def test_interpolation_outside_zero_one_extrapolates():
    msa, _ = fake_msa()
    out = merge_modalities(msa, "interpolation", alpha=1.5)
    key = "blocks.0.mlp.fc1.weight"
    expected = 1.5 * expert(msa, key, "v").double() - 0.5 * expert(msa, key, "l").double()
    assert rel_err(out[key], expected) < 1e-6


def test_modality_arithmetic_adds_lambda_times_modality_vectors():
    msa, maa_shapes = fake_msa()
    seed_state = {k: torch.randn(s) for k, s in maa_shapes.items()}
    out = merge_modalities(msa, "modality_arithmetic", lam=0.4, init_state=seed_state)
    for key, modalities in (("blocks.0.attn.qkv.weight", ("v", "l")), ("blocks.1.mlp.fc1.weight", MODALITIES)):
        w0 = seed_state[key].double()
        expected = w0 + 0.4 * sum(expert(msa, key, m).double() - w0 for m in modalities)
        assert rel_err(out[key], expected) < 1e-6


def test_modality_arithmetic_lambda_zero_returns_w0():
    msa, maa_shapes = fake_msa()
    seed_state = {k: torch.randn(s) for k, s in maa_shapes.items()}
    out = merge_modalities(msa, "modality_arithmetic", lam=0.0, init_state=seed_state)
    for key in maa_shapes:
        if key not in SHARED and key != "text_position_ids":
            assert torch.equal(out[key], seed_state[key])


def test_regmean_across_experts_equals_closed_form():
    msa, _ = fake_msa()
    grams = expert_grams(msa)
    out = merge_modalities(msa, "regmean", grams=grams, gamma=0.8)
    for key, modalities in (("blocks.0.attn.qkv.weight", ("v", "l")), ("blocks.1.mlp.fc2.weight", MODALITIES)):
        keys = {m: k for k in msa for m in modalities if merged_key(k) == (key, m)}
        shrunk = {m: 0.8 * grams[keys[m]] + 0.2 * torch.diag(torch.diag(grams[keys[m]])) for m in modalities}
        expected = (torch.linalg.inv(sum(shrunk.values()))
                    @ sum(shrunk[m] @ msa[keys[m]].double().T for m in modalities)).T
        assert rel_err(out[key], expected) < 1e-5
    bias = "blocks.1.attn.qkv.bias"  # not a linear weight: the plain mean of the three experts
    assert rel_err(out[bias], sum(expert(msa, bias, m).double() for m in MODALITIES) / 3) < 1e-6


def test_ties_and_dare_across_experts_equal_the_generic_methods():
    msa, maa_shapes = fake_msa()
    seed_state = {k: torch.randn(s) for k, s in maa_shapes.items()}
    vision, language = modality_weights(msa)
    vision = {k: v for k, v in vision.items() if k.startswith("blocks.0.")}  # layers with v and l only
    language = {k: language[k] for k in vision}
    base = {k: seed_state[k] for k in vision}
    merged = merge_modalities(msa, "ties", density=0.5, lam=0.8, init_state=seed_state)
    reference = ties(base, [vision, language], density=0.5, lam=0.8)
    assert all(torch.equal(merged[k], reference[k]) for k in vision)
    merged = merge_modalities(msa, "dare", p=0.4, lam=0.8, seed=1, init_state=seed_state)
    reference = dare(base, [vision, language], p=0.4, lam=0.8, seed=1)
    assert all(torch.equal(merged[k], reference[k]) for k in vision)


@pytest.mark.parametrize("method", METHODS)
def test_merging_identical_experts_gives_the_common_expert_exactly(method):
    # After the seed hand-over every expert equals W_0; merging must give W_0 back, bit for bit.
    msa, maa_shapes = fake_msa(identical=True)
    seed_state = {k: (expert(msa, k, "v") if k not in SHARED and k != "text_position_ids" else None)
                  for k in maa_shapes}
    out = merge_modalities(msa, method, **method_options(msa, seed_state)[method])
    for key, common in seed_state.items():
        if common is not None:
            assert torch.equal(out[key], common), key


def test_modality_weights_pairs_vision_and_language_experts_by_maa_key():
    msa, maa_shapes = fake_msa()
    vision, language = modality_weights(msa)
    mergeable = {k for k in maa_shapes if k not in SHARED and k != "text_position_ids"}
    assert set(vision) == set(language) == mergeable
    assert vision["blocks.1.attn.qkv.weight"] is msa["blocks.1.attn.v.qkv.weight"]
    assert language["norm.weight"] is msa["norm.l.weight"]
    fusion, _ = modality_weights(msa, a="vl", b="v")
    assert set(fusion) == {k for k in mergeable if k.startswith(("blocks.1.", "norm."))}


# --- distances (Sec. 7) -------------------------------------------------------------------------------------

X = torch.tensor([3.0, -1.0, 0.5, 0.0, 2.0, -0.25])
Y = torch.tensor([1.0, 1.0, 0.5, 0.0, -4.0, -0.75])


def test_metrics_on_a_fixed_example_match_hand_computation():
    # differences 2, -2, 0, 0, 6, 0.5 -> squares sum to 44.25
    assert l2_distance(X, Y) == pytest.approx(math.sqrt(44.25), rel=1e-12)
    # x·y = 3 - 1 + 0.25 + 0 - 8 + 0.1875; ‖x‖² = 14.3125; ‖y‖² = 18.8125
    assert cosine_dissimilarity(X, Y) == pytest.approx(1 + 5.5625 / math.sqrt(14.3125 * 18.8125), rel=1e-12)
    # |x+y|/(|x|+|y|) = 4/4, 0/2, 1/1, 0/0 := 1, 2/6, 1/1 -> SSD = 1 - (13/3)/6 = 5/18
    assert ssd(X, Y) == pytest.approx(5 / 18, rel=1e-12)
    # k = 0.5 zeroes 3 of 6 in each: x -> [3, -1, 0, 0, 2, 0], y -> [1, 1, 0, 0, -4, 0];
    # positions 3, 4, 6 are zero in both and left out: 1 - (1 + 0 + 1/3)/3 = 5/9
    assert tssd(X, Y, k=0.5) == pytest.approx(5 / 9, rel=1e-12)


def test_ssd_and_tssd_are_zero_for_identical_and_one_for_opposite_vectors():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert ssd(x, x.clone()) == 0.0 and tssd(x, x.clone()) == 0.0
    assert ssd(x, -x) == 1.0 and tssd(x, -x) == 1.0


def test_state_dict_input_equals_the_sorted_flattened_concatenation():
    g = torch.Generator().manual_seed(1)
    a = {"b.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(5, generator=g)}
    b = {"b.weight": torch.randn(3, 4, generator=g), "a.bias": torch.randn(5, generator=g)}
    flat_a = torch.cat([a["a.bias"], a["b.weight"].flatten()])
    flat_b = torch.cat([b["a.bias"], b["b.weight"].flatten()])
    for metric in (l2_distance, cosine_dissimilarity, ssd, tssd):
        assert metric(a, b) == pytest.approx(metric(flat_a, flat_b), rel=1e-12)


def test_l2_and_cosine_agree_with_torch():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(300, generator=g), torch.randn(300, generator=g)
    assert l2_distance(x, y) == pytest.approx(torch.linalg.vector_norm(x.double() - y.double()).item(), rel=1e-12)
    assert cosine_dissimilarity(x, y) == pytest.approx(
        1 - F.cosine_similarity(x.double(), y.double(), dim=0).item(), rel=1e-10)


def test_streamed_tssd_equals_the_sort_based_definition(monkeypatch):
    monkeypatch.setattr(merge, "_CHUNK", 7)  # many chunks per tensor, as on a real model
    g = torch.Generator().manual_seed(3)
    a = {f"w{i}": torch.randn(5, 9, generator=g) for i in range(4)}
    b = {f"w{i}": torch.randn(5, 9, generator=g) for i in range(4)}
    x = torch.cat([a[k].flatten() for k in sorted(a)]).double()
    y = torch.cat([b[k].flatten() for k in sorted(b)]).double()
    cut = int(0.3 * x.numel())
    x = torch.where(x.abs() <= x.abs().sort().values[cut - 1], 0.0, x)
    y = torch.where(y.abs() <= y.abs().sort().values[cut - 1], 0.0, y)
    both_zero = (x == 0) & (y == 0)
    x, y = x[~both_zero], y[~both_zero]
    expected = 1 - ((x + y).abs() / (x.abs() + y.abs())).mean().item()
    assert tssd(a, b, k=0.3) == pytest.approx(expected, rel=1e-12)


# --- bad input: one clear error naming the key ------------------------------------------------------------

def test_missing_and_extra_keys_are_named():
    a, b = random_state(0), random_state(1)
    del b["fc.bias"]
    with pytest.raises(KeyError, match="'fc.bias': in model 0 but missing from model 1"):
        interpolate([a, b], [0.5, 0.5])
    b = {**random_state(1), "extra.weight": torch.zeros(2)}
    with pytest.raises(KeyError, match="'extra.weight': in model 0 but not in base"):
        task_arithmetic(a, [b], lam=1.0)
    with pytest.raises(KeyError, match="'extra.weight'"):  # distances: a key in only one state dict
        l2_distance(a, b)


def test_shape_dtype_and_integer_mismatches_are_named():
    a, b = random_state(0), random_state(1)
    b["fc.weight"] = torch.zeros(5, 3)
    with pytest.raises(ValueError, match=r"key 'fc.weight': shape \(5, 4\) in model 0 vs \(5, 3\) in model 1"):
        interpolate([a, b], [0.5, 0.5])
    b = {**random_state(1), "fc.bias": torch.zeros(5, dtype=torch.float64)}
    with pytest.raises(ValueError, match="key 'fc.bias': dtype torch.float32 in model 0 vs torch.float64"):
        interpolate([a, b], [0.5, 0.5])
    a2, b2 = {**a, "steps": torch.tensor(3)}, {**random_state(1), "steps": torch.tensor(3)}
    with pytest.raises(ValueError, match="key 'steps': model 0 holds a torch.int64 tensor"):
        interpolate([a2, b2], [0.5, 0.5])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input_is_named(bad):
    a, b = random_state(0), random_state(1)
    b["norm.weight"][2] = bad
    with pytest.raises(ValueError, match="key 'norm.weight': model 1 holds NaN or Inf"):
        interpolate([a, b], [0.5, 0.5])
    with pytest.raises(ValueError, match="key 'norm.weight'"):
        ssd(a, b)


def test_non_finite_result_is_named():
    big = {"w": torch.full((3,), 60000.0, dtype=torch.float16)}
    with pytest.raises(ValueError, match="key 'w': the merged tensor holds NaN or Inf"):
        interpolate([big, big], [1.0, 1.0])  # 120000 overflows float16


def test_missing_gram_and_singular_system_are_named():
    models = [random_state(s) for s in range(2)]
    gram = spd_gram(4, 0)[0]
    with pytest.raises(KeyError, match="'fc.weight': no Gram matrix in the grams of model 1"):
        regmean(models, [{"fc.weight": gram}, {}])
    zero_feature = gram.clone()
    zero_feature[1], zero_feature[:, 1] = 0, 0
    with pytest.raises(ValueError, match="key 'fc.weight': the RegMean system .* singular"):
        regmean(models, [{"fc.weight": zero_feature}] * 2)
    with pytest.raises(ValueError, match=r"key 'fc.weight': Gram matrix of shape \(3, 3\)"):
        regmean(models, [{"fc.weight": torch.eye(3)}] * 2)
    msa, _ = fake_msa()
    grams = expert_grams(msa)
    del grams["blocks.1.mlp.vl.fc1.weight"]
    with pytest.raises(KeyError, match="'blocks.1.mlp.vl.fc1.weight': no Gram matrix"):
        merge_modalities(msa, "regmean", grams=grams)


def test_unknown_method_and_options_are_named():
    msa, _ = fake_msa()
    with pytest.raises(ValueError, match="unknown option 'alfa' for method 'interpolation'; valid options: alpha"):
        merge_modalities(msa, "interpolation", alfa=0.5)
    with pytest.raises(ValueError, match="unknown method 'average'; valid methods: interpolation, "):
        merge_modalities(msa, "average")
    with pytest.raises(ValueError, match="method 'modality_arithmetic' needs option 'init_state'"):
        merge_modalities(msa, "modality_arithmetic", lam=0.5)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\)"):
        merge_modalities(msa, "dare", p=1.0, lam=1.0, seed=0, init_state={})
    with pytest.raises(ValueError, match=r"gamma must be in \[0, 1\]"):
        regmean([random_state(0)] * 2, [{}] * 2, gamma=2.0)


def test_bad_msa_experts_and_init_state_are_named():
    msa, maa_shapes = fake_msa()
    bad = {**msa, "blocks.0.attn.l.proj.weight": torch.zeros(DIM, DIM + 1)}
    with pytest.raises(ValueError, match=r"key 'blocks.0.attn.proj.weight': shape \(4, 4\) in "
                                         r"blocks.0.attn.v.proj.weight vs \(4, 5\) in blocks.0.attn.l.proj.weight"):
        merge_modalities(bad, "interpolation", alpha=0.5)
    bad = {**msa, "blocks.0.norm1.v.weight": torch.ones(DIM, dtype=torch.long)}
    with pytest.raises(ValueError, match="key 'blocks.0.norm1.weight': blocks.0.norm1.v.weight holds a torch.int64"):
        merge_modalities(bad, "interpolation", alpha=0.5)
    bad = {k: v for k, v in msa.items() if k != "blocks.0.mlp.l.fc1.weight"}
    with pytest.raises(ValueError, match=r"key 'blocks.0.mlp.fc1.weight': experts \['v'\] found"):
        merge_modalities(bad, "interpolation", alpha=0.5)
    seed_state = {k: torch.randn(s) for k, s in maa_shapes.items() if k != "norm.bias"}
    with pytest.raises(KeyError, match="'norm.bias': missing from init_state"):
        merge_modalities(msa, "modality_arithmetic", lam=1.0, init_state=seed_state)


# --- merge.py is copied into other projects: torch and the standard library only ---------------------------

def test_merge_py_runs_alone_with_only_torch(tmp_path):
    shutil.copy(os.path.join(os.path.dirname(os.path.dirname(__file__)), "merge.py"), tmp_path)
    code = ("import sys, torch, merge\n"
            "assert merge.__file__.startswith(sys.argv[1])\n"
            "assert not {'model', 'data', 'train', 'vlmerge', 'einops'} & set(sys.modules)\n"
            "sd = {'embed': torch.ones(2), 'attn.v.w': torch.tensor([1.0, 3.0]), 'attn.l.w': torch.tensor([3.0, -1.0])}\n"
            "out = merge.merge_modalities(sd, 'interpolation', alpha=0.25)\n"
            "print(out['attn.w'].tolist(), round(merge.tssd(torch.tensor([3.0, -1, 0.5, 0, 2, -0.25]),"
            " torch.tensor([1.0, 1, 0.5, 0, -4, -0.75])), 6))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[2.5, 0.0] 0.555556"  # 0.25·v + 0.75·l; TSSD = 5/9


# --- with the project's model.py: the merged state dict loads into the maa model -------------------------

SMALL = dict(vocab_size=100, image_size=32, depth=4)


@pytest.mark.parametrize("method", METHODS)
def test_merged_state_dict_loads_strictly_into_maa_for_every_variant(method):
    model = pytest.importorskip("model")
    torch.manual_seed(0)
    maa = model.build_model("vit_tiny", "maa", **SMALL)
    for variant in model.VARIANTS:
        msa = model.build_model("vit_tiny", variant, **SMALL).state_dict()
        grams = {k: torch.eye(v.shape[1]) for k, v in msa.items() if merged_key(k)[1] and v.dim() == 2}
        options = method_options(msa, maa.state_dict())[method]
        options = {**options, "grams": grams} if method == "regmean" else options
        maa.load_state_dict(merge_modalities(msa, method, **options), strict=True)


def test_regmean_with_grams_collected_on_the_msa_model_loads_into_maa():
    model = pytest.importorskip("model")
    torch.manual_seed(0)
    msa = model.build_model("vit_tiny", "msa", **SMALL).eval()
    vlmerge = pytest.importorskip("vlmerge")
    batch = {"images": torch.randn(2, 3, 32, 32), "input_ids": torch.randint(0, 100, (2, 6)),
             "attention_mask": torch.ones(2, 6, dtype=torch.long)}
    # the production Gram forward: both routes, every expert on its own modality
    grams = collect_grams(msa, [batch], forward=vlmerge.modality_forward)
    lower, top = "blocks.0.attn.{}.qkv.weight", "blocks.3.attn.{}.qkv.weight"
    assert {k for k in grams if k.startswith(("blocks.0.attn.", "blocks.3.attn.")) and k.endswith("qkv.weight")} == \
        {lower.format("v"), lower.format("l"), top.format("v"), top.format("l"), top.format("vl")}
    # the l expert of layer 0 saw exactly the text embeddings, normed: its Gram is their X^T X
    with torch.no_grad():
        x = msa.blocks[0].norm1["l"](msa.embed_text(batch["input_ids"])).flatten(0, 1).double()
    torch.testing.assert_close(grams[lower.format("l")].double(), x.T @ x, rtol=1e-4, atol=1e-4)
    merged = merge_modalities(msa.state_dict(), "regmean", grams=grams, gamma=0.5)
    model.build_model("vit_tiny", "maa", **SMALL).load_state_dict(merged, strict=True)


@pytest.mark.parametrize("method", METHODS)
def test_seed_handover_then_merge_gives_the_maa_weights_back(method):
    # Sec. 4.3: every expert starts as the seed weight W_0; merging right after the hand-over
    # must return W_0 exactly, so the merged model computes what the maa model computed.
    model = pytest.importorskip("model")
    torch.manual_seed(0)
    maa = model.build_model("vit_tiny", "maa", **SMALL)
    with torch.no_grad():
        for p in maa.parameters():
            p.add_(0.05 * torch.randn_like(p))
    msa = model.expand_experts(maa.state_dict(), model.build_model("vit_tiny", "msa", **SMALL))
    merged = merge_modalities(msa, method, **method_options(msa, maa.state_dict())[method])
    assert merged.keys() == maa.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in maa.state_dict().items())


def test_model_shared_key_and_merged_key_are_one_rule():
    # model.py and merge.py share the v/l/vl convention without importing each other: on every key
    # of every variant and task head the two must agree, and both must refuse two modality segments.
    model = pytest.importorskip("model")
    checked = 0
    for variant in model.VARIANTS:
        for task in model.TASKS:
            for key in model.build_model("vit_tiny", variant, task, **SMALL).state_dict():
                assert model.shared_key(key) == merged_key(key)[0], (variant, task, key)
                checked += 1
    assert checked > 0
    assert model.shared_key("blocks.3.attn.v.qkv.weight") == "blocks.3.attn.qkv.weight"
    for rule in (model.shared_key, merged_key):
        with pytest.raises(ValueError, match=r"key 'blocks.0.attn.v.l.qkv.weight': more than one modality segment"):
            rule("blocks.0.attn.v.l.qkv.weight")
