"""Merging the experts of a modality-specific transformer into one modality-agnostic transformer.

This file is Sec. 4.1 and Sec. 7 of "An Empirical Study of Multimodal Model Merging" (Sung et al.,
2023) as code. It is meant to be copied into other projects: it imports only torch and the standard
library, and it sees nothing but plain ``dict[str, Tensor]`` state dicts (plus, to collect Gram
matrices, any ``nn.Module``).

The one thing to understand first is the naming convention it shares with model.py (written down in
both files, imported by neither):

    A modality-specific sublayer holds its experts as children named ``v`` (vision), ``l``
    (language) and ``vl`` (vision-language fusion, only in the top M layers and the final norm).
    So a key reads ``blocks.3.attn.v.qkv.weight``, ``blocks.11.mlp.vl.fc1.bias`` or
    ``norm.vl.weight``. Its *modality segment* is the one dot-separated component equal to ``v``,
    ``l`` or ``vl``; no other module is ever named so. Deleting the segment gives exactly the key
    of the same parameter in the modality-agnostic (maa) model: ``blocks.3.attn.qkv.weight``.
    Keys without a modality segment (``patch_embed.*``, ``word_embed.*``, ``modality_embed``, the
    heads) are copied unchanged — Sec. 4: "we do not merge the embedding layers".

The file reads in five parts:

1. Merging any models that share their keys: ``interpolate`` (Σ w_i W_i), ``task_arithmetic``
   (Ilharco et al.), ``regmean`` (Jin et al.) with ``collect_grams`` for its Gram matrices, and
   methods that came after the paper, ``ties`` (Yadav et al. 2023), ``dare`` (Yu et al. 2024) and
   ``magmax`` (Marczak et al. 2024).
2. Multimodal merging, Sec. 4.1: ``merge_modalities`` turns the state dict of a modality-specific
   model (msa) into one that loads with ``strict=True`` into the maa model of the same size.
3. Distances between two weight vectors, Sec. 7 / Table 5: ``l2_distance``,
   ``cosine_dissimilarity``, ``ssd`` (Eq. 1) and ``tssd``.
4. ``modality_weights`` pairs the vision and language experts of one checkpoint, so that
   ``tssd(*modality_weights(state_dict))`` is a number of Table 5; ``modality_vectors`` gives the same
   pairs less their shared start W_0 (τ_m = W_m − W_0), to measure what the experts learned.
5. Merging over time (Dziadzio et al., CVPR 2025, "TIME"): ``TemporalMerge`` chooses, as experts
   arrive one task after another, the weights each new expert starts from (init) and the weights
   that are shipped (deploy), merging with interpolation, task arithmetic, TIES, DARE or MagMax of
   part 1; ``recency_weights`` are its schedules for the one-shot merge of all experts.

House rules: bad input raises one ValueError (KeyError for a missing key) that names the key;
merging runs tensor by tensor, so memory beyond the output stays at a few copies of the largest
tensor; a merged tensor keeps the dtype of its inputs — 16-bit inputs are combined in float32,
RegMean solves in float64, and every distance accumulates in float64.
"""
import math
import zlib
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

StateDict = Mapping[str, Tensor]

MODALITIES = ("v", "l", "vl")

# Distances stream their inputs in chunks of this many entries, so their float64 temporaries stay
# at a few MiB however large the model is.
_CHUNK = 1 << 20


# ---------------------------------------------------------------------------------------------
# Checking the input: every error names the key it is about.
# ---------------------------------------------------------------------------------------------

def _all_finite(tensor: Tensor) -> bool:
    # A finite sum proves every entry finite (one NaN or Inf poisons it) without allocating a mask;
    # only a sum that overflows from large finite entries needs the exact elementwise test.
    return bool(torch.isfinite(tensor.sum())) or bool(torch.isfinite(tensor).all())


def _check_tensors(where: str, tensors: Sequence[Tensor], names: Sequence[str],
                   same_dtype: bool = True) -> None:
    """The tensors of one key across models: floating point, one shape (and dtype), all finite."""
    first = tensors[0]
    for name, tensor in zip(names, tensors):
        if not tensor.is_floating_point():
            raise ValueError(f"{where}: {name} holds a {tensor.dtype} tensor; "
                             f"only floating-point weights can be merged or compared")
        if tensor.shape != first.shape:
            raise ValueError(f"{where}: shape {tuple(first.shape)} in {names[0]} "
                             f"vs {tuple(tensor.shape)} in {name}")
        if same_dtype and tensor.dtype != first.dtype:
            raise ValueError(f"{where}: dtype {first.dtype} in {names[0]} vs {tensor.dtype} in {name}")
        if not _all_finite(tensor):
            raise ValueError(f"{where}: {name} holds NaN or Inf")


def _check_same_keys(state_dicts: Sequence[StateDict], names: Sequence[str]) -> None:
    reference = state_dicts[0]
    for name, state_dict in zip(names[1:], state_dicts[1:]):
        for key in reference:
            if key not in state_dict:
                raise KeyError(f"key {key!r}: in {names[0]} but missing from {name}")
        for key in state_dict:
            if key not in reference:
                raise KeyError(f"key {key!r}: in {name} but not in {names[0]}")


def _checked_result(key: str, merged: Tensor) -> Tensor:
    # Finite inputs can still give a non-finite result: extrapolating in float16, or a nearly
    # singular RegMean system.
    if not _all_finite(merged):
        raise ValueError(f"key {key!r}: the merged tensor holds NaN or Inf (overflow in {merged.dtype}?)")
    return merged


def _check_option(name: str, value) -> None:
    """One rule per option name, shared by the generic methods and merge_modalities."""
    if name == "seed":
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"seed must be an int, got {value!r}")
        return
    if name in ("init_state", "grams"):
        if not isinstance(value, Mapping):
            raise ValueError(f"{name} must be a dict of tensors, got {type(value).__name__}")
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    # alpha and lam are free: outside [0, 1] they extrapolate, which is a legitimate experiment.
    if name in ("gamma", "density", "k", "ema_weight") and not 0 <= value <= 1:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    if name == "p" and not 0 <= value < 1:
        raise ValueError(f"p must be in [0, 1) (it is a drop probability), got {value}")


def _model_names(count: int) -> list:
    return [f"model {i}" for i in range(count)]


# ---------------------------------------------------------------------------------------------
# One merged tensor from the same tensor of several models. Every function here returns a new
# tensor of its inputs' dtype; 16-bit inputs are combined in float32 and cast back once.
# ---------------------------------------------------------------------------------------------

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # 16-bit floats keep about 3 significant digits: rounding after every step of a sum would lose
    # the small differences between experts that merging is all about.
    return torch.float32 if torch.finfo(dtype).bits < 32 else dtype


def _weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_i w_i W_i, allocating only the output."""
    dtype = _compute_dtype(tensors[0].dtype)
    total = torch.mul(tensors[0].to(dtype), weights[0])
    for tensor, weight in zip(tensors[1:], weights[1:]):
        total.add_(tensor.to(dtype), alpha=weight)
    return total.to(tensors[0].dtype)


def _mean(tensors: Sequence[Tensor]) -> Tensor:
    """(1/M) Σ_m W_m as a running mean m_k = m_{k-1} + (W_k − m_{k-1})/k.

    The running form gives W back bit for bit when all W_m equal W, so merging identical experts
    is lossless.
    """
    dtype = _compute_dtype(tensors[0].dtype)
    mean = tensors[0].to(dtype, copy=True)
    for k, tensor in enumerate(tensors[1:], start=2):
        mean.lerp_(tensor.to(dtype), 1 / k)
    return mean.to(tensors[0].dtype)


def _apply_task_vectors(base: Tensor, tensors: Sequence[Tensor], lam: float,
                        edit: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """W_0 + λ Σ_m edit(τ_m) with task vectors τ_m = W_m − W_0 (edit: DARE drops entries)."""
    dtype = _compute_dtype(base.dtype)
    w0 = base.to(dtype)
    total = torch.zeros_like(w0)
    for tensor in tensors:
        task_vector = tensor.to(dtype) - w0  # τ_m = W_m − W_0
        total += task_vector if edit is None else edit(task_vector)
    # W = W_0 + λ Σ_m τ_m; λ = 0 gives W_0 back exactly
    return torch.add(w0, total, alpha=lam).to(base.dtype)


def _trim(task_vector: Tensor, density: float) -> Tensor:
    """TIES step 1: keep the round(density·n) entries of largest |τ|, zero the rest.

    Entries tied with the smallest kept magnitude are kept too. The trim is per tensor (as in
    mergekit), not over the whole flattened model as in the TIES paper: it keeps every layer's
    share and lets merging run tensor by tensor.
    """
    size = task_vector.numel()
    keep = round(density * size)
    if keep == 0:
        return torch.zeros_like(task_vector)
    if keep == size:
        return task_vector
    magnitude = task_vector.abs()
    threshold = torch.kthvalue(magnitude.flatten(), size - keep + 1).values  # keep-th largest |τ|
    return torch.where(magnitude >= threshold, task_vector, 0)


def _ties_tensor(base: Tensor, tensors: Sequence[Tensor], density: float, lam: float) -> Tensor:
    """TIES-merging (Yadav et al. 2023): trim, elect sign, disjoint mean, then W_0 + λ τ."""
    dtype = _compute_dtype(base.dtype)
    w0 = base.to(dtype)
    trimmed = torch.stack([_trim(t.to(dtype) - w0, density) for t in tensors])  # (M, *shape)
    # Elect: per entry, the sign with the larger total mass, sign(Σ_m τ̂_m).
    elected = torch.sign(trimmed.sum(dim=0))  # (*shape)
    # Disjoint mean: average only the task vectors that agree with the elected sign, so the
    # opposing ones neither cancel it nor dilute it; zeros (trimmed entries) never vote.
    agrees = (torch.sign(trimmed) == elected) & (trimmed != 0)  # (M, *shape)
    delta = (trimmed * agrees).sum(dim=0) / agrees.sum(dim=0).clamp(min=1)  # 0 where none agree
    return torch.add(w0, delta, alpha=lam).to(base.dtype)


def _key_generator(seed: int, key: str, device: torch.device) -> torch.Generator:
    # One random stream per key (seed plus a stable hash of the key), so a key's DARE masks do not
    # depend on which other keys are merged, or in which order. Kept to 32 bits: the CPU generator
    # (Mersenne Twister) ignores the higher ones, so seeds differing only there would coincide.
    generator = torch.Generator(device=device)
    generator.manual_seed((seed + zlib.crc32(key.encode())) % 2**32)
    return generator


def _dare_tensor(key: str, base: Tensor, tensors: Sequence[Tensor], p: float, lam: float,
                 seed: int) -> Tensor:
    """DARE (Yu et al. 2024): drop each entry of each τ_m with probability p, rescale by 1/(1−p)."""
    generator = _key_generator(seed, key, base.device)

    def drop_and_rescale(task_vector: Tensor) -> Tensor:
        survives = torch.rand(task_vector.shape, generator=generator, device=task_vector.device) >= p
        # dividing by 1 − p keeps the expected task vector unchanged: E[τ̂] = τ
        return task_vector * survives / (1 - p)

    return _apply_task_vectors(base, tensors, lam, edit=drop_and_rescale)


def _regmean_linear(key: str, weights: Sequence[Tensor], grams: Sequence[Tensor],
                    gamma: float) -> Tensor:
    """RegMean for one linear weight: the W minimizing Σ_m ‖X_m Wᵀ − X_m W_mᵀ‖², in float64.

    One solve per key, with all output features as right-hand-side columns.
    """
    # Any Gram-weighted average of equal weights is that weight: returning it skips the solve and
    # its float64 rounding, so merging right after the seed hand-over is exact here too.
    if all(torch.equal(weight, weights[0]) for weight in weights[1:]):
        return weights[0].clone()
    lhs, rhs = 0, 0
    for weight, gram in zip(weights, grams):
        gram = gram.to(weight.device, torch.float64)
        # G̃ = γG + (1−γ)diag(G): shrinking the off-diagonal makes the solve stabler (Jin et al.)
        gram = gamma * gram + (1 - gamma) * torch.diag(torch.diagonal(gram))
        lhs = lhs + gram  # Σ_m G̃_m, (in, in)
        rhs = rhs + gram @ weight.to(torch.float64).T  # Σ_m G̃_m W_mᵀ, (in, out)
    unseen = (torch.diagonal(lhs) == 0).nonzero().flatten()
    if len(unseen):
        raise ValueError(f"key {key!r}: the RegMean system Σ G̃ is singular: input feature "
                         f"{unseen[0].item()} is zero in every token every expert saw")
    try:
        # Sec. 4.1: W = (Σ_m G̃_m)⁻¹ Σ_m G̃_m W_mᵀ
        solution = torch.linalg.solve(lhs, rhs)  # (in, out)
    except torch.linalg.LinAlgError:
        raise ValueError(f"key {key!r}: the RegMean system Σ G̃ is singular (try gamma < 1)") from None
    return solution.T.to(weights[0].dtype).contiguous()  # back to nn.Linear's (out, in) layout


def _gram(grams: Mapping[str, Tensor], key: str, weight: Tensor, owner: str) -> Tensor:
    """The Gram matrix of the input of the linear weight grams[key], checked against the weight."""
    if key not in grams:
        raise KeyError(f"key {key!r}: no Gram matrix in {owner} (collect_grams never saw this "
                       f"linear's input); RegMean needs one per model for every linear weight")
    gram = grams[key]
    in_features = weight.shape[1]
    if gram.shape != (in_features, in_features):
        raise ValueError(f"key {key!r}: Gram matrix of shape {tuple(gram.shape)} in {owner}, "
                         f"expected {(in_features, in_features)} for a weight of shape {tuple(weight.shape)}")
    if not gram.is_floating_point() or not _all_finite(gram):
        raise ValueError(f"key {key!r}: Gram matrix in {owner} is not a finite floating-point tensor")
    return gram


# ---------------------------------------------------------------------------------------------
# Part 1: merging any models with the same keys.
# ---------------------------------------------------------------------------------------------

def _merge_each_key(state_dicts: Sequence[StateDict], names: Sequence[str],
                    merge_tensor: Callable[[str, list], Tensor]) -> dict:
    """Check every model first (so no work is wasted on bad input), then merge key by key."""
    if len(state_dicts) < 2:
        raise ValueError("merging needs at least one model besides the base, or two models")
    _check_same_keys(state_dicts, names)
    for key in state_dicts[0]:
        _check_tensors(f"key {key!r}", [sd[key] for sd in state_dicts], names)
    return {key: _checked_result(key, merge_tensor(key, [sd[key] for sd in state_dicts]))
            for key in state_dicts[0]}


def interpolate(state_dicts: Sequence[StateDict], weights: Sequence[float]) -> dict:
    """Σ_i w_i W_i, key by key. The weights are used as given (not normalized to sum to 1)."""
    if len(weights) != len(state_dicts):
        raise ValueError(f"{len(weights)} weights for {len(state_dicts)} state dicts")
    for weight in weights:
        _check_option("weight", weight)
    return _merge_each_key(state_dicts, _model_names(len(state_dicts)),
                           lambda key, tensors: _weighted_sum(tensors, weights))


def task_arithmetic(base: StateDict, state_dicts: Sequence[StateDict], lam: float) -> dict:
    """Task arithmetic (Ilharco et al.): W_0 + λ Σ_i (W_i − W_0)."""
    _check_option("lam", lam)
    return _merge_each_key([base, *state_dicts], ["base", *_model_names(len(state_dicts))],
                           lambda key, tensors: _apply_task_vectors(tensors[0], tensors[1:], lam))


def ties(base: StateDict, state_dicts: Sequence[StateDict], density: float, lam: float) -> dict:
    """TIES-merging (Yadav et al. 2023), beyond the paper: trim each task vector to its top
    `density` fraction by magnitude (per tensor), elect each entry's sign by total mass, take the
    mean of the entries that agree with it, and add λ times that to W_0."""
    _check_option("density", density)
    _check_option("lam", lam)
    return _merge_each_key([base, *state_dicts], ["base", *_model_names(len(state_dicts))],
                           lambda key, tensors: _ties_tensor(tensors[0], tensors[1:], density, lam))


def dare(base: StateDict, state_dicts: Sequence[StateDict], p: float, lam: float, seed: int) -> dict:
    """DARE (Yu et al. 2024), beyond the paper: task arithmetic on task vectors whose entries are
    dropped with probability p and rescaled by 1/(1−p). The same seed gives the same merge."""
    _check_option("p", p)
    _check_option("lam", lam)
    _check_option("seed", seed)
    return _merge_each_key([base, *state_dicts], ["base", *_model_names(len(state_dicts))],
                           lambda key, tensors: _dare_tensor(key, tensors[0], tensors[1:], p, lam, seed))


def _magmax_tensor(base: Tensor, tensors: Sequence[Tensor], lam: float) -> Tensor:
    """W_0 + λ τ_max, where τ_max takes per entry the task vector of largest magnitude."""
    dtype = _compute_dtype(base.dtype)
    w0 = base.to(dtype)
    chosen = tensors[0].to(dtype) - w0  # τ_1
    for tensor in tensors[1:]:
        task_vector = tensor.to(dtype) - w0  # τ_m = W_m − W_0
        # strictly larger: on equal magnitude the earlier task keeps the entry
        chosen = torch.where(task_vector.abs() > chosen.abs(), task_vector, chosen)
    return torch.add(w0, chosen, alpha=lam).to(base.dtype)


def magmax(base: StateDict, state_dicts: Sequence[StateDict], lam: float = 1.0) -> dict:
    """MagMax (Marczak et al., ECCV 2024), beyond the paper: per entry, the task vector τ_m = W_m − W_0
    of largest |τ_m|, then W_0 + λ τ_max.

    Ties: on equal magnitude the *first* model in ``state_dicts`` keeps the entry, as in the
    official code of merging over time (fomo_in_flux: ``argmax`` returns the first maximum);
    FusionBench's MagMax keeps the later one (a ``>=`` fold). The fold runs one model at a time,
    so memory stays at two task vectors of one tensor.
    """
    _check_option("lam", lam)
    return _merge_each_key([base, *state_dicts], ["base", *_model_names(len(state_dicts))],
                           lambda key, tensors: _magmax_tensor(tensors[0], tensors[1:], lam))


def regmean(state_dicts: Sequence[StateDict], grams: Sequence[Mapping[str, Tensor]],
            gamma: float = 1.0) -> dict:
    """RegMean (Jin et al. 2023): closed-form merge of linear weights, mean of everything else.

    A 2-D tensor whose key has a Gram matrix (of shape [in, in]) is a linear weight [out, in] and
    gets W = (Σ_i G̃_i)⁻¹ Σ_i G̃_i W_iᵀ, transposed back to [out, in]. It needs a Gram matrix from
    every model: a key present in some ``grams[i]`` but not all is an error. Every other tensor
    (biases, norms, 2-D tensors without Gram matrices) is averaged.
    """
    _check_option("gamma", gamma)
    if len(grams) != len(state_dicts):
        raise ValueError(f"{len(grams)} Gram dicts for {len(state_dicts)} state dicts")
    names = _model_names(len(state_dicts))

    def merge_tensor(key: str, tensors: list) -> Tensor:
        if tensors[0].dim() != 2 or not any(key in model_grams for model_grams in grams):
            return _mean(tensors)
        model_grams = [_gram(g, key, t, f"the grams of {name}") for g, t, name in zip(grams, tensors, names)]
        return _regmean_linear(key, tensors, model_grams, gamma)

    return _merge_each_key(state_dicts, names, merge_tensor)


def _named_linears(model: nn.Module, modules: Iterable | None = None) -> dict:
    """name → module for every nn.Linear of the model, or for the given modules (or their names)."""
    if modules is None:
        return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = {id(module): name for name, module in model.named_modules()}
    chosen = {}
    for module in modules:
        if isinstance(module, str):
            module, name = model.get_submodule(module), module
        elif id(module) in names:
            name = names[id(module)]
        else:
            raise ValueError(f"collect_grams: module {module!r} is not part of the model")
        chosen[name] = module
    return chosen


class _GramSums:
    """Σ XᵀX per key. Each call's product is accumulated in place in float32 (`addmm_`: the add is
    fused into the matrix multiply, float32 GEMMs are fast on every device), and every FOLD calls the
    float32 partial sum is folded into a float64 total, so that thousands of batches add up without
    float32 drift while the float64 add is paid once per FOLD calls instead of once per call."""
    FOLD = 32

    def __init__(self):
        self.total, self.partial, self.calls = {}, {}, {}

    def add(self, key: str, tokens: Tensor) -> None:
        if key not in self.partial:
            self.partial[key] = tokens.new_zeros(tokens.shape[1], tokens.shape[1])
            self.calls[key] = 0
        self.partial[key].addmm_(tokens.T, tokens)  # G += XᵀX, (in, in)
        self.calls[key] += 1
        if self.calls[key] == self.FOLD:
            self._fold(key)

    def _fold(self, key: str) -> None:
        partial = self.partial[key].double()
        self.total[key] = self.total[key] + partial if key in self.total else partial
        self.partial[key].zero_()
        self.calls[key] = 0

    def result(self) -> dict:
        for key in self.partial:
            if self.calls[key]:
                self._fold(key)
        return {key: self.total[key] for key in self.partial}


def _gram_hook(sums: _GramSums, key: str) -> Callable:
    def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        features = inputs[0].detach()
        # Inside a bf16 autocast forward, autocast would run this product in bf16 too.
        with torch.autocast(features.device.type, enabled=False):
            sums.add(key, features.reshape(-1, features.shape[-1]).float())  # (all tokens of the call, in)

    return hook


def collect_grams(model: nn.Module, batches: Iterable, forward: Callable | None = None,
                  modules: Iterable | None = None) -> dict:
    """Gram matrices G = XᵀX of the inputs X of every nn.Linear (or of the given modules).

    X holds every token of every batch (all leading dimensions flattened), accumulated through
    forward hooks while ``forward(model, batch)`` (default ``model(batch)``) runs under no_grad;
    the model's train/eval mode is left as it is. The result (float64) is keyed by the state-dict
    key of the linear's weight (``"blocks.0.attn.v.qkv.weight"``), as ``regmean`` and
    ``merge_modalities(..., "regmean")`` expect. A linear that never runs has no entry — in a
    modality-specific model, an expert that no batch reaches. The hooks are removed afterwards,
    also when forward raises. Precision: see `_GramSums`.
    """
    forward = forward or (lambda model, batch: model(batch))
    sums = _GramSums()
    handles = [module.register_forward_hook(_gram_hook(sums, f"{name}.weight" if name else "weight"))
               for name, module in _named_linears(model, modules).items()]
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return sums.result()


# ---------------------------------------------------------------------------------------------
# Part 2: multimodal merging (Sec. 4.1). Each method is one small function from the experts of
# one sublayer — a dict modality → tensor, in the order v, l, vl — to the maa tensor; its formula
# stands beside the line that computes it. Its options are declared in METHOD_OPTIONS and arrive,
# checked and with their defaults filled in, as keyword-only arguments.
# ---------------------------------------------------------------------------------------------

def merged_key(key: str) -> tuple:
    """The maa key of a state-dict key and its modality: 'a.v.b' → ('a.b', 'v'); 'a.b' → ('a.b', None)."""
    parts = key.split(".")
    found = [i for i, part in enumerate(parts) if part in MODALITIES]
    if not found:
        return key, None
    if len(found) > 1:
        raise ValueError(f"key {key!r}: more than one modality segment ({', '.join(MODALITIES)})")
    i = found[0]
    return ".".join(parts[:i] + parts[i + 1:]), parts[i]


def _group_experts(state_dict: StateDict) -> dict:
    """maa key → {modality: expert key}, modalities in the order v, l, vl."""
    groups = {}
    for key in state_dict:
        maa_key, modality = merged_key(key)
        if modality is not None:
            groups.setdefault(maa_key, {})[modality] = key
    for maa_key, group in groups.items():
        if maa_key in state_dict:
            raise ValueError(f"key {maa_key!r}: present both as a shared tensor and as modality experts")
        if "v" not in group or "l" not in group:
            raise ValueError(f"key {maa_key!r}: experts {sorted(group)} found, but every merged "
                             f"sublayer needs a vision (v) and a language (l) expert")
        groups[maa_key] = {m: group[m] for m in MODALITIES if m in group}
    return groups


def _seed_tensor(init_state: StateDict, maa_key: str, experts: dict) -> Tensor:
    """W_0 for one maa key, from init_state (the seed checkpoint, keyed as in the maa model)."""
    if maa_key not in init_state:
        raise KeyError(f"key {maa_key!r}: missing from init_state (W_0 must be keyed as in the maa model)")
    w0 = init_state[maa_key]
    _check_tensors(f"key {maa_key!r}", [experts["v"], w0], ["the experts", "init_state"])
    return w0


def _merge_interpolation(maa_key: str, experts: dict, expert_keys: dict, *, alpha: float) -> Tensor:
    dtype = _compute_dtype(experts["v"].dtype)
    # Sec. 4.1: αW_v + (1−α)W_l, computed as W_l + α(W_v − W_l) (torch.lerp): α = 1 returns W_v
    # bit for bit, and equal experts give themselves back. α outside [0, 1] extrapolates.
    merged = torch.lerp(experts["l"].to(dtype), experts["v"].to(dtype), alpha)
    if "vl" in experts:
        # top M layers: ⅔(αW_v + (1−α)W_l) + ⅓W_vl
        merged.lerp_(experts["vl"].to(dtype), 1 / 3)
    return merged.to(experts["v"].dtype)


def _merge_modality_arithmetic(maa_key: str, experts: dict, expert_keys: dict, *, lam: float,
                               init_state: StateDict) -> Tensor:
    w0 = _seed_tensor(init_state, maa_key, experts)
    # Sec. 4.1: W_0 + λ Σ_m τ_m, modality vectors τ_m = W_m − W_0 over the modalities present
    return _apply_task_vectors(w0, list(experts.values()), lam)


def _merge_regmean(maa_key: str, experts: dict, expert_keys: dict, *, grams: Mapping[str, Tensor],
                   gamma: float) -> Tensor:
    # Sec. 4.1: RegMean solves the linear weights and "evenly interpolates" the rest.
    if experts["v"].dim() != 2:
        return _mean(list(experts.values()))
    # A linear expert without its Gram matrix is an error, not a silent average: it would mean
    # the Grams were collected with a forward that never reached that expert.
    expert_grams = [_gram(grams, expert_keys[m], experts[m], "grams") for m in experts]
    return _regmean_linear(maa_key, list(experts.values()), expert_grams, gamma)


def _merge_ties(maa_key: str, experts: dict, expert_keys: dict, *, density: float, lam: float,
                init_state: StateDict) -> Tensor:
    w0 = _seed_tensor(init_state, maa_key, experts)
    # TIES: W_0 + λ·mean_{m: sign(τ̂_m) = elected}(τ̂_m), τ̂_m = τ_m trimmed to its top density
    return _ties_tensor(w0, list(experts.values()), density, lam)


def _merge_dare(maa_key: str, experts: dict, expert_keys: dict, *, p: float, lam: float, seed: int,
                init_state: StateDict) -> Tensor:
    w0 = _seed_tensor(init_state, maa_key, experts)
    # DARE: W_0 + λ Σ_m (mask_m ⊙ τ_m)/(1−p), each entry of mask_m kept with probability 1−p
    return _dare_tensor(maa_key, w0, list(experts.values()), p, lam, seed)


_MERGERS = {
    "interpolation": _merge_interpolation,
    "modality_arithmetic": _merge_modality_arithmetic,
    "regmean": _merge_regmean,
    "ties": _merge_ties,
    "dare": _merge_dare,
}
METHODS = tuple(_MERGERS)

REQUIRED = "required"  # an option without a default: the caller must give it
# Each method's options, name → default (or REQUIRED), in the order the errors list them.
METHOD_OPTIONS = {
    "interpolation": {"alpha": REQUIRED},  # αW_v + (1−α)W_l (⅔ of it + ⅓W_vl where vl exists)
    "modality_arithmetic": {"lam": REQUIRED, "init_state": REQUIRED},  # W_0 + λ Σ_m τ_m
    "regmean": {"grams": REQUIRED, "gamma": 1.0},  # (Σ_m G̃_m)⁻¹ Σ_m G̃_m W_mᵀ, G̃ = γG+(1−γ)diag G
    "ties": {"density": REQUIRED, "lam": REQUIRED, "init_state": REQUIRED},  # W_0 + λ·TIES(τ_m)
    "dare": {"p": REQUIRED, "lam": REQUIRED, "seed": REQUIRED,  # W_0 + λ Σ_m mask_m ⊙ τ_m/(1−p)
             "init_state": REQUIRED},
}


def _method_options(kind: str, method: str, options: Mapping, declared: Mapping) -> dict:
    """The options of one method (kind "method": METHOD_OPTIONS; "technique": TECHNIQUE_OPTIONS)
    checked against its declaration, with the defaults of those not given filled in."""
    if method not in declared:
        raise ValueError(f"unknown {kind} {method!r}; valid {kind}s: {', '.join(declared)}")
    defaults = declared[method]
    valid = ", ".join(defaults) or "none"
    for name, value in options.items():
        if name not in defaults:
            raise ValueError(f"unknown option {name!r} for {kind} {method!r}; valid options: {valid}")
        _check_option(name, value)
    for name, default in defaults.items():
        if default is REQUIRED and name not in options:
            raise ValueError(f"{kind} {method!r} needs option {name!r} (options: {valid})")
    return {**defaults, **options}


def merge_modalities(state_dict: StateDict, method: str, **options) -> dict:
    """Merge the modality experts of an msa state dict into a state dict of the maa model (Sec. 4.1).

    method and its options:
      "interpolation", alpha=            αW_v + (1−α)W_l; ⅔(αW_v + (1−α)W_l) + ⅓W_vl where vl exists
      "modality_arithmetic", lam=, init_state=
                                         W_0 + λ Σ_m (W_m − W_0), W_0 = init_state[maa key]
      "regmean", grams=, gamma=1.0       RegMean over the experts; grams keyed by expert key
                                         (grams["blocks.3.attn.v.qkv.weight"]) as collect_grams
                                         on the msa model gives them; other tensors averaged
      "ties", density=, lam=, init_state=
      "dare", p=, lam=, seed=, init_state=

    Keys without a modality segment are copied (integer buffers among them too); expert tensors
    must be floating point. The result is keyed as in the maa model and loads with strict=True.
    """
    options = _method_options("method", method, options, METHOD_OPTIONS)
    merge = _MERGERS[method]
    groups = _group_experts(state_dict)
    for key, tensor in state_dict.items():
        if merged_key(key)[1] is None and tensor.is_floating_point() and not _all_finite(tensor):
            raise ValueError(f"key {key!r}: holds NaN or Inf")
    for maa_key, expert_keys in groups.items():
        keys = list(expert_keys.values())
        _check_tensors(f"key {maa_key!r}", [state_dict[k] for k in keys], keys)

    merged = {}
    for key, tensor in state_dict.items():
        maa_key, modality = merged_key(key)
        if modality is None:
            merged[key] = tensor.clone()  # Sec. 4: "we do not merge the embedding layers"
        elif maa_key not in merged:
            expert_keys = groups[maa_key]
            experts = {m: state_dict[k] for m, k in expert_keys.items()}
            merged[maa_key] = _checked_result(maa_key, merge(maa_key, experts, expert_keys, **options))
    return merged


def modality_weights(state_dict: StateDict, a: str = "v", b: str = "l") -> tuple:
    """The experts a and b of one checkpoint as two state dicts keyed by the maa key.

    Only keys where both experts exist are kept (the mergeable weights: Sec. 7 leaves out the
    embeddings), so ``tssd(*modality_weights(sd))`` measures the vision–language distance of
    Table 5. The tensors are the checkpoint's own, not copies.
    """
    for modality in (a, b):
        if modality not in MODALITIES:
            raise ValueError(f"unknown modality {modality!r}; valid: {', '.join(MODALITIES)}")
    if a == b:
        raise ValueError(f"modality_weights needs two different modalities, got {a!r} twice")
    weights_a, weights_b = {}, {}
    for maa_key, expert_keys in _group_experts(state_dict).items():
        if a in expert_keys and b in expert_keys:
            weights_a[maa_key] = state_dict[expert_keys[a]]
            weights_b[maa_key] = state_dict[expert_keys[b]]
    if not weights_a:
        raise ValueError(f"no key has both a {a!r} and a {b!r} expert")
    return weights_a, weights_b


def modality_vectors(state_dict: StateDict, init_state: StateDict, a: str = "v", b: str = "l") -> tuple:
    """The modality vectors τ_a = W_a − W_0 and τ_b = W_b − W_0 (Sec. 4.1) as two state dicts keyed by the maa
    key, for the keys of `modality_weights`; W_0 = init_state[maa key], the weights both experts started from
    (the seed checkpoint, or the initial maa / ViT weights). Distances between them compare what each expert
    learned: their sign conflicts are what TIES resolves. New float32 tensors."""
    weights_a, weights_b = modality_weights(state_dict, a, b)
    tau_a, tau_b = {}, {}
    for key in weights_a:
        w0 = _seed_tensor(init_state, key, {"v": weights_a[key]}).float()
        tau_a[key], tau_b[key] = weights_a[key].float() - w0, weights_b[key].float() - w0
    return tau_a, tau_b


# ---------------------------------------------------------------------------------------------
# Part 3: distances between two weight vectors (Sec. 7, Table 5). Two tensors, or two state
# dicts flattened and concatenated over their sorted keys (a key in only one of them is an error).
# Every metric streams the pairs chunk by chunk in float64 and never builds the concatenation.
# ---------------------------------------------------------------------------------------------

def _weight_pairs(a, b) -> list:
    """[(x, y)] for two tensors; one pair per sorted key for two state dicts; all checked."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        labelled = [("tensors", a, b)]
    elif isinstance(a, Mapping) and isinstance(b, Mapping):
        _check_same_keys([a, b], ["the first state dict", "the second state dict"])
        labelled = [(f"key {key!r}", a[key], b[key]) for key in sorted(a)]
    else:
        raise TypeError(f"give two tensors or two state dicts, got {type(a).__name__} and {type(b).__name__}")
    for where, x, y in labelled:
        # dtypes may differ (a bf16 and a float32 checkpoint): everything becomes float64 anyway
        _check_tensors(where, [x, y], ["the first", "the second"], same_dtype=False)
    if sum(x.numel() for _, x, _ in labelled) == 0:
        raise ValueError("the weight vectors are empty")
    return [(x, y) for _, x, y in labelled]


def _chunks(pairs: list):
    """(x, y) as float64 1-D chunks of at most _CHUNK entries, pair after pair."""
    for x, y in pairs:
        for x_chunk, y_chunk in zip(x.reshape(-1).split(_CHUNK), y.reshape(-1).split(_CHUNK)):
            yield x_chunk.to(torch.float64), y_chunk.to(x_chunk.device, torch.float64)


def l2_distance(a, b) -> float:
    """Sec. 7: ‖x − y‖₂ = sqrt(Σ_i (x_i − y_i)²)."""
    total = 0.0
    for x, y in _chunks(_weight_pairs(a, b)):
        total += torch.sum((x - y) ** 2).item()
    return math.sqrt(total)


def cosine_dissimilarity(a, b) -> float:
    """Sec. 7: 1 − x·y / (‖x‖ ‖y‖). Undefined (an error) when either vector is all zeros."""
    dot, x_norm2, y_norm2 = 0.0, 0.0, 0.0
    for x, y in _chunks(_weight_pairs(a, b)):
        dot += torch.dot(x, y).item()
        x_norm2 += torch.dot(x, x).item()
        y_norm2 += torch.dot(y, y).item()
    if x_norm2 == 0 or y_norm2 == 0:
        raise ValueError("cosine dissimilarity is undefined for an all-zero weight vector")
    return 1 - dot / math.sqrt(x_norm2 * y_norm2)


def _sign_agreement(x: Tensor, y: Tensor) -> tuple:
    """(Σ_i |x_i + y_i| / (|x_i| + |y_i|) over the positions where x_i, y_i are not both zero,
    the number of those positions)."""
    denominator = x.abs() + y.abs()
    nonzero = denominator > 0
    # 0/0 gives NaN where both are zero; where() drops it, the callers decide what such a position means
    agreement = torch.where(nonzero, (x + y).abs() / denominator, 0.0)
    return agreement.sum().item(), int(nonzero.sum())


def ssd(a, b) -> float:
    """Soft sign dissimilarity, Eq. 1: SSD(x, y) = 1 − (1/L) Σ_i |x_i + y_i| / (|x_i| + |y_i|).

    A position where x_i = y_i = 0 is 0/0 in Eq. 1; we count it as similarity 1 (two zeros agree;
    merging them changes nothing), consistent with TSSD, which leaves such positions out.
    """
    agreement, length = 0.0, 0
    for x, y in _chunks(_weight_pairs(a, b)):
        chunk_agreement, nonzero = _sign_agreement(x, y)
        agreement += chunk_agreement + (x.numel() - nonzero)  # both zero: similarity 1
        length += x.numel()
    return 1 - agreement / length


def _kth_smallest_magnitude(tensors: Sequence[Tensor], k: int) -> float:
    """The k-th smallest |entry| (k counted from 1) over all the tensors together, exactly.

    Radix selection on the float bit patterns: non-negative IEEE floats order like their bits read
    as integers, so the answer is found one 16-bit digit at a time — count the digits in a 65536-bin
    histogram, walk the cumulative counts to the bin holding the k-th entry, then repeat on the
    next digit among the entries sharing that prefix. That is 2 streamed passes for float32 and
    lower (4 for float64), with memory bounded by one chunk; torch.kthvalue would need a flattened
    copy of the whole model plus its own working copy.
    """
    wide = any(t.dtype == torch.float64 for t in tensors)
    float_type, int_type, width = (torch.float64, torch.int64, 64) if wide else (torch.float32, torch.int32, 32)
    prefix = 0
    for shift in range(width - 16, -1, -16):
        counts = torch.zeros(1 << 16, dtype=torch.int64)
        for tensor in tensors:
            for chunk in tensor.reshape(-1).split(_CHUNK):
                bits = chunk.to(float_type).abs().view(int_type).long()
                if shift + 16 < width:  # after the first digit, only entries with the prefix so far
                    bits = bits[(bits >> (shift + 16)) == prefix]
                counts += torch.bincount((bits >> shift) & 0xFFFF, minlength=1 << 16).cpu()
        cumulative = counts.cumsum(0)
        digit = int(torch.searchsorted(cumulative, torch.tensor(k)))  # first bin reaching k
        k -= int(cumulative[digit - 1]) if digit else 0
        prefix = (prefix << 16) | digit
    return torch.tensor(prefix).to(int_type).view(float_type).item()


def tssd(a, b, k: float = 0.5) -> float:
    """Truncated soft sign dissimilarity (Sec. 7): TIES' trimming, then SSD.

    In each vector separately, the int(k·L) smallest-magnitude entries are set to zero (entries tied
    with the largest of them too); positions where both vectors are now zero are left out ("merging
    two zeros does not affect the merging results"); SSD is taken over the remaining positions. The
    paper uses k = 50%. If nothing remains, the vectors are taken to agree fully: 0.
    """
    _check_option("k", k)
    pairs = _weight_pairs(a, b)
    truncated = int(k * sum(x.numel() for x, _ in pairs))
    x_cut = _kth_smallest_magnitude([x for x, _ in pairs], truncated) if truncated else -1.0
    y_cut = _kth_smallest_magnitude([y for _, y in pairs], truncated) if truncated else -1.0
    agreement, length = 0.0, 0
    for x, y in _chunks(pairs):
        x = torch.where(x.abs() <= x_cut, 0.0, x)
        y = torch.where(y.abs() <= y_cut, 0.0, y)
        chunk_agreement, nonzero = _sign_agreement(x, y)  # both-zero positions left out
        agreement += chunk_agreement
        length += nonzero
    return 1 - agreement / length if length else 0.0


# ---------------------------------------------------------------------------------------------
# Part 5: merging over time (TIME; Dziadzio et al., "How to Merge Your Multimodal Models Over
# Time?", CVPR 2025, arXiv 2412.06712). Experts θ^s_1, θ^s_2, … arrive one task after another;
# at each task t, init chooses the weights θ^i_t the next expert starts from, deploy the weights
# θ^o_t that are shipped. Both are plain choices from a dict of small functions; the merging
# technique M is any generic method of part 1, wrapped to one signature.
# ---------------------------------------------------------------------------------------------

def _choice(kind: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid {kind} options: {', '.join(valid)}")
    return value


# Recency schedules for the offline merge ("all") over members i = 1..n, oldest first; each is
# normalized to sum to 1 by recency_weights, and reverse_<name> favours the oldest instead.
_RECENCY = {
    "uniform": lambda i: 1.0,
    "linear": lambda i: float(i),  # ∝ i
    "sqrt": lambda i: math.sqrt(i),  # ∝ √i
    "quadratic": lambda i: float(i ** 2),  # ∝ i²
    "cubic": lambda i: float(i ** 3),  # ∝ i³
    "exp": lambda i: 2.0 ** (i - 1),  # ∝ 2^(i−1)
    "log": lambda i: math.log(i + 1),  # ∝ ln(i+1)
}
SCHEDULES = (*_RECENCY, *(f"reverse_{name}" for name in _RECENCY))


def recency_weights(schedule: str, n: int) -> list:
    """The n weights of a recency schedule, oldest member first, normalized to sum to 1.

    E.g. recency_weights("linear", 5) = (1, 2, 3, 4, 5)/15; "reverse_linear" gives (5, 4, 3, 2, 1)/15.
    """
    _choice("schedule", schedule, SCHEDULES)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"recency_weights needs a positive number of members, got {n!r}")
    reverse = schedule.startswith("reverse_")
    raw = [_RECENCY[schedule.removeprefix("reverse_")](i) for i in range(1, n + 1)]
    total = sum(raw)
    weights = [r / total for r in raw]  # w_i = r_i / Σ_j r_j
    return weights[::-1] if reverse else weights


# Each technique as M(θ_0, members, weights, step, **options), its options declared in
# TECHNIQUE_OPTIONS. weights (summing to 1) weigh the members of interpolation only: task-vector
# techniques take θ_0 as their anchor and λ as their scale, as in the official code. step is the
# EMA step t (0 for a one-shot merge); only DARE uses it, so that every fold draws fresh masks.
def _time_interpolation(base, members, weights, step):
    return interpolate(members, weights)  # Σ_i w_i θ_i


def _time_task_arithmetic(base, members, weights, step, *, lam):
    return task_arithmetic(base, members, lam)  # θ_0 + λ Σ_i (θ_i − θ_0)


def _time_ties(base, members, weights, step, *, density, lam):
    return ties(base, members, density, lam)  # θ_0 + λ·(disjoint mean of the trimmed θ_i − θ_0)


def _time_dare(base, members, weights, step, *, p, lam, seed):
    # A fixed seed would draw the same masks at every fold of the running merge.
    return dare(base, members, p, lam, seed + step)  # θ_0 + λ Σ_i mask_i ⊙ (θ_i − θ_0)/(1−p)


def _time_magmax(base, members, weights, step, *, lam):
    return magmax(base, members, lam)  # θ_0 + λ τ_max


_TECHNIQUES = {
    "interpolation": _time_interpolation,
    "task_arithmetic": _time_task_arithmetic,
    "ties": _time_ties,
    "dare": _time_dare,
    "magmax": _time_magmax,
}
TECHNIQUES = tuple(_TECHNIQUES)
# Each technique's options, name → default (or REQUIRED), as METHOD_OPTIONS for merge_modalities.
TECHNIQUE_OPTIONS = {
    "interpolation": {},  # Σ_i w_i θ_i
    "task_arithmetic": {"lam": REQUIRED},  # θ_0 + λ Σ_i τ_i, τ_i = θ_i − θ_0
    "ties": {"density": REQUIRED, "lam": REQUIRED},  # θ_0 + λ·TIES(τ_i)
    "dare": {"p": REQUIRED, "lam": REQUIRED, "seed": REQUIRED},  # θ_0 + λ Σ_i mask_i ⊙ τ_i/(1−p)
    "magmax": {"lam": 1.0},  # θ_0 + λ τ_max
}

# What each init/deploy choice hands over, or None for "θ_0" (before any expert exists). The same
# four quantities serve both phases; only the moment differs (init before task t is trained,
# deploy after its expert is stored), so `ft` is θ^s_{t−1} at init and θ^s_t at deploy.
_CHOICES = {
    "zs": lambda tm: tm.base,  # θ_0
    "ft": lambda tm: tm.latest,  # the newest stored expert
    "all": lambda tm: tm.offline_merge(),  # one-shot merge of the stored experts
    "ema": lambda tm: tm.running,  # the running merge E_t
}
INITS = ("zs", "ft", "all", "ema")
DEPLOYS = ("ft", "all", "ema")


class TemporalMerge:
    """Init, store and deploy for merging over time (TIME).

    Reference: S. Dziadzio et al., "How to Merge Your Multimodal Models Over Time?", CVPR 2025,
    arXiv 2412.06712. Official code:
    github.com/ExplainableML/fomo_in_flux (read at commit 3e123d9).

    The loop, per task t = 1..T:

        θ^i_t = tm.init_weights()     init: the weights the expert of task t starts from
        θ^s_t = train(θ^i_t, task t)  (not here: merge.py knows nothing of training)
        tm.store(θ^s_t)               store, and fold θ^s_t into the running merge
        θ^o_t = tm.deploy_weights()   deploy: the weights evaluated and shipped

    init ∈ {zs: θ_0, ft: θ^s_{t−1}, all: one-shot merge of θ^s_1..θ^s_{t−1}, ema: E_{t−1}};
    deploy ∈ {ft: θ^s_t, all: one-shot merge of θ^s_1..θ^s_t, ema: E_t}. Before any expert is stored
    every choice is θ_0. The running merge (EMA) is E_t = M([θ^s_t, E_{t−1}]) with weight w =
    ema_weight on the newest, E_0 = θ_0 (or, with ema_from_base=False, E_1 = θ^s_1); under
    interpolation E_t = (1−w)^t θ_0 + Σ_k w(1−w)^{t−k} θ^s_k. "all" weighs its members by
    recency_weights(schedule, n), θ_0 a member only with all_with_base. Continual fine-tuning is
    ft/ft, offline merging zs/all, "Best-in-TIME" ema/ema.

    technique is one of TECHNIQUES, with the options of its generic method of part 1, declared in
    TECHNIQUE_OPTIONS: none for interpolation, lam= for task_arithmetic, density=, lam= for ties,
    p=, lam=, seed= for dare, lam= (default 1.0) for magmax. Every floating-point key is merged; other keys (integer
    buffers) are copied from the newest member. Memory: θ_0 (a copy) plus only what the chosen
    init and deploy need — E_t alone for ema (O(1) in t), the newest expert for ft, every expert
    for all. Weights handed out are fresh copies: training them in place changes nothing here.

    Implementation notes, matched to the official release:
    - ``ema`` is the official ``unrolled`` choice: a left fold over the buffer [θ_0, θ^s_1, …],
      newest first, running ← M([newest, running], anchor θ_0). The official code refolds the
      whole buffer at every step (memory O(t)); we keep E_t and fold once per store (O(1)), the
      same result for every deterministic technique. Task arithmetic then reads
      E_t − θ_0 = λ[(θ^s_t − θ_0) + (E_{t−1} − θ_0)], which at λ = 0.5 is the interpolation EMA.
    - ``all`` with one member (one expert, θ_0 excluded) returns that expert unmerged, as the
      official code does. Its schedules (there also ``fifth`` and ``tenth``, not here) weigh
      interpolation only; the official code silently ignores them for task-vector techniques,
      here a non-uniform schedule or an ema_weight other than 0.5 with such a technique is an error.
    - TIES: the official percentile is the fraction *dropped* over the whole flattened model;
      ``ties`` here keeps the fraction ``density`` per tensor. DARE: the official ``dare_ties``
      adds TIES' sign election and draws masks from the global RNG; ``dare`` here is plain DARE
      with seed + t at EMA step t (a one-shot merge uses the seed as given).
    - MagMax ties: the official code keeps the first member on equal magnitude (FusionBench the
      later); so does ``magmax`` here. In the EMA the first member is the newest expert.
    """

    def __init__(self, base: StateDict, init: str = "ema", deploy: str = "ema",
                 technique: str = "interpolation", ema_weight: float = 0.5, ema_from_base: bool = True,
                 schedule: str = "uniform", all_with_base: bool = False, **technique_options):
        self.init = _choice("init", init, INITS)
        self.deploy = _choice("deploy", deploy, DEPLOYS)
        options = _method_options("technique", technique, technique_options, TECHNIQUE_OPTIONS)
        _check_option("ema_weight", ema_weight)
        self.schedule = _choice("schedule", schedule, SCHEDULES)
        if technique != "interpolation" and (schedule != "uniform" or ema_weight != 0.5):
            raise ValueError(f"schedule and ema_weight weigh the members of interpolation only; "
                             f"technique {technique!r} takes λ (lam=) and no per-member weights "
                             f"(got schedule={schedule!r}, ema_weight={ema_weight})")
        self.technique, self.options = technique, options
        self.ema_weight, self.ema_from_base, self.all_with_base = ema_weight, ema_from_base, all_with_base
        if not isinstance(base, Mapping) or not any(t.is_floating_point() for t in base.values()):
            raise ValueError("base (θ_0) must be a state dict with at least one floating-point tensor")
        # θ_0 is copied: a caller who trains the model behind base in place must not move it.
        self.base = {key: tensor.detach().clone() for key, tensor in base.items()}
        for key, tensor in self.base.items():
            if tensor.is_floating_point() and not _all_finite(tensor):
                raise ValueError(f"key {key!r}: base (θ_0) holds NaN or Inf")
        self.float_keys = [key for key, tensor in self.base.items() if tensor.is_floating_point()]
        self.t = 0  # experts stored so far
        needed = {self.init, self.deploy}
        self.experts = [] if "all" in needed else None  # θ^s_1..θ^s_t, kept only for all
        self.keeps_latest = "ft" in needed
        self.keeps_ema = "ema" in needed
        self.latest = None  # θ^s_t (the same object as experts[-1] when both are kept)
        self.running = None  # E_t; None stands for E_0 = θ_0

    def init_weights(self) -> dict:
        """θ^i_t: TIME's *initialization phase*, the weights the next expert starts training from
        (not a model's random initialization). θ_0 before any expert is stored."""
        return self._hand_over(self.init)

    def deploy_weights(self) -> dict:
        """θ^o_t: the weights evaluated and shipped after the newest expert. θ_0 before any expert."""
        return self._hand_over(self.deploy)

    def store(self, expert: StateDict) -> None:
        """Append θ^s_t: keep it if ft or all needs it, and fold it into E_t if ema does."""
        name = f"expert {self.t + 1}"
        _check_like_base(self.base, expert, name)
        expert = {key: tensor.detach().clone() for key, tensor in expert.items()}
        self.t += 1
        if self.experts is not None:
            self.experts.append(expert)
        if self.keeps_latest:
            self.latest = expert
        if self.keeps_ema:
            self.running = self._fold(expert)

    def offline_merge(self):
        """One-shot merge of θ^s_1..θ^s_t ("all"), weighted by the schedule; None before any expert."""
        if not self.experts:
            return None
        members = [self.base, *self.experts] if self.all_with_base else self.experts
        if len(members) == 1:
            return members[0]  # nothing to merge (the official code returns the expert as is)
        weights = recency_weights(self.schedule, len(members))  # oldest first
        return self._merge(members, weights, step=0, newest=members[-1])

    def _fold(self, expert: dict) -> dict:
        if self.running is None and not self.ema_from_base:
            return expert  # E_1 = θ^s_1
        previous = self.base if self.running is None else self.running  # E_{t−1}, E_0 = θ_0
        w = self.ema_weight
        # E_t = M([θ^s_t, E_{t−1}]): interpolation w θ^s_t + (1−w) E_{t−1}; task arithmetic
        # θ_0 + λ[(θ^s_t − θ_0) + (E_{t−1} − θ_0)]; DARE with seed + t
        return self._merge([expert, previous], [w, 1 - w], step=self.t, newest=expert)

    def _merge(self, members: list, weights: list, step: int, newest: StateDict) -> dict:
        """M over the floating-point keys; the other keys copied from the newest member."""
        floats = [{key: member[key] for key in self.float_keys} for member in members]
        anchor = {key: self.base[key] for key in self.float_keys}
        merged = _TECHNIQUES[self.technique](anchor, floats, weights, step, **self.options)
        return {key: merged[key] if key in merged else newest[key].clone() for key in self.base}

    def _hand_over(self, choice: str) -> dict:
        weights = _CHOICES[choice](self)
        weights = self.base if weights is None else weights
        return {key: tensor.clone() for key, tensor in weights.items()}


def _check_like_base(base: StateDict, state_dict: StateDict, name: str) -> None:
    """state_dict has θ_0's keys, and per key its shape and dtype (finite where floating point)."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{name} must be a state dict, got {type(state_dict).__name__}")
    names = ["base (θ_0)", name]
    _check_same_keys([base, state_dict], names)
    for key, tensor in base.items():
        other = state_dict[key]
        if tensor.is_floating_point():
            _check_tensors(f"key {key!r}", [tensor, other], names)
        elif other.shape != tensor.shape or other.dtype != tensor.dtype:
            raise ValueError(f"key {key!r}: {tensor.dtype} {tuple(tensor.shape)} in base (θ_0) "
                             f"vs {other.dtype} {tuple(other.shape)} in {name}")
