"""merge.py part 5: merging over time (TIME, Dziadzio et al. 2025) on small random state dicts.

Every reference is computed here independently of TemporalMerge: the EMA's closed form as an
explicit sum, the schedules from their formulas written out by hand, MagMax by argmax over the
stacked task vectors (and a tie worked by hand)."""
import math

import pytest
import torch

from merge import (DEPLOYS, INITS, SCHEDULES, TECHNIQUES, TemporalMerge, dare, interpolate, magmax,
                   recency_weights, ties)

SHAPES = {"fc.weight": (5, 4), "fc.bias": (5,), "scale": ()}


def random_state(seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def combine(pairs):
    """Σ c · state_dict over (c, state_dict) pairs, key by key."""
    return {k: sum(c * sd[k] for c, sd in pairs) for k in pairs[0][1]}


def assert_close(a, b, atol=1e-12):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol)


def assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


BASE = random_state(0)
EXPERTS = [random_state(s) for s in range(1, 6)]


# --- the running merge (EMA) --------------------------------------------------------------------

@pytest.mark.parametrize("w", [0.5, 0.3])
def test_ema_equals_its_closed_form_with_theta0(w):
    tm = TemporalMerge(BASE, ema_weight=w)
    for t in range(1, len(EXPERTS) + 1):
        tm.store(EXPERTS[t - 1])
        # E_t = (1−w)^t θ_0 + Σ_k w(1−w)^{t−k} θ^s_k
        pairs = [((1 - w) ** t, BASE)] + [(w * (1 - w) ** (t - k), EXPERTS[k - 1]) for k in range(1, t + 1)]
        assert_close(tm.deploy_weights(), combine(pairs))


def test_ema_equals_its_closed_form_without_theta0():
    w = 0.3
    tm = TemporalMerge(BASE, ema_weight=w, ema_from_base=False)
    assert_equal(tm.deploy_weights(), BASE)  # nothing stored yet: θ_0
    tm.store(EXPERTS[0])
    assert_equal(tm.deploy_weights(), EXPERTS[0])  # E_1 = θ^s_1
    for t in range(2, len(EXPERTS) + 1):
        tm.store(EXPERTS[t - 1])
        # E_t = (1−w)^{t−1} θ^s_1 + Σ_{k≥2} w(1−w)^{t−k} θ^s_k
        pairs = [((1 - w) ** (t - 1), EXPERTS[0])] + [(w * (1 - w) ** (t - k), EXPERTS[k - 1])
                                                     for k in range(2, t + 1)]
        assert_close(tm.deploy_weights(), combine(pairs))


def test_best_in_time_keeps_each_update_scaled_by_w():
    """init = deploy = ema under interpolation: E_t − E_{t−1} = w·(θ^s_t − θ^i_t)."""
    w = 0.3
    tm = TemporalMerge(BASE, init="ema", deploy="ema", ema_weight=w)
    for t in range(1, 5):
        start = tm.init_weights()  # θ^i_t = E_{t−1}
        previous = tm.deploy_weights()
        assert_equal(start, previous)
        delta = random_state(100 + t)
        trained = {k: start[k] + delta[k] for k in start}  # "training" = θ^i_t + a random step
        tm.store(trained)
        now = tm.deploy_weights()
        assert_close({k: now[k] - previous[k] for k in now},
                     {k: w * (trained[k] - start[k]) for k in now})


def test_task_arithmetic_ema_at_half_is_the_interpolation_ema():
    ta = TemporalMerge(BASE, technique="task_arithmetic", lam=0.5)
    interp = TemporalMerge(BASE, technique="interpolation", ema_weight=0.5)
    for expert in EXPERTS:
        ta.store(expert)
        interp.store(expert)
        assert_close(ta.deploy_weights(), interp.deploy_weights())


def test_task_arithmetic_ema_keeps_theta0_as_the_anchor():
    lam = 0.3
    tm = TemporalMerge(BASE, technique="task_arithmetic", lam=lam)
    previous = BASE
    for expert in EXPERTS[:3]:
        tm.store(expert)
        # E_t − θ_0 = λ[(θ^s_t − θ_0) + (E_{t−1} − θ_0)]
        expected = {k: BASE[k] + lam * ((expert[k] - BASE[k]) + (previous[k] - BASE[k])) for k in BASE}
        assert_close(tm.deploy_weights(), expected)
        previous = expected


def test_dare_draws_fresh_masks_at_every_step():
    p, lam, seed = 0.5, 1.0, 7
    tm = TemporalMerge(BASE, technique="dare", p=p, lam=lam, seed=seed)
    expert = EXPERTS[0]
    tm.store(expert)
    first = tm.deploy_weights()
    tm.store(expert)  # the same expert again
    second = tm.deploy_weights()
    # what a fixed seed would give: the same masks at both folds
    fixed_first = dare(BASE, [expert, BASE], p, lam, seed)
    fixed_second = dare(BASE, [expert, fixed_first], p, lam, seed)
    assert any(not torch.equal(second[k], fixed_second[k]) for k in second)
    # seed + t at step t
    assert_equal(first, dare(BASE, [expert, BASE], p, lam, seed + 1))
    assert_equal(second, dare(BASE, [expert, first], p, lam, seed + 2))
    # the mask on the newest expert differs between the two steps
    kept = [(dare(BASE, [expert, BASE], p, lam, s)["fc.weight"] != BASE["fc.weight"]) for s in (seed + 1, seed + 2)]
    assert not torch.equal(*kept)


# --- offline merging (all) and the schedules ----------------------------------------------------

def test_all_with_uniform_weights_is_interpolate_with_one_over_t():
    tm = TemporalMerge(BASE, init="zs", deploy="all")
    tm.store(EXPERTS[0])
    assert_equal(tm.deploy_weights(), EXPERTS[0])  # one expert: nothing to merge
    for t in range(2, len(EXPERTS) + 1):
        tm.store(EXPERTS[t - 1])
        assert_equal(tm.deploy_weights(), interpolate(EXPERTS[:t], [1 / t] * t))


@pytest.mark.parametrize("with_base", [False, True])
def test_all_with_a_recency_schedule(with_base):
    tm = TemporalMerge(BASE, init="zs", deploy="all", schedule="linear", all_with_base=with_base)
    for expert in EXPERTS[:4]:
        tm.store(expert)
    members = ([BASE] if with_base else []) + EXPERTS[:4]
    n = len(members)
    total = n * (n + 1) / 2
    assert_close(tm.deploy_weights(), combine([(i / total, m) for i, m in enumerate(members, start=1)]))


def test_all_under_a_task_vector_technique_anchors_at_theta0():
    tm = TemporalMerge(BASE, init="zs", deploy="all", technique="ties", density=0.6, lam=0.8)
    for expert in EXPERTS[:3]:
        tm.store(expert)
    assert_equal(tm.deploy_weights(), ties(BASE, EXPERTS[:3], 0.6, 0.8))


HAND = {  # n = 5, raw values from the formulas, oldest first
    "uniform": [1, 1, 1, 1, 1],
    "linear": [1, 2, 3, 4, 5],
    "sqrt": [1, math.sqrt(2), math.sqrt(3), 2, math.sqrt(5)],
    "quadratic": [1, 4, 9, 16, 25],
    "cubic": [1, 8, 27, 64, 125],
    "exp": [1, 2, 4, 8, 16],
    "log": [math.log(2), math.log(3), math.log(4), math.log(5), math.log(6)],
}


@pytest.mark.parametrize("name", list(HAND))
def test_recency_schedules(name):
    raw = HAND[name]
    expected = [r / sum(raw) for r in raw]
    assert recency_weights(name, 5) == pytest.approx(expected, rel=1e-12)
    assert recency_weights(f"reverse_{name}", 5) == pytest.approx(expected[::-1], rel=1e-12)
    assert math.fsum(recency_weights(name, 5)) == pytest.approx(1, abs=1e-12)
    assert recency_weights(name, 1) == [1.0]


def test_linear_schedule_is_one_to_five_over_fifteen():
    assert recency_weights("linear", 5) == pytest.approx([1 / 15, 2 / 15, 3 / 15, 4 / 15, 5 / 15], rel=1e-15)
    assert set(SCHEDULES) == set(HAND) | {f"reverse_{n}" for n in HAND}


# --- init and deploy hand over exactly the weights they name ------------------------------------

@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("deploy", DEPLOYS)
@pytest.mark.parametrize("from_base", [True, False])
def test_before_any_expert_every_choice_is_theta0(init, deploy, from_base):
    tm = TemporalMerge(BASE, init=init, deploy=deploy, ema_from_base=from_base)
    assert_equal(tm.init_weights(), BASE)
    assert_equal(tm.deploy_weights(), BASE)


def test_each_init_and_deploy_choice_hands_over_the_weights_it_names():
    w, t = 0.5, 3
    ema = combine([((1 - w) ** t, BASE)] + [(w * (1 - w) ** (t - k), EXPERTS[k - 1]) for k in range(1, t + 1)])
    named = {"zs": BASE, "ft": EXPERTS[t - 1], "all": interpolate(EXPERTS[:t], [1 / t] * t), "ema": ema}
    for choice in INITS:
        for phase, options in (("init", INITS), ("deploy", DEPLOYS)):
            if choice not in options:
                continue
            tm = TemporalMerge(BASE, **{phase: choice})
            for expert in EXPERTS[:t]:
                tm.store(expert)
            got = tm.init_weights() if phase == "init" else tm.deploy_weights()
            assert_close(got, named[choice])


def test_handed_weights_and_theta0_are_copies():
    base = {k: v.clone() for k, v in BASE.items()}
    tm = TemporalMerge(base, init="ft", deploy="ft")
    base["fc.bias"].add_(1.0)  # the caller trains the model behind base in place
    expert = {k: v.clone() for k, v in EXPERTS[0].items()}
    tm.store(expert)
    expert["fc.bias"].add_(1.0)
    tm.init_weights()["fc.bias"].add_(1.0)
    assert_equal(tm.deploy_weights(), EXPERTS[0])
    assert_equal(TemporalMerge(base).init_weights(), base)
    assert_equal(tm.base, BASE)


def test_non_float_keys_come_from_the_newest_expert():
    def with_ids(sd, value):
        return {**sd, "pos_ids": torch.full((3,), value, dtype=torch.long)}

    tm = TemporalMerge(with_ids(BASE, 0), init="all", deploy="ema")
    tm.store(with_ids(EXPERTS[0], 1))
    tm.store(with_ids(EXPERTS[1], 2))
    for weights in (tm.deploy_weights(), tm.init_weights()):
        assert weights["pos_ids"].tolist() == [2, 2, 2]
    assert_close({k: v for k, v in tm.init_weights().items() if k != "pos_ids"},
                 interpolate(EXPERTS[:2], [0.5, 0.5]))


# --- MagMax -------------------------------------------------------------------------------------

def test_magmax_equals_its_definition():
    vectors = torch.stack([torch.cat([e[k].flatten() - BASE[k].flatten() for k in SHAPES]) for e in EXPERTS[:3]])
    chosen = vectors.gather(0, vectors.abs().argmax(dim=0, keepdim=True))[0]  # τ_max per entry
    flat_base = torch.cat([BASE[k].flatten() for k in SHAPES])
    merged = magmax(BASE, EXPERTS[:3], lam=0.7)
    torch.testing.assert_close(torch.cat([merged[k].flatten() for k in SHAPES]), flat_base + 0.7 * chosen,
                               rtol=0, atol=1e-12)


def test_magmax_keeps_the_first_task_on_equal_magnitude():
    zero = {"w": torch.zeros(4)}
    first = {"w": torch.tensor([1.0, -2.0, 3.0, 0.5])}
    second = {"w": torch.tensor([-1.0, 2.0, -3.0, -4.0])}
    assert magmax(zero, [first, second], lam=0.5)["w"].tolist() == [0.5, -1.0, 1.5, -2.0]
    assert magmax(zero, [second, first], lam=1.0)["w"].tolist() == [-1.0, 2.0, -3.0, -4.0]
    # in the running merge M([θ^s_t, E_{t−1}]) the first member is the newest expert
    tm = TemporalMerge(zero, technique="magmax")
    tm.store(first)
    tm.store({"w": torch.tensor([-1.0, 2.0, -3.0, 0.25])})
    assert tm.deploy_weights()["w"].tolist() == [-1.0, 2.0, -3.0, 0.5]


# --- memory -------------------------------------------------------------------------------------

def held_state_dicts(tm):
    """The distinct state dicts an object holds in its attributes (directly or in a list), θ_0 aside."""
    found = {}
    for value in vars(tm).values():
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(item, dict) and item and all(isinstance(v, torch.Tensor) for v in item.values()):
                found[id(item)] = item
    found.pop(id(tm.base))
    return found


def test_ema_ema_holds_one_state_dict_besides_theta0():
    tm = TemporalMerge(BASE, init="ema", deploy="ema")
    for expert in EXPERTS:
        tm.store(expert)
    assert len(held_state_dicts(tm)) == 1
    assert not any(isinstance(v, list) and any(isinstance(i, dict) for i in v) for v in vars(tm).values())
    ft = TemporalMerge(BASE, init="ft", deploy="ft")
    offline = TemporalMerge(BASE, init="zs", deploy="all")
    for expert in EXPERTS:
        ft.store(expert)
        offline.store(expert)
    assert len(held_state_dicts(ft)) == 1
    assert len(held_state_dicts(offline)) == len(EXPERTS)


# --- bad input ----------------------------------------------------------------------------------

def test_unknown_options_are_named_with_the_choices():
    with pytest.raises(ValueError, match="unknown init 'warm'; valid init options: zs, ft, all, ema"):
        TemporalMerge(BASE, init="warm")
    with pytest.raises(ValueError, match="unknown deploy 'zs'; valid deploy options: ft, all, ema"):
        TemporalMerge(BASE, deploy="zs")
    with pytest.raises(ValueError, match="unknown technique 'slerp'; valid techniques: " + ", ".join(TECHNIQUES)):
        TemporalMerge(BASE, technique="slerp")
    with pytest.raises(ValueError, match="unknown schedule 'fifth'; valid schedule options: uniform, linear"):
        TemporalMerge(BASE, schedule="fifth")
    with pytest.raises(ValueError, match="unknown schedule 'tenth'"):
        recency_weights("tenth", 3)
    with pytest.raises(ValueError, match="positive number of members"):
        recency_weights("linear", 0)
    with pytest.raises(ValueError, match="technique 'ties' needs option 'density'"):
        TemporalMerge(BASE, technique="ties", lam=1.0)
    with pytest.raises(ValueError, match="unknown option 'lam' for technique 'interpolation'; valid options: none"):
        TemporalMerge(BASE, lam=0.5)
    with pytest.raises(ValueError, match="p must be in"):
        TemporalMerge(BASE, technique="dare", p=1.0, lam=1.0, seed=0)
    with pytest.raises(ValueError, match="ema_weight must be in"):
        TemporalMerge(BASE, ema_weight=1.5)
    with pytest.raises(ValueError, match="weigh the members of interpolation only"):
        TemporalMerge(BASE, technique="task_arithmetic", lam=0.5, schedule="linear")


def test_experts_unlike_theta0_are_named():
    tm = TemporalMerge(BASE)
    missing = {k: v for k, v in EXPERTS[0].items() if k != "fc.bias"}
    with pytest.raises(KeyError, match="key 'fc.bias': in base"):
        tm.store(missing)
    with pytest.raises(KeyError, match="key 'extra'"):
        tm.store({**EXPERTS[0], "extra": torch.zeros(2, dtype=torch.float64)})
    with pytest.raises(ValueError, match=r"key 'fc.weight': shape \(5, 4\) in base"):
        tm.store({**EXPERTS[0], "fc.weight": torch.zeros(4, 5, dtype=torch.float64)})
    with pytest.raises(ValueError, match="key 'scale': .*NaN"):
        tm.store({**EXPERTS[0], "scale": torch.tensor(float("nan"), dtype=torch.float64)})
    assert tm.t == 0  # a rejected expert is not stored
    assert_equal(tm.deploy_weights(), BASE)
