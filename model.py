"""The VLMo-style multiway vision-language transformer of Sung et al. (2023), Sec. 3, Fig. 1-2.

One ViT block, five ways of sharing it between modalities. Read this first:

    Every block has four sublayers -- norm1, attn, norm2, mlp -- exactly as in timm's ViT.
    A sublayer is either SHARED (one module used by every modality) or MODALITY-SPECIFIC
    (an nn.ModuleDict of experts named `v` (vision), `l` (language) and, in the top M
    layers only, `vl` (vision-language fusion)).

The variant decides which sublayers are modality-specific (Fig. 1, "architectures"):

    msa          modality-specific architecture: attn, mlp and norms all have experts
    custom_attn  only attention has experts       (shared-weight, Sec. 3)
    custom_ffn   only the FFN (mlp) has experts
    custom_ln    only the LayerNorms have experts
    maa          modality-agnostic: one set of weights for everything

Because an expert is a child named v/l/vl, a state-dict key reads `blocks.3.attn.v.qkv.weight`,
and deleting the modality segment gives the key of the same parameter in the maa model,
`blocks.3.attn.qkv.weight` (which is also timm's key). merge.py relies on this convention
(without importing this file): merging = collapsing the experts of each key onto that key.
No other module is named v, l or vl. Embeddings stay modality-specific and are never
merged (Sec. 4): `patch_embed`, `cls_token`, `pos_embed` for images, `word_embed`,
`text_pos_embed` for text, and the VLMo modality-type embedding `modality_embed`.

Two forward routes (Fig. 2b), with N = depth and M = fusion_layers:
    retrieval (ITC):       image -> N layers of `v` experts;  text -> N layers of `l` experts
    fusion (ITM/MLM/VQA):  first N-M layers per modality, then [image; text] through the
                           top M layers with the `vl` experts.
The lower N-M layers are common to both routes, so `lower()` is computed once and reused.
"""
import math
from dataclasses import dataclass
from typing import NamedTuple

import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

VARIANTS = ("msa", "maa", "custom_attn", "custom_ffn", "custom_ln")
TASKS = ("pretrain", "retrieval", "vqa", "nlvr2", "cls", "seg")
MODALITIES = ("v", "l", "vl")
# Which sublayers of a block hold modality experts, per variant (Fig. 1).
CUSTOM_PARTS = {
    "msa": {"attn", "mlp", "norm"},
    "custom_attn": {"attn"},
    "custom_ffn": {"mlp"},
    "custom_ln": {"norm"},
    "maa": set(),
}
# Backbones (Dosovitskiy et al.): width and heads; all are 12 layers, patch 16, MLP ratio 4.
ARCHS = {
    "vit_tiny": dict(dim=192, heads=3),
    "vit_small": dict(dim=384, heads=6),
    "vit_base": dict(dim=768, heads=12),
}


@dataclass
class ModelConfig:
    dim: int = 192
    heads: int = 3
    depth: int = 12              # N (Sec. 3: N = 12)
    fusion_layers: int = 2       # M (Sec. 3: M = 2), the top layers that also have `vl` experts
    mlp_ratio: float = 4.0
    patch_size: int = 16
    image_size: int = 224        # Sec. 5 pre-trains at 224 px
    vocab_size: int = 30522      # bert-base-uncased (Sec. 5)
    max_text_len: int = 40       # Sec. 5: "the text input length is 40"
    variant: str = "msa"
    task: str = "pretrain"
    num_answers: int = 3129      # VQA v2 answer vocabulary
    num_classes: int = 1000      # image classification (ImageNet-1k)
    seg_classes: int = 150       # semantic segmentation (ADE20k)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


# ----------------------------------------------------------------------------------------------
# The ViT block (timm's, so timm checkpoints load exactly), made multiway.

# On the CPU, SDPA's flash kernel spends most of a training step in its backward at this project's short
# sequences (17-49 tokens at 32 px): its math kernel (qkᵀ, softmax, ·v as plain ops) trains the tiny maa at
# 188 instead of 148 samples/s (README, "The tiny recipe's wall time"). Long sequences keep SDPA's own choice.
CPU_MATH_UP_TO = 256  # tokens


def attention_kernel(x):
    """The SDPA kernels to allow for a (B, L, D) input: the math kernel for short sequences on the CPU."""
    if x.device.type == "cpu" and x.shape[1] <= CPU_MATH_UP_TO:
        return sdpa_kernel(SDPBackend.MATH)
    return contextlib.nullcontext()


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection, computed by SDPA."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        # x: (B, L, D); mask: (B, L) bool, True = a real token that may be attended to
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        if mask is not None:
            mask = mask[:, None, None, :]  # (B, 1, 1, L): padding keys are hidden from every query
        with attention_kernel(x):
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # softmax(qkᵀ/√d)v, (B, h, L, d)
        return self.proj(rearrange(x, "b h l d -> b l (h d)"))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()  # exact (erf) GELU, as in ViT and BERT
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def multiway(make, experts: tuple):
    """One shared module, or an nn.ModuleDict of experts {v, l[, vl]} each built by `make`."""
    return nn.ModuleDict({m: make() for m in experts}) if experts else make()


def route(sublayer: nn.Module, modality: str) -> nn.Module:
    """The module that processes `modality`: its own expert, or the shared module."""
    return sublayer[modality] if isinstance(sublayer, nn.ModuleDict) else sublayer


class Block(nn.Module):
    """Pre-norm transformer block: x += attn(norm1(x)); x += mlp(norm2(x)), per modality."""

    def __init__(self, cfg: ModelConfig, experts: tuple):
        super().__init__()
        custom = CUSTOM_PARTS[cfg.variant]
        own = lambda part: experts if part in custom else ()  # noqa: E731
        norm = lambda: nn.LayerNorm(cfg.dim, eps=1e-6)  # noqa: E731
        self.norm1 = multiway(norm, own("norm"))
        self.attn = multiway(lambda: Attention(cfg.dim, cfg.heads), own("attn"))
        self.norm2 = multiway(norm, own("norm"))
        self.mlp = multiway(lambda: Mlp(cfg.dim, int(cfg.dim * cfg.mlp_ratio)), own("mlp"))

    def forward(self, x, modality: str, mask=None):
        x = x + route(self.attn, modality)(route(self.norm1, modality)(x), mask)
        return x + route(self.mlp, modality)(route(self.norm2, modality)(x))


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches, linearly embedded (a strided conv, as timm names it)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.dim, cfg.patch_size, cfg.patch_size)

    def forward(self, images):
        return rearrange(self.proj(images), "b d h w -> b (h w) d")  # (B, P, D)


# ----------------------------------------------------------------------------------------------
# Task heads (Sec. 4.2, 5): which ones exist depends on `task`.

def pooler(dim: int) -> nn.Module:
    """BERT/VLMo pooler: tanh(W · h_cls) of the fused sequence's first token."""
    return nn.Sequential(nn.Linear(dim, dim), nn.Tanh())


def classifier(dim_in: int, hidden: int, n_out: int) -> nn.Module:
    """VLMo's two-layer answer head: Linear -> LayerNorm -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, n_out))


def build_heads(model: nn.Module, cfg: ModelConfig) -> None:
    d = cfg.dim
    if cfg.task in ("pretrain", "retrieval"):  # ITC (CLIP-style, learnable temperature)
        model.itc_image_proj = nn.Linear(d, d, bias=False)
        model.itc_text_proj = nn.Linear(d, d, bias=False)
        model.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    if cfg.task in ("pretrain", "vqa", "nlvr2"):
        model.pooler = pooler(d)
    if cfg.task == "pretrain":  # ITM (binary) and MLM (BERT's transform + decoder)
        model.itm_head = nn.Linear(d, 2)
        model.mlm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=1e-6),
                                       nn.Linear(d, cfg.vocab_size))
    if cfg.task == "vqa":  # pooled -> 2D -> answers
        model.vqa_head = classifier(d, 2 * d, cfg.num_answers)
    if cfg.task == "nlvr2":  # two (image, text) pairs, pooled features concatenated
        model.nlvr2_head = classifier(2 * d, 2 * d, 2)
    if cfg.task == "cls":  # BEiT-style: mean of patch tokens, normed, linear
        model.cls_norm = nn.LayerNorm(d, eps=1e-6)
        model.cls_head = nn.Linear(d, cfg.num_classes)
    if cfg.task == "seg":  # light head: per-patch linear classifier, upsampled to pixels
        model.seg_head = nn.Linear(d, cfg.seg_classes)


# ----------------------------------------------------------------------------------------------
# The model.

class Routes(NamedTuple):
    """What `VLTransformer.routes` computes for a batch of (image, text) pairs."""
    image_lower: torch.Tensor   # (B, 1+P, D) after the lower N-M layers (v experts)
    text_lower: torch.Tensor    # (B, L, D) after the lower N-M layers (l experts)
    image: torch.Tensor         # (B, 1+P, D) retrieval route, vision side
    text: torch.Tensor          # (B, L, D) retrieval route, language side
    fused: torch.Tensor         # (B, 1+P+L, D) fusion route (vl experts on top)


class VLTransformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        d, n, m = cfg.dim, cfg.depth, cfg.fusion_layers
        # Vision embeddings (timm names), language embeddings (BERT-like), modality type (VLMo).
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.num_patches, d))
        self.word_embed = nn.Embedding(cfg.vocab_size, d)
        self.text_pos_embed = nn.Parameter(torch.zeros(1, cfg.max_text_len, d))
        self.modality_embed = nn.Parameter(torch.zeros(2, d))  # row 0: image, row 1: text
        # Layer i has experts (v, l) below the fusion layers and (v, l, vl) in the top M.
        self.blocks = nn.ModuleList(Block(cfg, ("v", "l") if i < n - m else MODALITIES) for i in range(n))
        self.norm = multiway(lambda: nn.LayerNorm(d, eps=1e-6),
                             MODALITIES if "norm" in CUSTOM_PARTS[cfg.variant] else ())
        build_heads(self, cfg)
        self.init_weights()

    # -- initialization ---------------------------------------------------------------------
    def init_weights(self):
        """timm/BERT init (trunc-normal 0.02), then every expert copies the `v` expert.

        Sec. 3: "we initialize all the transformers from the same initialization" -- the
        starting point W⁰ that modality arithmetic subtracts is then one tensor per key.
        """
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Conv2d, nn.Embedding)):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        for p in (self.pos_embed, self.text_pos_embed, self.modality_embed):
            nn.init.trunc_normal_(p, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        for mod in self.modules():
            if isinstance(mod, nn.ModuleDict):
                for name in mod:
                    mod[name].load_state_dict(mod["v"].state_dict())

    # -- embeddings ---------------------------------------------------------------------------
    def embed_image(self, images):
        b, c, h, w = images.shape
        s = self.cfg.image_size
        if (c, h, w) != (3, s, s):
            raise ValueError(f"images: expected shape (B, 3, {s}, {s}) for image_size={s}, "
                             f"got {tuple(images.shape)}")
        x = self.patch_embed(images)                                       # (B, P, D)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1)        # (B, 1+P, D)
        return x + self.pos_embed + self.modality_embed[0]

    def embed_text(self, input_ids):
        length = input_ids.shape[1]
        if length > self.cfg.max_text_len:
            raise ValueError(f"input_ids: {length} tokens exceed max_text_len={self.cfg.max_text_len}")
        x = self.word_embed(input_ids)                                     # (B, L, D)
        return x + self.text_pos_embed[:, :length] + self.modality_embed[1]

    # -- the two routes of Fig. 2(b) ------------------------------------------------------------
    def lower(self, x, modality: str, mask=None):
        """The first N-M layers, with `modality`'s experts. Shared by both routes."""
        for block in self.blocks[: self.cfg.depth - self.cfg.fusion_layers]:
            x = block(x, modality, mask)
        return x

    def upper(self, x, modality: str, mask=None):
        """The top M layers and the final norm, with `modality`'s experts (v, l, or vl)."""
        for block in self.blocks[self.cfg.depth - self.cfg.fusion_layers:]:
            x = block(x, modality, mask)
        return route(self.norm, modality)(x)

    def image_lower(self, images):
        """Images through the lower N-M layers of the vision experts. (B, 1+P, D)"""
        return self.lower(self.embed_image(images), "v")

    def text_lower(self, input_ids, attention_mask):
        """Text through the lower N-M layers of the language experts. (B, L, D)"""
        return self.lower(self.embed_text(input_ids), "l", attention_mask.bool())

    def fuse(self, image_lower, text_lower, attention_mask):
        """Fusion route, top half: [image; text] through the M layers with the `vl` experts."""
        x = torch.cat([image_lower, text_lower], dim=1)                   # (B, 1+P+L, D)
        image_mask = attention_mask.new_ones(image_lower.shape[:2])
        mask = torch.cat([image_mask, attention_mask], dim=1).bool()     # (B, 1+P+L)
        return self.upper(x, "vl", mask)

    def routes(self, images, input_ids, attention_mask) -> "Routes":
        """Both routes of Fig. 2b for a batch of pairs, the shared lower layers computed once: every
        expert sees exactly its own modality (images -> v, text -> l, the pair -> vl). Pre-training and
        RegMean's Gram collection both run this; the single-modality encoders below are its halves."""
        image_lower, text_lower = self.image_lower(images), self.text_lower(input_ids, attention_mask)
        return Routes(image_lower, text_lower,
                      image=self.upper(image_lower, "v"),                                   # (B, 1+P, D)
                      text=self.upper(text_lower, "l", attention_mask.bool()),              # (B, L, D)
                      fused=self.fuse(image_lower, text_lower, attention_mask))             # (B, 1+P+L, D)

    def encode_image(self, images):
        """Retrieval route, vision side: all N layers of the vision experts. (B, 1+P, D)"""
        return self.upper(self.image_lower(images), "v")

    def encode_text(self, input_ids, attention_mask):
        """Retrieval route, language side: all N layers of the language experts. (B, L, D)"""
        return self.upper(self.text_lower(input_ids, attention_mask), "l", attention_mask.bool())

    def encode_pair(self, images, input_ids, attention_mask):
        """Fusion route end to end (Fig. 2b right). (B, 1+P+L, D); token 0 is the image [CLS]."""
        return self.fuse(self.image_lower(images), self.text_lower(input_ids, attention_mask), attention_mask)

    # -- heads ----------------------------------------------------------------------------------
    def itc_image(self, image_feats):
        """Unit-norm ITC embedding from the image [CLS] token, in float32 (the similarities need it). (B, D)"""
        return F.normalize(self.itc_image_proj(image_feats[:, 0]).float(), dim=-1)

    def itc_text(self, text_feats):
        """Unit-norm ITC embedding from the text [CLS] token, in float32. (B, D)"""
        return F.normalize(self.itc_text_proj(text_feats[:, 0]).float(), dim=-1)

    def itc_embed(self, image_feats, text_feats):
        return self.itc_image(image_feats), self.itc_text(text_feats)

    def itm_logits(self, fused):
        return self.itm_head(self.pooler(fused[:, 0]))                  # (B, 2)

    def mlm_logits(self, fused, text_len: int):
        return self.mlm_head(fused[:, -text_len:])                     # (B, L, vocab)

    def vqa_logits(self, fused):
        return self.vqa_head(self.pooler(fused[:, 0]))                  # (B, answers)

    def nlvr2_logits(self, fused_left, fused_right):
        pooled = torch.cat([self.pooler(fused_left[:, 0]), self.pooler(fused_right[:, 0])], dim=-1)
        return self.nlvr2_head(pooled)                                  # (B, 2)

    def cls_logits(self, image_feats):
        return self.cls_head(self.cls_norm(image_feats[:, 1:].mean(dim=1)))  # (B, classes)

    def seg_logits(self, image_feats):
        side = self.cfg.image_size // self.cfg.patch_size
        logits = rearrange(self.seg_head(image_feats[:, 1:]), "b (h w) c -> b c h w", h=side)
        return F.interpolate(logits, size=self.cfg.image_size, mode="bilinear", align_corners=False)

    def forward(self, batch: dict):
        """The task's outputs for a collated batch (see data.py for the batch keys)."""
        task, images = self.cfg.task, batch["images"]
        if task == "cls":
            return self.cls_logits(self.encode_image(images))
        if task == "seg":
            return self.seg_logits(self.encode_image(images))
        ids, mask = batch["input_ids"], batch["attention_mask"]
        if task == "vqa":
            return self.vqa_logits(self.encode_pair(images, ids, mask))
        if task == "nlvr2":
            return self.nlvr2_logits(self.encode_pair(images, ids, mask),
                                     self.encode_pair(batch["images2"], ids, mask))
        # pretrain / retrieval: the ITC embeddings of the retrieval route
        return self.itc_embed(self.encode_image(images), self.encode_text(ids, mask))


# ----------------------------------------------------------------------------------------------
# Building, and loading other people's weights.

def check_config(cfg: ModelConfig) -> None:
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}; choose from {', '.join(VARIANTS)}")
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; choose from {', '.join(TASKS)}")
    if cfg.image_size % cfg.patch_size:
        raise ValueError(f"image_size={cfg.image_size} is not a multiple of patch_size={cfg.patch_size}")
    if not 0 < cfg.fusion_layers <= cfg.depth:
        raise ValueError(f"fusion_layers={cfg.fusion_layers} must be in 1..depth={cfg.depth}")
    if cfg.dim % cfg.heads:
        raise ValueError(f"dim={cfg.dim} is not divisible by heads={cfg.heads}")


def build_model(arch: str, variant: str, task: str = "pretrain", vocab_size: int = 30522,
                num_answers: int = 3129, image_size: int = 224, **overrides) -> VLTransformer:
    """`build_model("vit_tiny", "msa")`; overrides (depth=4, patch_size=8, ...) set ModelConfig fields."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHS)}")
    fields = set(ModelConfig.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"unknown model option(s) {', '.join(unknown)}; valid: {', '.join(sorted(fields))}")
    cfg = ModelConfig(**{**ARCHS[arch], **overrides}, variant=variant, task=task, vocab_size=vocab_size,
                      num_answers=num_answers, image_size=image_size)
    return VLTransformer(cfg)


def shared_key(key: str) -> str:
    """`blocks.3.attn.v.qkv.weight` -> `blocks.3.attn.qkv.weight` (the maa / timm key).

    The naming convention of the module docstring, the same rule as merge.merged_key: delete the
    one modality segment; a key with none is its own shared key, one with two is an error.
    """
    parts = key.split(".")
    kept = [part for part in parts if part not in MODALITIES]
    if len(parts) - len(kept) > 1:
        raise ValueError(f"key {key!r}: more than one modality segment ({', '.join(MODALITIES)})")
    return ".".join(kept)


def strip_prefixes(state_dict: dict) -> dict:
    """Undo the wrappers people save through: DDP's `module.` and torch.compile's `_orig_mod.`."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        out[key] = value
    return out


def resize_pos_embed(pos_embed, num_patches: int):
    """Bicubically resample the patch grid of a (1, 1+P, D) position embedding to P' patches."""
    old = math.isqrt(pos_embed.shape[1] - 1)
    new = math.isqrt(num_patches)
    if old == new:
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = rearrange(grid, "1 (h w) d -> 1 d h w", h=old)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    return torch.cat([cls, rearrange(grid, "1 d h w -> 1 (h w) d").to(pos_embed.dtype)], dim=1)


# The top-level names of a state dict's keys, by what they are. A key belongs by its FIRST component,
# compared exactly (a prefix test would let "cls_" match the backbone's "cls_token").
BACKBONE = ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")       # what a timm ViT provides
HEADS = {  # task -> the head modules build_heads makes for it
    "pretrain": ("itc_image_proj", "itc_text_proj", "logit_scale", "pooler", "itm_head", "mlm_head"),
    "retrieval": ("itc_image_proj", "itc_text_proj", "logit_scale"),
    "vqa": ("pooler", "vqa_head"), "nlvr2": ("pooler", "nlvr2_head"),
    "cls": ("cls_norm", "cls_head"), "seg": ("seg_head",),
}


def is_backbone_key(key: str) -> bool:
    """Keys that a timm ViT provides: patch/cls/position embeddings, blocks, final norm."""
    return key.split(".")[0] in BACKBONE


def is_head_key(key: str) -> bool:
    """Keys of a task head (any task's): what one task drops or builds fresh when it starts from another's."""
    return key.split(".")[0] in {name for names in HEADS.values() for name in names}


@torch.no_grad()
def load_vit_weights(model: VLTransformer, state_dict: dict) -> None:
    """Load a timm-format ViT into EVERY expert of every block (Sec. 3: one initialization W⁰).

    The text embeddings and heads keep their values. A classifier `head.*` is ignored; any
    other key the model has no place for, a backbone key the file lacks, or a shape that
    differs (after resizing `pos_embed` to this image size) is an error naming the key.
    """
    vit = {k: v for k, v in strip_prefixes(state_dict).items() if not k.startswith("head.")}
    if "pos_embed" in vit:
        vit["pos_embed"] = resize_pos_embed(vit["pos_embed"], model.cfg.num_patches)
    targets = {k: p for k, p in model.state_dict().items() if is_backbone_key(k)}
    expected = {shared_key(k) for k in targets}
    for key in vit:
        if key not in expected:
            raise KeyError(f"unexpected key {key!r} in the ViT state dict (this model has no place for it)")
    for key, param in targets.items():
        source = vit.get(shared_key(key))
        if source is None:
            raise KeyError(f"missing key {shared_key(key)!r} in the ViT state dict")
        if source.shape != param.shape:
            raise ValueError(f"key {shared_key(key)!r}: shape {tuple(source.shape)} in the ViT state dict "
                             f"vs {tuple(param.shape)} in the model")
        param.copy_(source)


def expand_experts(maa_state: dict, model: nn.Module) -> dict:
    """The seed hand-over (Sec. 4.3): a state dict for `model` in which every expert holds the
    shared weight of the maa checkpoint. Loading it makes the msa model compute exactly what
    the maa model computes. Errors name the key that is missing or mis-shaped."""
    maa_state = strip_prefixes(maa_state)
    out, used = {}, set()
    for key, param in model.state_dict().items():
        source_key = shared_key(key)
        if source_key not in maa_state:
            raise KeyError(f"missing key {source_key!r} in the modality-agnostic state dict (needed by {key!r})")
        source = maa_state[source_key]
        if source.shape != param.shape:
            raise ValueError(f"key {source_key!r}: shape {tuple(source.shape)} in the modality-agnostic "
                             f"state dict vs {tuple(param.shape)} for {key!r}")
        out[key] = source.clone()
        used.add(source_key)
    extra = sorted(set(maa_state) - used)
    if extra:
        raise KeyError(f"unexpected key {extra[0]!r} in the modality-agnostic state dict "
                       f"({len(extra)} unexpected in all)")
    return out
