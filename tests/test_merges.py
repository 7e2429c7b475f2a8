"""Merge methods: hand-computed results on tiny tensors, DARE randomness, AdaMerging on a fake suite."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from bench.families.base import ArchitectureMap, LayerMap
from bench.families.family import Family
from bench.merging import MergeContext
from bench.outofcore import TopMagnitude, merged_tensor, top_magnitude
from bench.params import ParamError, params_dict
from bench.plugins import seeded_generator
from bench.registry import merges
from bench.suite import Batch, Expert, Suite
from bench.weights import CheckpointError, StateDict
from merges.adamerging import coefficient_groups, learn_coefficients, prediction_entropy
from merges.ties import disjoint_merge, elect_and_merge, elected_sign, resolve_zero_signs, ties_merge_global

T = torch.tensor
TENSORWISE = ["wa", "ta", "ties", "dare-ta", "dare-ties", "dare-ties-mergelm"]


def merge(name: str, base: StateDict, experts: list[StateDict], seed: int = 0, **params: object) -> StateDict:
    method = merges.get(name)
    return method.merge(base, experts, method.parse(params), seed=seed)


def with_task_vectors(base: torch.Tensor, taus: list[list[float]]) -> list[torch.Tensor]:
    return [base + T(tau) for tau in taus]


# ---------------------------------------------------------------- registry and params


def test_every_method_is_registered_under_its_name():
    for name in TENSORWISE + ["ties-global", "adamerging-task", "adamerging-layer"]:
        assert merges.get(name).name == name


def test_params_parse_from_strings():
    assert merges.get("ta").parse({"lambda_": "0.5"}).lambda_ == 0.5
    p = merges.get("dare-ties-mergelm").parse({"p": "0.25", "k": "0.5", "aggregate": "sum", "rescale": "false"})
    assert (p.p, p.k, p.aggregate, p.rescale) == (0.25, 0.5, "sum", False)
    assert merges.get("adamerging-layer").parse({"steps": "7", "granularity": "block"}).steps == 7


def test_params_reject_bad_values_with_param_error():
    with pytest.raises(ParamError, match="lambda_"):
        merges.get("ta").parse({"lambda_": "abc"})
    with pytest.raises(ParamError, match="aggregate"):
        merges.get("ties").parse({"aggregate": "median"})
    with pytest.raises(ParamError, match="unknown"):
        merges.get("ties").parse({"density": "0.2"})


def test_out_of_range_fractions_raise_param_error():
    base = {"w": torch.zeros(4)}
    experts = [{"w": torch.ones(4)}]
    with pytest.raises(ParamError, match="k "):
        merge("ties", base, experts, k=0.0)
    with pytest.raises(ParamError, match="p "):
        merge("dare-ta", base, experts, p=1.0)


def test_parsed_lambda_reaches_the_merge():
    base = {"w": T([1.0, 2.0])}
    experts = [{"w": T([3.0, 2.0])}]
    assert torch.equal(merge("ta", base, experts, lambda_="0.5")["w"], T([2.0, 2.0]))


# ---------------------------------------------------------------- WA and TA


def test_weight_average_is_the_mean_of_experts_and_ignores_the_base():
    base = {"w": T([100.0, -100.0, 7.0])}
    experts = [{"w": T([2.0, 2.0, 0.0])}, {"w": T([0.0, 4.0, -1.0])}, {"w": T([1.0, 0.0, 4.0])}]
    assert torch.allclose(merge("wa", base, experts)["w"], T([1.0, 2.0, 1.0]))


def test_task_arithmetic_adds_scaled_sum_of_task_vectors():
    # τ1 = [1, 0, 1], τ2 = [-1, 2, 0]; Σ = [0, 2, 1]; θ = [1, 2, -1] + 0.5 Σ.
    base = {"w": T([1.0, 2.0, -1.0])}
    experts = [{"w": T([2.0, 2.0, 0.0])}, {"w": T([0.0, 4.0, -1.0])}]
    assert torch.allclose(merge("ta", base, experts, lambda_=0.5)["w"], T([1.0, 3.0, -0.5]))


def test_task_arithmetic_default_lambda_is_point_three():
    base = {"w": T([0.0])}
    experts = [{"w": T([1.0])}, {"w": T([2.0])}]
    assert torch.allclose(merge("ta", base, experts)["w"], T([0.9]))


# ---------------------------------------------------------------- TIES

# Three task vectors of 4 entries, k = 0.5 keeps the 2 largest magnitudes of each:
#   τ1 = [ 3, -1, 0.5, -2] -> [ 3,  0, 0, -2]
#   τ2 = [-1,  2, 4,   -3] -> [ 0,  0, 4, -3]
#   τ3 = [-4, -3, 1, 0.2]  -> [-4, -3, 0,  0]
# Σ trimmed = [-1, -3, 4, -5] -> elected signs [-, -, +, -]
# agreeing: e0 {-4}, e1 {-3}, e2 {4}, e3 {-2, -3}
TIES_TAUS = [[3.0, -1.0, 0.5, -2.0], [-1.0, 2.0, 4.0, -3.0], [-4.0, -3.0, 1.0, 0.2]]
TIES_BASE = T([1.0, 1.0, 1.0, 1.0])


@pytest.mark.parametrize(("aggregate", "merged_tau"), [
    ("mean", [-4.0, -3.0, 4.0, -2.5]),
    ("sum", [-4.0, -3.0, 4.0, -5.0]),
    ("max", [-4.0, -3.0, 4.0, -3.0]),
])
def test_ties_trims_elects_sign_and_merges_disjointly(aggregate, merged_tau):
    experts = [{"w": e} for e in with_task_vectors(TIES_BASE, TIES_TAUS)]
    out = merge("ties", {"w": TIES_BASE}, experts, k=0.5, lambda_=1.0, aggregate=aggregate)["w"]
    assert torch.allclose(out, TIES_BASE + T(merged_tau))


def test_ties_scales_the_merged_task_vector_by_lambda():
    experts = [{"w": e} for e in with_task_vectors(TIES_BASE, TIES_TAUS)]
    out = merge("ties", {"w": TIES_BASE}, experts, k=0.5, lambda_=0.5)["w"]
    assert torch.allclose(out, TIES_BASE + 0.5 * T([-4.0, -3.0, 4.0, -2.5]))


def test_ties_zero_sum_entry_takes_the_majority_sign():
    # k = 1 keeps everything. Entry 0 sums to 0; the elected signs of entries 1, 2 are +, so entry 0
    # takes + and keeps only the +2: mean 2. Entry 2: mean(1, 3) = 2.
    base = torch.zeros(3)
    experts = [{"w": e} for e in with_task_vectors(base, [[2.0, 1.0, 1.0], [-2.0, 1.0, 3.0]])]
    assert torch.allclose(merge("ties", {"w": base}, experts, k=1.0)["w"], T([2.0, 1.0, 2.0]))


def test_ties_default_keeps_top_twenty_percent_per_tensor():
    # One expert, 10 entries: top 20 % = the two largest magnitudes survive.
    base = torch.zeros(10)
    tau = T([0.1, -9.0, 0.3, 0.2, 8.0, -0.5, 0.4, 0.6, -0.7, 0.05])
    out = merge("ties", {"w": base}, [{"w": tau}])["w"]
    assert torch.equal(out, T([0.0, -9.0, 0.0, 0.0, 8.0, 0.0, 0.0, 0.0, 0.0, 0.0]))


def test_ties_global_trims_over_the_whole_model():
    # One expert, k = 0.25 of 8 entries: the original keeps ⌊0.25·8⌋ + 1 = 3 (kthvalue(6) then >=), the global
    # top 3, all in tensor "a"; per tensor (⌊0.25·4⌋ = 1 each), "a" keeps 10 and "b" keeps its 0.4.
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    expert = {"a": T([10.0, 9.0, 8.0, 0.05]), "b": T([0.1, 0.2, 0.3, 0.4])}
    per_tensor = merge("ties", base, [expert], k=0.25)
    whole = merges.get("ties-global").merge(base, [expert], merges.get("ties-global").parse({"k": "0.25"}))
    assert torch.equal(per_tensor["a"], T([10.0, 0.0, 0.0, 0.0])) and torch.equal(per_tensor["b"], T([0.0, 0.0, 0.0, 0.4]))
    assert torch.equal(whole["a"], T([10.0, 9.0, 8.0, 0.0])) and torch.equal(whole["b"], T([0.0, 0.0, 0.0, 0.0]))


def test_ties_global_zero_sign_majority_spans_tensors():
    # Tensor "a" sums to 0: per tensor there is no majority and, as in the original, the negative entry
    # is the one kept (-2); over the whole model the majority is + (tensor "b"), so +2 is kept.
    base = {"a": torch.zeros(1), "b": torch.zeros(3)}
    experts = [{"a": T([2.0]), "b": T([1.0, 1.0, 1.0])}, {"a": T([-2.0]), "b": T([1.0, 1.0, 1.0])}]
    assert torch.equal(merge("ties", base, experts, k=1.0)["a"], T([-2.0]))
    method = merges.get("ties-global")
    assert torch.equal(method.merge(base, experts, method.parse({"k": "1.0"}))["a"], T([2.0]))


# ---------------------------------------------------------------- exact thresholds and ties-global


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_magnitude_is_the_kthvalue_of_the_concatenated_magnitudes(seed):
    # Many exact ties (values on a coarse grid), zeros, tiny and huge values; fed in uneven pieces, twice.
    g = torch.Generator().manual_seed(seed)
    values = torch.cat([torch.randint(0, 50, (3000,), generator=g).float() / 8, torch.zeros(500),
                        torch.rand(400, generator=g) * 1e-30, torch.rand(100, generator=g) * 1e30])
    values = values[torch.randperm(values.numel(), generator=g)]
    pieces = torch.split(values, [1, 999, 2000, 999, 0, 1])
    for keep in (1, 2, 17, 800, 2000, values.numel() - 1, values.numel()):
        select = TopMagnitude(keep)
        for pass_index in range(2):
            if pass_index:
                select.next_pass()
            for piece in pieces:
                select.add(piece)
        assert torch.equal(select.value, values.kthvalue(values.numel() - keep + 1).values)
        assert torch.equal(top_magnitude(values, keep), select.value)


# A transcription of the original's three functions (prateeky2806/ties-merging ``src/utils/merge_utils.py``,
# ``topk_values_mask``, ``resolve_sign`` with ``resolve_zero_signs`` "majority", ``disjoint_merge``), kept as
# written there (names, steps, the ``K > 1`` percent convention); only the logging and return_mask are dropped.


def original_topk_values_mask(M, K=0.7):  # noqa: N803  (the original's names)
    if K > 1:
        K /= 100
    original_shape = M.shape
    if M.dim() == 1:
        M = M.unsqueeze(0)
    n, d = M.shape
    k = int(d * K)
    k = d - k  # Keep top k elements instead of bottom k elements
    # Find the k-th smallest element by magnitude for each row
    kth_values, _ = M.abs().kthvalue(k, dim=1, keepdim=True)
    # Create a mask tensor with True for the top k elements in each row
    mask = M.abs() >= kth_values
    final_mask = mask.squeeze() if original_shape == M.squeeze().shape else mask
    return M * final_mask, final_mask.float().mean(dim=1)


def original_resolve_zero_signs(sign_to_mult, method="majority"):
    majority_sign = torch.sign(sign_to_mult.sum())
    if method == "majority":
        sign_to_mult[sign_to_mult == 0] = majority_sign
    elif method == "minority":
        sign_to_mult[sign_to_mult == 0] = -1 * majority_sign
    return sign_to_mult


def original_resolve_sign(Tensor, resolve_method):  # noqa: N803
    if resolve_method == "mass":
        sign_to_mult = torch.sign(Tensor.sum(dim=0))
    else:
        raise ValueError(f"Sign resolve method {resolve_method} is not transcribed.")
    sign_to_mult = original_resolve_zero_signs(sign_to_mult, "majority")
    return sign_to_mult


def original_disjoint_merge(Tensor, merge_func, sign_to_mult):  # noqa: N803
    merge_func = merge_func.split("-")[-1]
    # If sign is provided then we select the corresponding entries and aggregate.
    if sign_to_mult is not None:
        rows_to_keep = torch.where(sign_to_mult.unsqueeze(0) > 0, Tensor > 0, Tensor < 0)
        selected_entries = Tensor * rows_to_keep
    # Else we select all non-zero entries and aggregate.
    else:
        rows_to_keep = Tensor != 0
        selected_entries = Tensor * rows_to_keep
    if merge_func == "mean":
        non_zero_counts = (selected_entries != 0).sum(dim=0).float()
        disjoint_aggs = torch.sum(selected_entries, dim=0) / torch.clamp(non_zero_counts, min=1)
    elif merge_func == "sum":
        disjoint_aggs = torch.sum(selected_entries, dim=0)
    elif merge_func == "max":
        disjoint_aggs = selected_entries.abs().max(dim=0)[0]
        disjoint_aggs *= sign_to_mult
    else:
        raise ValueError(f"Merge method {merge_func} is not defined.")
    return disjoint_aggs


def flattened_ties_reference(base: StateDict, experts: list[StateDict], k: float, aggregate: str) -> StateDict:
    """The original pipeline (``merge_methods`` with reset ``topk``, resolve ``mass``, merge ``dis-<aggregate>``)
    on task vectors flattened over the model's floating-point tensors; ``k`` = 1 is its reset ``none`` (no trim)."""
    keys = [n for n in base if base[n].is_floating_point()]
    flat = torch.stack([torch.cat([(e[n] - base[n]).reshape(-1) for n in keys]) for e in experts])
    trimmed = flat.clone() if k == 1.0 else original_topk_values_mask(flat.clone(), K=k)[0]
    merged = original_disjoint_merge(trimmed, f"dis-{aggregate}", original_resolve_sign(trimmed, "mass"))
    out, offset = dict(base), 0
    for n in keys:
        out[n] = base[n] + merged[offset:offset + base[n].numel()].reshape(base[n].shape)
        offset += base[n].numel()
    return out


def random_model(seed: int, n_experts: int, integer: bool = False) -> tuple[StateDict, list[StateDict]]:
    """θ_pre and experts over tensors of several shapes; ``integer`` task vectors tie and cancel exactly."""
    g = torch.Generator().manual_seed(seed)
    shapes = {"embed": (97, 6), "layer.w": (12, 12), "layer.b": (12,), "scale": (), "row": (1, 9)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    base["count"] = T([3])
    experts = []
    for _ in range(n_experts):
        e = {n: v + (torch.randint(-3, 4, v.shape, generator=g).float() if integer else torch.randn(v.shape, generator=g))
             for n, v in base.items() if v.is_floating_point()}
        experts.append({**e, "count": T([9])})
    if integer:  # integer τ: make θ_pre integer too, so τ is exact and sums to 0 exactly
        base = {n: v.round() if v.is_floating_point() else v for n, v in base.items()}
        experts = [{n: v.round() if v.is_floating_point() else v for n, v in e.items()} for e in experts]
    return base, experts


@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
@pytest.mark.parametrize("k", [0.05, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("integer", [False, True])
def test_ties_global_matches_a_flattened_reference_merge(aggregate, k, integer):
    base, experts = random_model(3, 3, integer)
    expected = flattened_ties_reference(base, experts, k, aggregate)
    for block_elements in (10**9, 7):  # whole tensors, and row blocks of at most 7 entries
        got = ties_merge_global(base, experts, k=k, lambda_=1.0, aggregate=aggregate, block_elements=block_elements)
        assert set(got) == set(base)
        for n in base:
            assert torch.allclose(got[n], expected[n], atol=1e-6), n


def test_ties_global_keeps_the_exact_top_k_of_each_task_vector():
    base, experts = random_model(4, 1)
    numel = sum(v.numel() for v in base.values() if v.is_floating_point())
    for k in (0.01, 0.2, 0.7):
        out = ties_merge_global(base, experts, k=k, lambda_=1.0, aggregate="sum", block_elements=5)
        kept = sum(int((out[n] != base[n]).sum()) for n in base if base[n].is_floating_point())
        assert kept == int(numel * k) + 1  # as the original's kthvalue(d - ⌊k·d⌋) then >=; no tie at the threshold


def test_ties_global_merges_again_when_the_guessed_majority_sign_was_wrong():
    # Entry "a" sums to exactly 0; the whole-model majority is − (tensor "b"), so "a" keeps the negative value.
    # The merge pass guesses +, sees "a" is ambiguous and the tally negative, and merges once more.
    base = {"a": torch.zeros(1), "b": torch.zeros(5)}
    experts = [{"a": T([2.0]), "b": -torch.ones(5)}, {"a": T([-2.0]), "b": -torch.ones(5)}]
    for block_elements in (1, 100):
        out = ties_merge_global(base, experts, k=1.0, lambda_=1.0, aggregate="mean", block_elements=block_elements)
        assert torch.equal(out["a"], T([-2.0])) and torch.equal(out["b"], -torch.ones(5))


@pytest.mark.parametrize("name", TENSORWISE)
@pytest.mark.parametrize("integer", [False, True])
def test_row_blocks_give_the_same_merge_bit_for_bit(name, integer):
    # A tensor merged in row blocks (thresholds and majority over the whole tensor, DARE masks at their
    # place in the stream) is the tensor merged whole, to the bit (a zero may differ in sign: adding +0
    # makes every zero +0); integer τ exercise ties and zero sums.
    base, experts = random_model(5, 3, integer)
    method = merges.get(name)
    params = params_dict(method.parse({"k": "0.3"} if "k" in {f.name for f in dataclasses.fields(method.Params)} else {}))
    for n in base:
        whole = merged_tensor(method, base, experts, params, n, seed=2, block_elements=10**9)
        for block_elements in (1, 7, 40):
            blocked = merged_tensor(method, base, experts, params, n, seed=2, block_elements=block_elements)
            assert whole.dtype == blocked.dtype and torch.equal((whole + 0.0).view(-1).view(torch.uint8),
                                                                 (blocked + 0.0).view(-1).view(torch.uint8)), (n, block_elements)


@pytest.mark.parametrize("aggregate", ["mean", "sum", "max"])
@pytest.mark.parametrize("majority", [None, 1.0, 0.0, -1.0])
def test_elect_and_merge_equals_the_readable_ties_steps(aggregate, majority):
    # Integer τ with many zeros: zero sums with and without nonzero entries, ties, all three aggregates.
    g = torch.Generator().manual_seed(7)
    trimmed = torch.randint(-2, 3, (3, 4000), generator=g).float() * (torch.rand(3, 4000, generator=g) < 0.6)
    sign = elected_sign(trimmed)
    resolve = torch.sign(sign.sum()) if majority is None else torch.tensor(majority)
    expected = disjoint_merge(trimmed, resolve_zero_signs(sign, resolve), aggregate)
    merged, tally, ambiguous = elect_and_merge(trimmed, aggregate, majority)
    assert torch.equal(merged, expected) and tally == int(sign.sum())
    zero_sum_with_values = bool(((sign == 0) & (trimmed != 0).any(dim=0)).any())
    assert ambiguous == (majority is not None and zero_sum_with_values)


def test_ties_trims_per_tensor_with_the_exact_threshold_in_row_blocks():
    # 1000 distinct magnitudes in one tensor merged 7 entries at a time: exactly the top 100 survive.
    tau = torch.randperm(1000).float().add_(1).mul_(torch.where(torch.rand(1000) < 0.5, -1.0, 1.0)).reshape(100, 10)
    method = merges.get("ties")
    out = merged_tensor(method, {"w": torch.zeros(100, 10)}, [{"w": tau}], params_dict(method.parse({"k": "0.1"})), "w",
                        block_elements=7)
    assert int((out != 0).sum()) == 100 and float(out.abs()[out != 0].min()) == 901.0


# ---------------------------------------------------------------- DARE


def expected_dare_masks(seed: int, method: str, key: str, shape: tuple[int, ...], n: int, p: float) -> list[torch.Tensor]:
    g = seeded_generator(seed, method, key)
    return [torch.rand(shape, generator=g) >= p for _ in range(n)]


def test_dare_ta_drops_with_the_per_tensor_generator_and_rescales():
    torch.manual_seed(0)
    base = torch.randn(6, 5)
    taus = [torch.randn(6, 5), torch.randn(6, 5)]
    experts = [{"w": base + t} for t in taus]
    out = merge("dare-ta", {"w": base}, experts, seed=3, p=0.5, lambda_=0.7)["w"]
    masks = expected_dare_masks(3, "dare-ta", "w", (6, 5), 2, 0.5)
    expected = base + 0.7 * sum(t * m / 0.5 for t, m in zip(taus, masks))
    assert torch.allclose(out, expected, atol=1e-6)
    assert 0 < int(masks[0].sum()) < 30  # the masks really drop something


def test_dare_rescales_survivors_exactly():
    tau = torch.full((200,), 1.5)
    out = merge("dare-ta", {"w": torch.zeros(200)}, [{"w": tau}], seed=1, p=0.75, lambda_=1.0)["w"]
    survivors = out[out != 0]
    assert survivors.numel() > 0
    assert torch.equal(survivors, torch.full_like(survivors, 6.0))  # 1.5 / (1 - 0.75)


def test_dare_without_rescale_only_drops():
    tau = torch.full((200,), 1.5)
    out = merge("dare-ta", {"w": torch.zeros(200)}, [{"w": tau}], seed=1, p=0.75, lambda_=1.0, rescale=False)["w"]
    assert set(out.unique().tolist()) == {0.0, 1.5}


def test_dare_is_unbiased_over_many_entries():
    # E[DARE(τ)] = τ: over 20000 iid entries the mean is τ ± 0.1 (std of the mean 0.021 for p = 0.9).
    base = torch.zeros(20000)
    out = merge("dare-ta", {"w": base}, [{"w": torch.ones(20000)}], seed=5, p=0.9, lambda_=1.0)["w"]
    assert abs(float(out.mean()) - 1.0) < 0.1
    assert abs(float((out != 0).float().mean()) - 0.1) < 0.02


def test_dare_depends_on_seed_not_on_tensor_order():
    torch.manual_seed(1)
    base = {"a": torch.zeros(50), "b": torch.zeros(50)}
    expert = {"a": torch.randn(50), "b": torch.randn(50)}
    forward = merge("dare-ta", base, [expert], seed=0)
    reverse = merge("dare-ta", {"b": base["b"], "a": base["a"]}, [{"b": expert["b"], "a": expert["a"]}], seed=0)
    other = merge("dare-ta", base, [expert], seed=1)
    assert all(torch.equal(forward[k], reverse[k]) for k in base)
    assert not torch.equal(forward["a"], other["a"])


def test_dare_ties_mergelm_is_ties_of_the_sparsified_experts():
    torch.manual_seed(2)
    base = torch.randn(8)
    taus = [torch.randn(8) for _ in range(3)]
    experts = [{"w": base + t} for t in taus]
    out = merge("dare-ties-mergelm", {"w": base}, experts, seed=4, p=0.5, k=0.5)["w"]
    masks = expected_dare_masks(4, "dare-ties-mergelm", "w", (8,), 3, 0.5)
    sparsified = [{"w": base + t * m / 0.5} for t, m in zip(taus, masks)]
    assert torch.allclose(out, merge("ties", {"w": base}, sparsified, k=0.5)["w"], atol=1e-6)


def test_dare_ties_is_sign_election_and_disjoint_sum_of_the_sparsified_experts_without_a_trim():
    # mergekit's dare_ties: no magnitude trim (k would be 1), disjoint sum, λ = 1.
    torch.manual_seed(2)
    base = torch.randn(8)
    taus = [torch.randn(8) for _ in range(3)]
    experts = [{"w": base + t} for t in taus]
    out = merge("dare-ties", {"w": base}, experts, seed=4, p=0.5)["w"]
    masks = expected_dare_masks(4, "dare-ties", "w", (8,), 3, 0.5)
    sparsified = [{"w": base + t * m / 0.5} for t, m in zip(taus, masks)]
    assert torch.allclose(out, merge("ties", {"w": base}, sparsified, k=1.0, aggregate="sum")["w"], atol=1e-6)
    assert "k" not in {f.name for f in dataclasses.fields(merges.get("dare-ties").Params)}


def test_dare_ties_adds_the_agreeing_values():
    # p = 0 drops nothing. Entry 0: 1 + 3 - 1 = 3 > 0, agreeing 1 and 3 sum to 4; entry 1: 2 - 1 - 4 < 0: -1 - 4 = -5.
    # The MergeLM composition (trim to 20 %, disjoint mean) gives [3, -4] here.
    base = torch.zeros(2)
    experts = [{"w": e} for e in with_task_vectors(base, [[1.0, 2.0], [3.0, -1.0], [-1.0, -4.0]])]
    assert torch.equal(merge("dare-ties", {"w": base}, experts, p=0.0)["w"], T([4.0, -5.0]))
    assert torch.equal(merge("dare-ties-mergelm", {"w": base}, experts, p=0.0, k=0.5)["w"], T([3.0, -4.0]))


@pytest.mark.parametrize(("p", "k", "kept"), [(0.9, 0.2, 0.1), (0.5, 0.2, 0.2), (0.5, 1.0, 0.5)])
def test_dare_ties_mergelm_trims_the_sparsified_vector_dropped_zeros_included(p, k, kept):
    # The trim ranks all entries, DARE's zeros among them (MergeLM's mask_smallest_magnitude_param_values):
    # at p = 0.9 the top 20 % includes every survivor, so 10 % of the entries remain, not 0.1 x 0.2 = 2 %.
    base = torch.zeros(20000)
    expert = {"w": torch.randn(20000, generator=torch.Generator().manual_seed(0))}
    out = merge("dare-ties-mergelm", {"w": base}, [expert], seed=1, p=p, k=k)["w"]
    assert abs(float((out != 0).float().mean()) - kept) < 0.01


def test_dare_ties_keeps_about_one_minus_p_of_each_expert():
    # No second trim: at p = 0.5 half of the entries survive (the MergeLM composition trims them to k = 20 %).
    base = torch.zeros(20000)
    expert = {"w": torch.randn(20000, generator=torch.Generator().manual_seed(0))}
    out = merge("dare-ties", {"w": base}, [expert], seed=1, p=0.5)["w"]
    assert abs(float((out != 0).float().mean()) - 0.5) < 0.02
    mergelm = merge("dare-ties-mergelm", {"w": base}, [expert], seed=1, p=0.5)["w"]
    assert abs(float((mergelm != 0).float().mean()) - 0.2) < 0.01


def test_dare_ties_says_which_reference_it_follows():
    assert "mergekit" in merges.get("dare-ties").describe()["summary"]
    assert "MergeLM" in merges.get("dare-ties-mergelm").describe()["summary"]
    assert merges.get("dare-ties").version == "2"


def test_dare_with_zero_drop_rate_equals_the_plain_merge():
    experts = [{"w": e} for e in with_task_vectors(TIES_BASE, TIES_TAUS)]
    assert torch.equal(merge("dare-ties-mergelm", {"w": TIES_BASE}, experts, p=0.0, k=0.5)["w"],
                       merge("ties", {"w": TIES_BASE}, experts, k=0.5)["w"])
    assert torch.equal(merge("dare-ties", {"w": TIES_BASE}, experts, p=0.0)["w"],
                       merge("ties", {"w": TIES_BASE}, experts, k=1.0, aggregate="sum")["w"])
    assert torch.equal(merge("dare-ta", {"w": TIES_BASE}, experts, p=0.0)["w"], merge("ta", {"w": TIES_BASE}, experts)["w"])


# ---------------------------------------------------------------- shared behaviour of all methods


@pytest.mark.parametrize("name", TENSORWISE + ["ties-global"])
def test_integer_buffers_are_carried_from_the_base(name):
    base = {"w": T([1.0, -2.0, 3.0, 0.5]), "count": T([5], dtype=torch.int64)}
    experts = [{"w": T([2.0, -1.0, 1.0, 0.0]), "count": T([7], dtype=torch.int64)},
               {"w": T([0.0, -3.0, 4.0, 1.0]), "count": T([9], dtype=torch.int64)}]
    out = merges.get(name).merge(base, experts)
    assert out["count"].dtype == torch.int64 and torch.equal(out["count"], T([5]))


@pytest.mark.parametrize("name", TENSORWISE + ["ties-global"])
def test_merged_tensors_keep_the_base_dtype(name):
    base = {"w": T([1.0, -2.0, 3.0, 0.5], dtype=torch.float16)}
    experts = [{"w": T([2.0, -1.0, 1.0, 0.0], dtype=torch.float16)}]
    assert merges.get(name).merge(base, experts)["w"].dtype == torch.float16


@pytest.mark.parametrize("name", TENSORWISE + ["ties-global"])
def test_shape_mismatch_raises_checkpoint_error(name):
    base = {"w": torch.zeros(2, 3)}
    with pytest.raises(CheckpointError, match="shape"):
        merges.get(name).merge(base, [{"w": torch.zeros(2, 3)}, {"w": torch.zeros(3, 2)}])


@pytest.mark.parametrize("name", TENSORWISE + ["ties-global"])
def test_merging_identical_experts_of_the_base_returns_the_base(name):
    base = {"w": T([1.0, -2.0, 3.0])}
    assert torch.equal(merges.get(name).merge(base, [dict(base), dict(base)])["w"], base["w"])


# ---------------------------------------------------------------- AdaMerging on a fake suite


class TinyBody(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8))
        self.norm = nn.LayerNorm(8)
        self.register_buffer("seen", torch.tensor(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.embed(x)))


class TinyTaskModel(nn.Module):
    def __init__(self, body: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class TinyFamily(Family):
    name = "tiny-mlp"

    def arch_map(self) -> ArchitectureMap:
        return ArchitectureMap(family="tiny-mlp", layers=(LayerMap(0, prefix="layers.0."), LayerMap(1, prefix="layers.2.")),
                               embeddings=("embed.weight", "embed.bias"), final_norms=("norm.weight", "norm.bias"))

    def new_module(self) -> nn.Module:
        return TinyBody()

    def install_mlp(self, module: nn.Module, layer: int, mlp: nn.Module) -> None:
        raise NotImplementedError

    def mlp_projection(self, module: nn.Module, layer: int, which: str = "up") -> nn.Module:
        raise NotImplementedError


class TinySuite(Suite):
    """Two 3-class tasks on fixed random 4-d inputs; only what AdaMerging calls is implemented."""

    name = "tiny-fake"
    body_class: type[nn.Module] = TinyBody

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("a", "b")

    def family(self) -> Family:
        return TinyFamily()

    def load_pretrained(self) -> StateDict:
        torch.manual_seed(0)
        return self.body_class().state_dict()

    def recipe(self) -> dict[str, object]:
        return {}

    def batches(self, task: str, split: str, *, batch_size: int = 32, limit: int | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        x = torch.randn(48, 4, generator=torch.Generator().manual_seed(ord(task)))
        order = torch.randperm(48, generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(48)
        x = x[order][:limit]
        for i in range(0, len(x), batch_size):
            chunk = x[i:i + batch_size]
            yield Batch({"x": chunk}, torch.full((len(chunk),), -1))

    def task_model(self, body, head, task: str) -> nn.Module:
        module = TinyTaskModel(self.body_class(), nn.Linear(8, 3))
        module.body.load_state_dict(body)
        module.head.load_state_dict(head)
        return module.eval()

    def finetune(self, task, body, head=None, *, seed=0, regularizer=None, steps=None) -> Expert:
        raise NotImplementedError

    def evaluate(self, body, head, task, *, merged=False) -> dict[str, float]:
        raise NotImplementedError


def merge_setup(suite: TinySuite, seed: int = 1, noise=torch.randn_like, int_shift: int = 3):
    """θ_pre of ``suite``, one perturbed expert and one random head per task, and the merge context."""
    base = suite.pretrained()
    torch.manual_seed(seed)
    experts = [{k: v + 0.5 * noise(v) if v.is_floating_point() else v + int_shift for k, v in base.items()}
               for _ in suite.tasks]
    heads = [{"weight": 2.0 * torch.randn(3, 8), "bias": torch.zeros(3)} for _ in suite.tasks]
    return base, experts, MergeContext(suite=suite, tasks=suite.tasks, heads=heads, seed=0)


@pytest.fixture
def tiny_merge(tmp_path):
    return merge_setup(TinySuite(cache_dir=tmp_path))


ADA_FAST = {"steps": 30, "lr": 0.05, "prior": 0.3, "batch_size": 8, "batches_per_step": 2, "samples": 32}


def set_entropy(ctx: MergeContext, body: StateDict) -> float:
    """Σ over tasks of the mean prediction entropy on all test inputs, computed independently of merges/."""
    total = 0.0
    for task, head in zip(ctx.tasks, ctx.heads):
        model = ctx.suite.task_model(body, head, task)
        with torch.no_grad():
            probs = torch.cat([model(**b.inputs) for b in ctx.suite.batches(task, "test")]).softmax(-1)
        total += float(-(probs * probs.log()).sum(-1).mean())
    return total


@pytest.mark.parametrize("granularity", ["task", "tensor", "block"])
def test_adamerging_reduces_prediction_entropy(tiny_merge, granularity):
    base, experts, ctx = tiny_merge
    result = learn_coefficients(base, experts, ctx, granularity=granularity, clamp=True, measure=True, **ADA_FAST)
    at_prior = merge("ta", base, experts, lambda_=0.3)
    assert set_entropy(ctx, result.state) < set_entropy(ctx, at_prior) - 0.01
    assert result.entropy_after < result.entropy_before
    assert result.losses[-1] < result.losses[0]


def test_adamerging_coefficient_shapes_follow_granularity(tiny_merge):
    base, experts, ctx = tiny_merge
    fast = {**ADA_FAST, "steps": 1}
    assert learn_coefficients(base, experts, ctx, granularity="task", clamp=True, **fast).coefficients.shape == (1, 2)
    assert learn_coefficients(base, experts, ctx, granularity="tensor", clamp=True, **fast).coefficients.shape == (8, 2)
    blocks = learn_coefficients(base, experts, ctx, granularity="block", clamp=True, **fast)
    assert blocks.groups == ("embeddings", "layer 0", "layer 1", "final norms")


def test_adamerging_clamps_coefficients_to_unit_interval(tiny_merge):
    base, experts, ctx = tiny_merge
    wild = {**ADA_FAST, "steps": 40, "lr": 0.5}
    clamped = learn_coefficients(base, experts, ctx, granularity="tensor", clamp=True, **wild).coefficients
    free = learn_coefficients(base, experts, ctx, granularity="tensor", clamp=False, **wild).coefficients
    assert float(clamped.min()) >= 0.0 and float(clamped.max()) <= 1.0
    assert float(free.min()) < 0.0 or float(free.max()) > 1.0  # the bound is really active here


def test_adamerging_state_is_base_plus_weighted_task_vectors(tiny_merge):
    base, experts, ctx = tiny_merge
    result = learn_coefficients(base, experts, ctx, granularity="task", clamp=True, **ADA_FAST)
    lam = result.coefficients[0]
    assert not torch.allclose(lam, torch.full_like(lam, 0.3))  # λ moved from the prior
    for k, v in base.items():
        if v.is_floating_point():
            expected = v + sum(lam[i] * (e[k] - v) for i, e in enumerate(experts))
            assert torch.allclose(result.state[k], expected, atol=1e-6)
        else:
            assert torch.equal(result.state[k], v)  # integer buffer from the base, not the experts


def test_adamerging_through_the_registry_needs_a_context(tiny_merge):
    base, experts, ctx = tiny_merge
    method = merges.get("adamerging-layer")
    params = method.parse({k: str(v) for k, v in {**ADA_FAST, "steps": 2}.items()})
    out = method.merge(base, experts, params, ctx=ctx)
    assert set(out) == set(base)
    with pytest.raises(ValueError, match="context"):
        method.merge(base, experts, params)


def test_adamerging_shape_mismatch_raises_checkpoint_error(tiny_merge):
    base, experts, ctx = tiny_merge
    bad = dict(experts[1], **{"embed.weight": torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match="shape"):
        learn_coefficients(base, [experts[0], bad], ctx, granularity="task", clamp=True, **ADA_FAST)


def test_block_groups_follow_the_architecture_map():
    keys = ["embed.weight", "layers.0.weight", "layers.0.bias", "layers.2.weight", "norm.bias", "extra"]
    groups, index = coefficient_groups(keys, "block", TinyFamily().arch_map())
    assert groups == ("embeddings", "layer 0", "layer 1", "final norms", "extra")
    assert index == [0, 1, 1, 2, 3, 4]


def test_prediction_entropy_of_uniform_and_peaked_logits():
    assert math.isclose(float(prediction_entropy(torch.zeros(2, 4))), math.log(4), rel_tol=1e-6)
    assert float(prediction_entropy(T([[50.0, 0.0, 0.0]]))) < 1e-6


def test_prediction_entropy_ignores_padded_positions():
    # Position 1 of the sequence is padding: only the uniform (entropy log 3) position counts.
    logits = torch.stack([torch.zeros(3), T([50.0, 0.0, 0.0])]).unsqueeze(0)  # [B=1, T=2, C=3]
    masked = prediction_entropy(logits, T([[1, 0]]))
    assert math.isclose(float(masked), math.log(3), rel_tol=1e-6)
    assert math.isclose(float(prediction_entropy(logits)), math.log(3) / 2, rel_tol=1e-5)


class TinyBNBody(TinyBody):
    """TinyBody with BatchNorm after the embedding (float running statistics in the state)."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.bn(self.embed(x))))


class TinyBNSuite(TinySuite):
    name = "tiny-fake-bn"
    body_class = TinyBNBody

    def load_pretrained(self) -> StateDict:
        state = super().load_pretrained()
        state["bn.running_mean"].normal_()
        state["bn.running_var"].uniform_(0.5, 2.0)
        return state


def test_adamerging_merges_batchnorm_statistics_without_differentiating_them(tmp_path):
    base, experts, ctx = merge_setup(TinyBNSuite(cache_dir=tmp_path), noise=torch.rand_like)
    result = learn_coefficients(base, experts, ctx, granularity="task", clamp=True, measure=True, **ADA_FAST)
    lam = result.coefficients[0]
    assert result.entropy_after < result.entropy_before
    for k in ("bn.running_mean", "bn.running_var"):  # the statistics follow the learned λ like the weights
        expected = base[k] + sum(lam[i] * (e[k] - base[k]) for i, e in enumerate(experts))
        assert torch.allclose(result.state[k], expected, atol=1e-6)


def test_adamerging_objective_uses_batch_statistics_not_merged_running_ones(tmp_path):
    base, experts, ctx = merge_setup(TinyBNSuite(cache_dir=tmp_path), seed=2, noise=torch.rand_like, int_shift=0)
    # running statistics whose merge would be a negative variance: they must not matter
    odd = [{**e, "bn.running_var": torch.full_like(e["bn.running_var"], -5.0)} for e in experts]
    a = learn_coefficients(base, experts, ctx, granularity="tensor", clamp=True, **ADA_FAST)
    b = learn_coefficients(base, odd, ctx, granularity="tensor", clamp=True, **ADA_FAST)
    assert torch.isfinite(b.coefficients).all() and torch.equal(a.coefficients, b.coefficients)
    assert not torch.allclose(a.coefficients, torch.full_like(a.coefficients, 0.3))


@pytest.mark.parametrize("name", ["wa", "ta"])
def test_linear_merges_allocate_every_block_buffer_on_the_experts_device(name):
    # meta tensors stand in for a GPU: a running sum or a conversion buffer made on the default device (CPU)
    # cannot be added to, so the merge would fail on a GPU. The half tensor goes through WA's float32 buffer.
    base = {"w": torch.zeros(6, 4, device="meta"), "h": torch.zeros(3, 2, dtype=torch.float16, device="meta")}
    experts = [{k: torch.empty_like(v) for k, v in base.items()} for _ in range(2)]
    out = merge(name, base, experts)
    assert {k: (v.device.type, v.dtype, v.shape) for k, v in out.items()} == {
        k: ("meta", v.dtype, v.shape) for k, v in base.items()}


def test_ties_global_names_the_missing_and_the_unexpected_tensors_of_an_expert():
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"expert 1 .*1 tensor\(s\) missing \(e.g. \['b'\]\), 0 unexpected"):
        merges.get("ties-global").merge(base, [dict(base), {"a": torch.ones(2)}])
    with pytest.raises(CheckpointError, match=r"expert 0 .*0 tensor\(s\) missing \(e.g. \[\]\), 1 unexpected \(e.g. \['c'\]\)"):
        merges.get("ties-global").merge(base, [{**base, "c": torch.ones(2)}])
    many = {f"t{i}": torch.zeros(1) for i in range(5)}  # at most three names are quoted
    with pytest.raises(CheckpointError, match=r"5 tensor\(s\) missing \(e.g. \['t0', 't1', 't2'\]\), 4 unexpected "
                                              r"\(e.g. \['u0', 'u1', 'u2'\]\)"):
        merges.get("ties-global").merge(many, [{f"u{i}": torch.zeros(1) for i in range(4)}])
    with pytest.raises(CheckpointError, match="^a merge needs at least one expert$"):
        merges.get("ties-global").merge(base, [])


def test_disjoint_merge_counts_only_the_nonzero_values_that_agree_with_the_sign():
    # one entry elected +, one elected −: the zeros of the third expert agree with neither
    trimmed = T([[2.0, -2.0], [0.0, 0.0], [4.0, -4.0], [-1.0, 1.0]])
    sign = T([1.0, -1.0])
    assert torch.equal(disjoint_merge(trimmed, sign, "mean"), T([3.0, -3.0]))  # (2 + 4) / 2, not / 3
    assert torch.equal(disjoint_merge(trimmed, sign, "sum"), T([6.0, -6.0]))
    assert torch.equal(disjoint_merge(T([[0.5], [-2.0]]), T([-1.0]), "mean"), T([-2.0]))  # 0.5 is not < 0
    with pytest.raises(ParamError, match="aggregate must be one of mean, sum, max; got 'median'"):
        disjoint_merge(trimmed, sign, "median")


def test_dare_drop_rate_lies_in_zero_to_one_excluded():
    from merges.dare import check_drop_rate

    for p in (0.0, 0.5, 0.999):
        check_drop_rate(p)
    for p in (1.0, 1.5, -0.1):
        with pytest.raises(ParamError, match=r"drop probability and must lie in \[0, 1\) .*got " + str(p)):
            check_drop_rate(p)


@pytest.mark.parametrize("block_elements", [1, 1 << 20])
@pytest.mark.parametrize(("taus", "expected"), [
    # Σ elected signs = 0: no whole-model majority, so the zero-sum entry keeps its negative value (the original)
    ([[1.0, -1.0, 2.0], [1.0, -1.0, -2.0]], [1.0, -1.0, -2.0]),
    # Σ = +1: the majority is +, the zero-sum entry keeps +2
    ([[1.0, 2.0], [1.0, -2.0]], [1.0, 2.0]),
    # Σ = 0 with a zero sum of magnitudes below 1: still ambiguous
    ([[1.0, -1.0, 0.25], [1.0, -1.0, -0.25]], [1.0, -1.0, -0.25]),
    # Σ = −1 although the last entry (the last block when blocks are single entries) is +: the majority is −
    ([[2.0, -1.0, -1.0, 1.0], [-2.0, -1.0, -1.0, 1.0]], [-2.0, -1.0, -1.0, 1.0]),
])
def test_ties_global_resolves_zero_sums_by_the_sign_of_the_whole_model_tally(taus, expected, block_elements):
    base = {"w": torch.zeros(len(expected))}
    experts = [{"w": T(tau)} for tau in taus]
    merged = ties_merge_global(base, experts, k=1.0, lambda_=1.0, aggregate="mean", block_elements=block_elements)
    assert torch.equal(merged["w"], T(expected))
    assert torch.equal(flattened_ties_reference(base, experts, 1.0, "mean")["w"], T(expected))  # the original agrees


def test_ties_global_carries_every_row_of_an_integer_buffer_in_row_blocks():
    base = {"w": torch.zeros(2), "steps": torch.tensor([[1], [2], [3]])}
    experts = [{"w": T([1.0, -1.0]), "steps": torch.tensor([[9], [9], [9]])}]
    merged = ties_merge_global(base, experts, k=1.0, lambda_=1.0, aggregate="mean", block_elements=1)
    assert torch.equal(merged["steps"], base["steps"]) and torch.equal(merged["w"], T([1.0, -1.0]))


@pytest.mark.parametrize(("taus", "expected"), [
    ([[1.0, -1.0, 2.0], [1.0, -1.0, -2.0]], [1.0, -1.0, -2.0]),  # Σ signs = 0: the negative value of the zero sum
    ([[1.0, 2.0], [1.0, -2.0]], [1.0, 2.0]),  # Σ = +1
    ([[2.0, -1.0, -1.0, 1.0], [-2.0, -1.0, -1.0, 1.0]], [-2.0, -1.0, -1.0, 1.0]),  # Σ = −1, last row +
    ([[1.0, -1.0, 0.25], [1.0, -1.0, -0.25]], [1.0, -1.0, -0.25]),  # Σ = 0, a zero sum of small magnitudes
])
def test_ties_in_single_entry_row_blocks_resolves_zero_sums_by_the_tensors_tally(taus, expected):
    # per tensor, the tensor is the scope: merged one entry per block, the majority is still the tensor's
    base = {"w": torch.zeros(len(expected))}
    experts = [{"w": T(tau)} for tau in taus]
    params = {"k": 1.0, "lambda_": 1.0, "aggregate": "mean"}
    assert torch.equal(merged_tensor(merges.get("ties"), base, experts, params, "w", block_elements=1), T(expected))
    assert torch.equal(merge("ties", base, experts, k=1.0)["w"], T(expected))  # whole, the original's rule


def test_ties_parameter_checks_name_the_valid_range_and_choices():
    from merges.ties import check_ties_params

    check_ties_params(1.0, "mean")
    for k in (0.0, 1.5):
        with pytest.raises(ParamError, match=r"k is the fraction of entries kept and must lie in \(0, 1\] .*got " + str(k)):
            check_ties_params(k, "mean")
    with pytest.raises(ParamError, match="aggregate must be one of mean, sum, max; got 'median'"):
        check_ties_params(0.2, "median")
    with pytest.raises(ParamError, match="aggregate must be one of mean, sum, max; got 'median'"):
        elect_and_merge(T([[1.0]]), "median", None)


def test_trim_with_a_nan_threshold_keeps_nothing_as_the_mask_does():
    from merges.ties import trim_

    # a NaN threshold (a task vector with NaN magnitudes) compares false everywhere, as tau * (|tau| >= t) does
    assert torch.equal(trim_(T([1.0, -2.0, 3.0]), T(float("nan"))), T([0.0, 0.0, 0.0]))
    assert torch.equal(trim_(T([1.0, -2.0, 2.0, 3.0]), T(2.0)), T([0.0, -2.0, 2.0, 3.0]))  # |τ| = t is kept


# ---------------------------------------------------------------- devices and memory


@pytest.mark.parametrize("name", TENSORWISE)
def test_merges_allocate_on_the_experts_device_whatever_the_default_device(name):
    # `torch.set_default_device("cuda")` is common; a buffer made on the default device instead of the
    # experts' (or a DARE draw made off the CPU generators' device) breaks the merge. Meta stands in for the
    # other device: the merge of CPU experts must be the same, whole and in row blocks, under it.
    from bench.outofcore import merged_tensor

    base, experts = random_model(4, 3)
    method = merges.get(name)
    params = params_dict(method.parse({}))
    expected = {n: [merged_tensor(method, base, experts, params, n, seed=2, block_elements=b) for b in (10**9, 7)]
                for n in base}
    with torch.device("meta"):  # the default device inside the block (`torch.set_default_device`)
        got = {n: [merged_tensor(method, base, experts, params, n, seed=2, block_elements=b) for b in (10**9, 7)]
               for n in base}
    for n in base:
        for e, g in zip(expected[n], got[n]):
            assert g.device.type == "cpu" and torch.equal(e + 0.0, g + 0.0), n


def test_ties_global_and_the_election_allocate_on_the_experts_device_whatever_the_default_device():
    base, experts = random_model(5, 3)
    trimmed = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    expected = ([ties_merge_global(base, experts, k=0.3, lambda_=1.0, aggregate="mean", block_elements=b)
                 for b in (10**9, 7)], elect_and_merge(trimmed, "mean", None))
    with torch.device("meta"):
        got = ([ties_merge_global(base, experts, k=0.3, lambda_=1.0, aggregate="mean", block_elements=b)
                for b in (10**9, 7)], elect_and_merge(trimmed, "mean", None))
    for e, g in zip(expected[0], got[0]):
        assert all(g[n].device.type == "cpu" and torch.equal(e[n] + 0.0, g[n] + 0.0) for n in base)
    assert torch.equal(expected[1][0], got[1][0]) and expected[1][1:] == got[1][1:]


@pytest.mark.parametrize("default_device", [None, "meta"])
def test_dare_draws_its_masks_with_the_cpu_generator_and_applies_them_on_taus_device(default_device):
    from bench.outofcore import TensorSpec, row_blocks
    from merges.dare import DropMasks

    def cpu(*shape: int) -> torch.Tensor:
        return torch.empty(shape, device="cpu")

    shape = (4, 5)
    masks = DropMasks(torch.Generator().manual_seed(7), TensorSpec("w", shape, 2, (row_blocks(shape, 20)[0],)), 0.5,
                      rescale=True)
    reference = torch.Generator().manual_seed(7)
    # whatever the default device, the draws are the CPU generator's
    with torch.device(default_device) if default_device else contextlib.nullcontext():
        # expert 0's τ on another device (meta): masked there, after exactly 20 uniforms drawn on the CPU
        out = masks.apply(0, torch.empty(shape, device="meta"))
        assert out.device.type == "meta" and out.shape == shape
        cpu(20).uniform_(generator=reference)
        assert torch.equal(masks.generators[0].get_state(), reference.get_state())
        # expert 1 (same stream, whole tensor): the next 20 uniforms, kept where ≥ p, survivors ÷ (1 − p); drawn
        # into the caller's scratch when given (it ends up holding the 0/1 mask), else into a buffer of its own
        keep = (cpu(20).uniform_(generator=reference) >= 0.5).float()
        state = masks.generators[1].get_state()
        scratch = cpu(20).fill_(float("nan"))
        assert torch.equal(masks.apply(1, cpu(*shape).fill_(1.0), scratch), keep.view(shape) / 0.5)
        assert torch.equal(scratch, keep)
        masks.generators[1].set_state(state)
        assert torch.equal(masks.apply(1, cpu(*shape).fill_(1.0)), keep.view(shape) / 0.5)


class _Allocations:
    """Counts the tensors of at least ``min_numel`` entries that ATen ops return in new memory (not a view,
    an ``out=`` or an in-place result of one of their inputs) while active."""

    def __init__(self, min_numel: int) -> None:
        self.min_numel, self.count = min_numel, 0

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs or {}))[0]
                          if isinstance(t, torch.Tensor)}
                out = func(*args, **(kwargs or {}))
                counter.count += sum(1 for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
                                     and t.numel() >= counter.min_numel and t.untyped_storage().data_ptr() not in inputs)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


@pytest.mark.parametrize("name,params", [("wa", {}), ("ta", {}), ("ties", {"k": "1.0"}), ("dare-ta", {}),
                                         ("dare-ties", {})])
def test_a_merge_reuses_its_buffers_for_every_expert_and_every_block(name, params):
    # A 64x16 tensor, whole or in 4 row blocks of 16x16 (the size counted). Each job holds a fixed set of
    # block buffers (τ_i, DARE's draws, the TIES workspace) reused for every expert and block, so:
    # - the count does not depend on the number of experts (2 or 5);
    # - in blocks it is the whole merge's plus one merged block per block (the whole merge's one merged block
    #   is its output; in blocks the output is one more tensor, the first block's place) ...
    # - ... plus, for DARE, one buffer per expert after the first that positions its generator in the stream.
    from bench.outofcore import merged_tensor

    method = merges.get(name)
    parsed = params_dict(method.parse(params))
    counts = {}
    for n in (2, 5):
        g = torch.Generator().manual_seed(n)
        base = {"w": torch.randn(64, 16, generator=g)}
        experts = [{"w": base["w"] + torch.randn(64, 16, generator=g)} for _ in range(n)]
        for blocks, elements in ((1, 10**9), (4, 256)):
            with _Allocations(256) as a:
                merged_tensor(method, base, experts, parsed, "w", seed=1, block_elements=elements)
            counts[n, blocks] = a.count
    assert counts[2, 1] == counts[5, 1]
    for n in (2, 5):
        assert counts[n, 4] == counts[n, 1] + 4 + (n - 1 if name.startswith("dare") else 0)
    if name == "wa":  # the running sum is the only tensor: float32 experts are added without a conversion buffer
        assert counts[2, 1] == 1


def test_weight_average_converts_other_dtypes_through_one_reused_buffer():
    from bench.outofcore import merged_tensor

    method = merges.get("wa")
    for n in (2, 5):
        base = {"w": torch.zeros(64, 16, dtype=torch.float16)}
        experts = [{"w": torch.full((64, 16), float(i), dtype=torch.float16)} for i in range(n)]
        with _Allocations(256) as a:
            out = merged_tensor(method, base, experts, {}, "w", float32=True)
        assert a.count == 2 and torch.equal(out, torch.full((64, 16), (n - 1) / 2))  # the sum and one buffer
