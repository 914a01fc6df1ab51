"""Pre-training (ITC + ITM + MLM) and fine-tuning of the multiway transformer -- Sec. 4.2-4.3, 5, App. A.

    python train.py --arch vit_tiny --variant msa --steps 1000              # one process (CPU or GPU)
    torchrun --standalone --nproc_per_node 8 train.py --arch vit_base ...    # DDP: NCCL on GPU, gloo on CPU

Pre-training objective (Sec. 5): total = ITC + ITM + 0.25·MLM.
  ITC  contrastive loss on the retrieval route; negatives are gathered from every rank WITH gradients.
  ITM  binary matching on the fusion route; one hard negative text per image and one hard negative
       image per text, sampled in proportion to their ITC similarity (ALBEF / VLMo).
  MLM  15% of the text tokens masked (data.py), predicted from the fusion route.

Seed pre-training (Sec. 4.3) is two ordinary runs, K_seed + K_VL steps in all:
    python train.py --variant maa --steps K_seed --out runs/seed
    python train.py --variant msa --steps K_VL  --init runs/seed/ckpt.pt --out runs/msa_seed
`--init` expands the maa weights into every expert (model.expand_experts).

Fine-tuning: --task vqa|retrieval|nlvr2|cls|seg from a pre-trained (or merged) checkpoint. Only the
parameters the task's route uses are trained, so on vision tasks an msa model fine-tunes just its vision
encoder (Sec. 6.5). A run writes runs/<name>/{args.json, log.jsonl, ckpt.pt, metrics.json}.

Every loss is a method of `Objective`, an nn.Module, so that DDP sees the whole computation in forward.
"""
import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler
from tqdm import tqdm

import data
from model import ARCHS, TASKS, VARIANTS, ModelConfig, VLTransformer, build_model, load_vit_weights, shared_key

# ----------------------------------------------------------------------------------------------
# Losses.

def gather_with_grad(x):
    """All ranks' rows of x, keeping the local slice differentiable (torch.distributed.nn's
    all_gather sends each rank's gradient back to its owner). Returns (rows, offset of ours)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    from torch.distributed.nn.functional import all_gather
    return torch.cat(all_gather(x)), dist.get_rank() * x.shape[0]


def itc_loss(image_emb, text_emb, logit_scale):
    """Symmetric InfoNCE over the global batch: CE(s·I Tᵀ, diag) for images and for texts.

    image_emb, text_emb: (B, D) unit vectors. Returns the loss and the local (B, B) image-to-text
    similarities (detached) that ITM samples its hard negatives from."""
    all_images, offset = gather_with_grad(image_emb)                  # (W·B, D)
    all_texts, _ = gather_with_grad(text_emb)
    scale = logit_scale.clamp(max=math.log(100)).exp()                # CLIP: temperature ≥ 0.01
    labels = offset + torch.arange(image_emb.shape[0], device=image_emb.device)
    logits_i2t = scale * image_emb @ all_texts.T                      # (B, W·B)
    logits_t2i = scale * text_emb @ all_images.T
    loss = (F.cross_entropy(logits_i2t, labels) + F.cross_entropy(logits_t2i, labels)) / 2
    local = logits_i2t[:, offset:offset + image_emb.shape[0]]         # (B, B)
    return loss, local.detach()


def sample_hard_negatives(sim):
    """For each row of a (B, B) similarity matrix, one column ≠ the diagonal, drawn with
    probability softmax over the off-diagonal similarities -- similar-but-wrong pairs are the
    informative negatives (ALBEF / VLMo)."""
    if len(sim) < 2:
        raise ValueError("ITM needs a batch of at least 2 pairs to draw negatives from")
    eye = torch.eye(len(sim), dtype=torch.bool, device=sim.device)
    # a diverged model's NaN similarities become uniform draws, so the NaN surfaces in the loss check
    sim = sim.float().nan_to_num(0.0, 0.0, 0.0)
    weights = sim.masked_fill(eye, float("-inf")).softmax(dim=1)  # (B, B), zero on the diagonal
    return torch.multinomial(weights, 1).squeeze(1)                       # (B,)


def itm_labels(batch_size: int, device=None):
    """Pairs are ordered [positives; image + negative text; negative image + text]."""
    return torch.cat([torch.ones(batch_size), torch.zeros(2 * batch_size)]).long().to(device)


def mlm_loss(logits, labels):
    """Cross-entropy on the masked positions only (labels are -100 everywhere else).

    Summed and divided by max(1, #masked) rather than averaged, so a batch with nothing masked
    gives 0 instead of NaN -- without a host sync to check for it."""
    total = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return total / (labels != -100).sum().clamp(min=1)


def vqa_loss(logits, target):
    """VQA soft-score BCE, scaled by the answer count as in VLMo / ViLT."""
    return F.binary_cross_entropy_with_logits(logits.float(), target) * target.shape[1]


class Objective(nn.Module):
    """The training loss of a task, as one module: DDP wraps this, not the bare model."""

    def __init__(self, model: VLTransformer, mlm_weight: float = 0.25):
        super().__init__()
        self.model, self.mlm_weight = model, mlm_weight

    def forward(self, batch):
        task = self.model.cfg.task
        return self.pretrain(batch) if task == "pretrain" else self.finetune(batch, task)

    def pretrain(self, batch):
        m, mask = self.model, batch["attention_mask"]
        text_mask = mask.bool()
        # The lower N-M layers are shared by both routes: compute them once (Fig. 2b).
        image_lower = m.lower(m.embed_image(batch["images"]), "v")             # (B, 1+P, D)
        text_lower = m.lower(m.embed_text(batch["input_ids"]), "l", text_mask)  # (B, L, D)
        # ITC on the retrieval route: the top M layers with the v / l experts.
        image_emb, text_emb = m.itc_embed(m.upper(image_lower, "v"), m.upper(text_lower, "l", text_mask))
        itc, sim = itc_loss(image_emb, text_emb, m.logit_scale)
        # ITM on the fusion route: positives, then a hard negative text / image for each pair.
        neg_text, neg_image = sample_hard_negatives(sim), sample_hard_negatives(sim.T)
        b = image_emb.shape[0]
        fused = m.fuse(torch.cat([image_lower, image_lower, image_lower[neg_image]]),
                       torch.cat([text_lower, text_lower[neg_text], text_lower]),
                       torch.cat([mask, mask[neg_text], mask]))                 # (3B, 1+P+L, D)
        itm = F.cross_entropy(m.itm_logits(fused).float(), itm_labels(b, fused.device))
        # MLM on the fusion route, from the masked text.
        mlm_lower = m.lower(m.embed_text(batch["mlm_input_ids"]), "l", text_mask)
        mlm_fused = m.fuse(image_lower, mlm_lower, mask)
        mlm = mlm_loss(m.mlm_logits(mlm_fused, mask.shape[1]), batch["mlm_labels"])
        loss = itc + itm + self.mlm_weight * mlm                                # Sec. 5
        return loss, {"itc": itc.detach(), "itm": itm.detach(), "mlm": mlm.detach()}

    def finetune(self, batch, task):
        out = self.model(batch)
        if task == "retrieval":
            loss, _ = itc_loss(*out, self.model.logit_scale)
        elif task == "vqa":
            loss = vqa_loss(out, batch["target"])
        elif task == "seg":
            loss = F.cross_entropy(out.float(), batch["mask"])
        else:  # nlvr2, cls
            loss = F.cross_entropy(out.float(), batch["label"])
        return loss, {task: loss.detach()}


# ----------------------------------------------------------------------------------------------
# Metrics (Sec. 5: VQA / NLVR2 accuracy, TR/IR R@1/5/10, top-1, mIoU).

def recall_at_k(sim, caption_image, ks=(1, 5, 10)):
    """sim: (images, captions) scores; caption_image[j] = index of caption j's image.

    TR@k: an image counts if ANY of its captions is in its top k; IR@k: a caption counts if its
    image is in its top k. Returned in percent, with the paper's averages (mean of R@1/5/10)."""
    n_img = sim.shape[0]
    ks = [min(k, sim.shape[1]) for k in ks]
    top_captions = sim.topk(max(ks), dim=1).indices                     # (I, K)
    hit_tr = caption_image[top_captions] == torch.arange(n_img)[:, None]
    top_images = sim.topk(min(max(ks), n_img), dim=0).indices.T          # (C, K)
    hit_ir = top_images == caption_image[:, None]
    out = {}
    for k in ks:
        out[f"tr_r{k}"] = 100 * hit_tr[:, :k].any(1).float().mean().item()
        out[f"ir_r{k}"] = 100 * hit_ir[:, :k].any(1).float().mean().item()
    out["tr_avg"] = sum(out[f"tr_r{k}"] for k in ks) / len(ks)
    out["ir_avg"] = sum(out[f"ir_r{k}"] for k in ks) / len(ks)
    out["avg"] = (out["tr_avg"] + out["ir_avg"]) / 2
    return out


def confusion_miou(confusion):
    """mIoU = mean over classes of TP / (TP + FP + FN), over the classes that occur."""
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    present = union > 0
    return 100 * (tp[present] / union[present]).mean().item()


@torch.no_grad()
def evaluate_retrieval(model, dataset, collate, batch_size, autocast):
    """Embed every image and every caption once, then rank (Sec. 5: TR/IR R@1/5/10)."""
    image_embs, text_embs = [], []
    for start in range(0, len(dataset.images), batch_size):
        images = collate.images(dataset.images[start:start + batch_size]).to(model_device(model))
        with autocast:
            feats = model.encode_image(images)
        image_embs.append(F.normalize(model.itc_image_proj(feats[:, 0]).float(), dim=-1))
    for start in range(0, len(dataset.captions), batch_size):
        ids, mask = collate.texts(dataset.captions[start:start + batch_size])
        ids, mask = ids.to(model_device(model)), mask.to(model_device(model))
        with autocast:
            feats = model.encode_text(ids, mask)
        text_embs.append(F.normalize(model.itc_text_proj(feats[:, 0]).float(), dim=-1))
    sim = torch.cat(image_embs) @ torch.cat(text_embs).T                     # (I, C)
    return recall_at_k(sim.cpu(), torch.as_tensor(dataset.caption_image))


@torch.no_grad()
def zero_shot_accuracy(model, dataset, collate, batch_size=128, autocast=contextlib.nullcontext()):
    """Top-1 of zero-shot classification through ITC, as CLIP: each image goes to the class whose text
    prompt has the most similar embedding. `dataset.prompts` holds one prompt per class, `dataset.labels`
    each sample's class. In percent."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    ids, mask = (t.to(device) for t in collate.texts(dataset.prompts))      # (C, L)
    labels, correct = torch.as_tensor(dataset.labels), 0
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    try:
        for start, batch in zip(range(0, len(dataset), batch_size), loader):
            with autocast:
                image, text = model.itc_embed(model.encode_image(batch["images"].to(device)),
                                              model.encode_text(ids, mask))  # (B, D), (C, D)
            predicted = (image.float() @ text.float().T).argmax(1).cpu()     # (B,)
            correct += (predicted == labels[start:start + len(predicted)]).sum().item()
    finally:
        model.train(was_training)
    return 100 * correct / len(dataset)


@torch.no_grad()
def evaluate(model, task, dataset, collate, batch_size=64, autocast=contextlib.nullcontext()):
    """The task's metrics on `dataset` (percentages). Pre-training is scored by zero-shot retrieval."""
    was_training = model.training
    model.eval()
    try:
        if task in ("pretrain", "retrieval"):
            return evaluate_retrieval(model, dataset, collate, batch_size, autocast)
        return evaluate_predictions(model, task, dataset, collate, batch_size, autocast)
    finally:
        model.train(was_training)


def evaluate_predictions(model, task, dataset, collate, batch_size, autocast):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    total, score = 0, 0.0
    confusion = torch.zeros(model.cfg.seg_classes, model.cfg.seg_classes, dtype=torch.long)
    for batch in loader:
        batch = to_device(batch, model_device(model))
        with autocast:
            out = model(batch).float()
        if task == "vqa":  # VQA accuracy: the soft score of the predicted answer
            score += batch["target"].gather(1, out.argmax(1, keepdim=True)).sum().item()
        elif task == "seg":
            pred, truth = out.argmax(1).flatten().cpu(), batch["mask"].flatten().cpu()
            confusion += torch.bincount(truth * model.cfg.seg_classes + pred,
                                        minlength=model.cfg.seg_classes ** 2).view_as(confusion)
        else:
            score += (out.argmax(1) == batch["label"]).sum().item()
        total += len(out)
    if task == "seg":
        return {"miou": confusion_miou(confusion), "pixel_acc": 100 * confusion.diag().sum().item() / confusion.sum().item()}
    return {"vqa_score" if task == "vqa" else "accuracy": 100 * score / total}


# ----------------------------------------------------------------------------------------------
# Checkpoints: one format everywhere, written atomically, read with weights_only=True.

def save_checkpoint(path, checkpoint: dict):
    """Write to a temp file in the same directory, then rename: a reader never sees half a file.
    The temp name carries the pid, so ranks that write the same file (a recipe under torchrun) never
    interleave their bytes."""
    tmp = f"{path}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(checkpoint, tmp)
    os.replace(tmp, path)


def write_json(path, obj):
    """JSON written like a checkpoint: temp file, then rename."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """A vlmerge checkpoint dict, or a bare state dict (as timm saves them) wrapped as {"model": ...}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, pickles with code in them, ...
        raise ValueError(f"checkpoint {path} cannot be read safely: {type(e).__name__}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    if "model" in obj and isinstance(obj["model"], dict):
        return obj
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):  # common in other codebases
        return {"model": obj["state_dict"]}
    return {"model": obj}


def model_from_checkpoint(checkpoint: dict, task=None, **overrides) -> VLTransformer:
    """Rebuild the model a vlmerge checkpoint describes (its `config`), optionally for another task."""
    if "config" not in checkpoint:
        raise ValueError("checkpoint has no 'config' (a bare state dict): give --arch/--variant and use --init")
    fields = {**checkpoint["config"], **overrides}
    if task is not None:
        fields["task"] = task
    return VLTransformer(ModelConfig(**fields))


# Heads of one task that another task neither needs nor has: dropped / freshly built on transfer.
HEAD_PREFIXES = ("itc_", "logit_scale", "itm_head", "mlm_head", "pooler", "vqa_head", "nlvr2_head",
                 "cls_", "seg_head")


def transfer_weights(model: VLTransformer, source: dict, source_variant=None) -> list:
    """Initialize `model` from a checkpoint's state dict: the same variant, or a maa checkpoint
    expanded into every expert (the seed hand-over), or a timm ViT. Heads the source lacks stay as
    built; heads the target lacks are dropped; anything else missing or extra is an error naming
    the key. Returns the keys that were left freshly initialized."""
    from model import strip_prefixes
    source = strip_prefixes(source)
    if "word_embed.weight" not in source:  # a plain image ViT (timm / BEiT converted)
        load_vit_weights(model, source)
        return [k for k in model.state_dict() if k.split(".")[0] not in
                ("patch_embed", "cls_token", "pos_embed", "blocks", "norm")]
    if source_variant not in (None, "maa", model.cfg.variant):
        raise ValueError(f"a {source_variant} checkpoint cannot initialize a {model.cfg.variant} model "
                         f"(merge it first with `vlmerge.py merge`, or initialize from a maa checkpoint)")
    target, fresh, used = model.state_dict(), [], set()
    for key, param in target.items():
        source_key = key if key in source else shared_key(key)
        if source_key not in source:
            if not key.startswith(HEAD_PREFIXES):
                raise KeyError(f"checkpoint is missing key {source_key!r}")
            fresh.append(key)
            continue
        if source[source_key].shape != param.shape:
            raise ValueError(f"key {source_key!r}: shape {tuple(source[source_key].shape)} in the checkpoint "
                             f"vs {tuple(param.shape)} in the model (another arch, image size or vocab?)")
        target[key] = source[source_key]
        used.add(source_key)
    extra = [k for k in source if k not in used and not k.startswith(HEAD_PREFIXES)]
    if extra:
        raise KeyError(f"unexpected key {extra[0]!r} in the checkpoint ({len(extra)} unexpected in all)")
    model.load_state_dict(target, strict=True)
    return fresh


# ----------------------------------------------------------------------------------------------
# Data: the synthetic world by default, real-format files when given.

def make_data(args, task: str):
    """(train dataset, eval dataset, tokenizer, task sizes) for `task`."""
    if args.data == "synthetic":
        world = data.SyntheticWorld(seed=args.world_seed, image_size=args.image_size)
        eval_task = "retrieval" if task == "pretrain" else task
        sizes = dict(num_answers=len(world.answers), num_classes=world.num_classes, seg_classes=world.seg_classes)
        return world.dataset(task, "train"), world.dataset(eval_task, args.eval_split), world.tokenizer(), sizes
    if not os.path.exists(args.data):
        raise FileNotFoundError(f"--data {args.data}: no such file")
    if not args.vocab:
        raise ValueError("--vocab PATH (a BERT vocab.txt) is needed with real data")
    tokenizer = data.Tokenizer.from_vocab_file(args.vocab)
    root = args.image_root or os.path.dirname(args.data)
    if task == "vqa":
        if not args.annotations:
            raise ValueError("--annotations PATH (VQA v2 annotations JSON) is needed with --task vqa")
        train = data.load_vqa(args.data, args.annotations, root)
        return train, None, tokenizer, dict(num_answers=len(train.answers))
    if task == "nlvr2":
        return data.load_nlvr2(args.data, root), None, tokenizer, {}
    if args.data.endswith(".jsonl"):
        train = data.load_image_text_jsonl(args.data, root)
    else:
        train = data.load_karpathy(args.data, root, "train")
    evalset = data.load_karpathy(args.eval_data, args.image_root or os.path.dirname(args.eval_data), "val") \
        if args.eval_data else None
    return train, evalset, tokenizer, {}


class SkipSampler(torch.utils.data.Sampler):
    """The indices of `sampler` after the first `skip`: resuming mid-epoch without reading data."""

    def __init__(self, sampler, skip: int):
        self.sampler, self.skip = sampler, skip

    def __iter__(self):
        for i, index in enumerate(self.sampler):
            if i >= self.skip:
                yield index

    def __len__(self):
        return len(self.sampler) - self.skip


def batch_stream(dataset, collate, args, rank, world_size, start_step, device):
    """Endless training batches; step s always gets the same batch, so a resumed run sees the
    same data as an uninterrupted one. DistributedSampler shards and reshuffles per epoch."""
    per_epoch = len(dataset) // (args.batch_size * world_size)
    if per_epoch == 0:
        raise ValueError(f"dataset of {len(dataset)} samples is smaller than one global batch "
                         f"({args.batch_size} x {world_size} ranks)")
    epoch, skip = divmod(start_step * args.accum_steps, per_epoch)
    while True:
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
        sampler.set_epoch(epoch)
        loader = DataLoader(dataset, args.batch_size, sampler=SkipSampler(sampler, skip * args.batch_size),
                            collate_fn=collate, num_workers=args.workers, drop_last=True,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            generator=torch.Generator().manual_seed(args.seed + epoch))
        for batch in loader:
            yield to_device(batch, device)
        epoch, skip = epoch + 1, 0


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_device(model):
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------
# The run.

def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="pretrain", choices=TASKS)
    p.add_argument("--arch", default="vit_tiny", choices=list(ARCHS), help="backbone (Sec. 5: vit_base; Sec. 6.5: vit_tiny)")
    p.add_argument("--variant", default="msa", choices=VARIANTS, help="Sec. 3 / Fig. 1 architecture")
    p.add_argument("--init", default=None, help="timm ViT state dict, a maa checkpoint (seed hand-over), or a "
                                                "checkpoint of this variant (fine-tuning)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt where it stopped")
    p.add_argument("--steps", type=int, default=200_000, help="optimizer steps (Sec. 5: 200k)")
    p.add_argument("--batch-size", type=int, default=1024, help="per-rank batch (Sec. 5: 1024 in all)")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (Sec. 5: 2e-4)")
    p.add_argument("--warmup", type=int, default=2500, help="warmup steps (Sec. 5: 2500), at most 10%% of --steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--mlm-weight", type=float, default=0.25, help="Sec. 5: 0.25 for MLM")
    p.add_argument("--image-size", type=int, default=224, help="Sec. 5: 224")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--depth", type=int, default=12, help="N layers (Sec. 3: 12)")
    p.add_argument("--fusion-layers", type=int, default=2, help="M top layers with VL experts (Sec. 3: 2)")
    p.add_argument("--max-len", type=int, default=40, help="text tokens (Sec. 5: 40)")
    p.add_argument("--data", default="synthetic", help="'synthetic' or a real-format file (.jsonl / Karpathy .json "
                                                       "/ VQA questions .json / NLVR2 .jsonl)")
    p.add_argument("--eval-data", default=None, help="Karpathy JSON whose 'val' split scores pre-training")
    p.add_argument("--annotations", default=None, help="VQA v2 annotations JSON (with --task vqa)")
    p.add_argument("--image-root", default=None)
    p.add_argument("--randaugment", default="auto", choices=["auto", "on", "off"],
                   help="Sec. 5 RandAugment on training images; auto = on for real data, off for the synthetic world")
    p.add_argument("--vocab", default=None, help="BERT vocab.txt (real data)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the synthetic world")
    p.add_argument("--eval-split", default="test", choices=["val", "test"])
    p.add_argument("--eval-only", action="store_true")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--eval-batch-size", type=int, default=128)
    p.add_argument("--out", default="runs/default")
    p.add_argument("--save-every", type=int, default=1000)
    p.add_argument("--keep-at", type=int, nargs="*", default=[],
                   help="also keep OUT/ckpt_step<K>.pt at these steps: the seeds of Fig. 3 are snapshots of one maa run")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype; fp16 adds a GradScaler (bf16 works on CPU too)")
    p.add_argument("--compile", action="store_true", help="torch.compile the objective")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (exact resume needs 0)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quiet", action="store_true", help="no progress bar / table")
    return p


def setup_distributed(args):
    """DDP in a few lines, keyed on torchrun's RANK: NCCL on GPU, gloo on CPU."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device(args.device)
    backend = "nccl" if args.device.startswith("cuda") else "gloo"
    if not dist.is_initialized():  # a recipe runs several stages in one torchrun process
        dist.init_process_group(backend)
    rank, local = dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device(f"cuda:{local}") if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return rank, dist.get_world_size(), device


def lr_lambda(warmup, steps):
    """Linear warmup to the peak, then cosine decay to zero."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return f


def freeze_unused(objective, batch):
    """Train only what the task's route touches: one probe backward, then requires_grad=False
    for every parameter it left without a gradient (Sec. 6.5: an msa model fine-tunes only its
    vision encoder on vision tasks). Also keeps DDP from waiting for gradients that never come."""
    objective(batch)[0].backward()
    frozen = []
    for name, p in objective.model.named_parameters():
        if p.grad is None:
            p.requires_grad_(False)
            frozen.append(name)
        p.grad = None
    return frozen


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_args(args):
    for flag in ("steps", "batch_size", "accum_steps", "save_every", "log_every"):
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if any(not 0 < k <= args.steps for k in args.keep_at):
        raise ValueError(f"--keep-at {args.keep_at}: every step must lie in 1..--steps ({args.steps})")
    if args.resume and args.init:
        raise ValueError("--resume continues OUT/ckpt.pt; --init starts a new run: give one of them")
    if args.init and not os.path.isfile(args.init):
        raise FileNotFoundError(f"--init {args.init}: no such file")


def model_from_args(args, vocab_size, **sizes) -> VLTransformer:
    """The model the flags describe (fresh weights)."""
    return build_model(args.arch, args.variant, args.task, vocab_size=vocab_size, image_size=args.image_size,
                       patch_size=args.patch_size, depth=args.depth, fusion_layers=args.fusion_layers,
                       max_text_len=args.max_len, **sizes)


def build_run(args, rank, device):
    """Model (fresh, --init, or --resume), datasets, collators."""
    train_set, eval_set, tokenizer, sizes = make_data(args, args.task)
    model = model_from_args(args, vocab_size=len(tokenizer), **sizes)
    if args.init:
        ckpt = load_checkpoint(args.init)
        check_arch(ckpt, args, args.init, same_variant=False)
        transfer_weights(model, ckpt["model"], ckpt.get("variant"))
    # RandAugment (Sec. 5) on real photos; not on the synthetic world, whose captions name exact colours
    # and quadrants that solarize / translate would falsify.
    augment = args.randaugment == "on" or (args.randaugment == "auto" and args.data != "synthetic")
    collate_train = data.Collator(tokenizer, max_len=args.max_len, image_size=args.image_size, train=True,
                                  mlm_prob=0.15, randaugment=augment)
    collate_eval = data.Collator(tokenizer, max_len=args.max_len, image_size=args.image_size, train=False)
    return model.to(device), train_set, eval_set, collate_train, collate_eval


def check_arch(ckpt, args, path, same_variant):
    for field in ("arch",) + (("variant", "task") if same_variant else ()):
        if field in ckpt and ckpt[field] != getattr(args, field):
            raise ValueError(f"checkpoint {path} is {field} {ckpt[field]!r}, but --{field} is {getattr(args, field)!r}")


def checkpoint_dict(model, args, step, optimizer, scheduler, scaler):
    return {"model": model.state_dict(), "config": dataclasses.asdict(model.cfg), "arch": args.arch,
            "variant": model.cfg.variant, "task": model.cfg.task, "step": step,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rng_state(), "args": vars(args)}


def print_table(metrics: dict, title: str):
    rows = "\n".join(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    print(f"\n**{title}**\n\n| metric | value |\n|---|---|\n{rows}\n")


def run(argv=None) -> dict:
    """Train and/or evaluate as the flags say; returns the final metrics (rank 0)."""
    args = build_parser().parse_args(argv)
    args.started = time.time()
    check_args(args)
    rank, world_size, device = setup_distributed(args)
    master = rank == 0
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")

    model, train_set, eval_set, collate_train, collate_eval = build_run(args, rank, device)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    if args.eval_only:
        return finish(model, args, eval_set, collate_eval, autocast, master, step=0)

    objective = Objective(model, args.mlm_weight).to(device)
    stream = None
    start = 0
    if args.resume:
        if not os.path.isfile(ckpt_path):
            raise FileNotFoundError(f"--resume: {ckpt_path} does not exist")
        ckpt = load_checkpoint(ckpt_path)
        check_arch(ckpt, args, ckpt_path, same_variant=True)
        model.load_state_dict(ckpt["model"], strict=True)
        start = ckpt["step"]
    probe = next(batch_stream(train_set, collate_train, args, rank, world_size, 0, device))
    with autocast:
        frozen = freeze_unused(objective, probe)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases, norms, temperature: no weight decay
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98),
                                  fused=device.type == "cuda")
    warmup = min(args.warmup, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, args.steps))
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")
    if args.resume:
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
    if master:
        with open(os.path.join(args.out, "args.json"), "w") as f:
            json.dump({k: v for k, v in vars(args).items() if k != "started"} | {"frozen_parameters": len(frozen)},
                      f, indent=1)
    train_objective = torch.compile(objective) if args.compile else objective
    if world_size > 1:
        train_objective = DDP(train_objective, device_ids=[device.index] if device.type == "cuda" else None)
    stream = batch_stream(train_set, collate_train, args, rank, world_size, start, device)
    train_loop(args, model, train_objective, optimizer, scheduler, scaler, stream, autocast, start, master,
               ckpt_path, eval_set, collate_eval)
    return finish(model, args, eval_set, collate_eval, autocast, master, step=args.steps)


def train_loop(args, model, objective, optimizer, scheduler, scaler, stream, autocast, start, master,
               ckpt_path, eval_set, collate_eval):
    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    bar = tqdm(total=args.steps, initial=start, disable=not master or args.quiet, desc=f"{args.task} {args.variant}")
    parts_sum, n_logged, t0, samples = {}, 0, time.time(), 0
    for step in range(start, args.steps):
        for micro in range(args.accum_steps):
            batch = next(stream)
            # DDP: sync gradients only on the last micro-step. ITC negatives come from this micro-batch only.
            sync = micro == args.accum_steps - 1 or not isinstance(objective, DDP)
            with (contextlib.nullcontext() if sync else objective.no_sync()), autocast:
                loss, parts = objective(batch)
            # Gradients add up over micro-steps; dividing makes them the mean over the whole batch.
            scaler.scale(loss / args.accum_steps).backward()
            for k, v in parts.items():
                parts_sum[k] = parts_sum.get(k, 0) + v / args.accum_steps
            parts_sum["loss"] = parts_sum.get("loss", 0) + loss.detach() / args.accum_steps
            samples += batch["images"].shape[0]
        if args.clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        n_logged += 1
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            record = reduce_logs(parts_sum, n_logged)  # the only host sync: every --log-every steps
            record |= {"step": done, "lr": scheduler.get_last_lr()[0],
                       "samples_per_s": samples * dist_world() / (time.time() - t0)}
            if master:
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
            parts_sum, n_logged, t0, samples = {}, 0, time.time(), 0
        bar.update(1)
        if args.eval_every and done % args.eval_every == 0 and done < args.steps and master and eval_set is not None:
            log.write(json.dumps({"step": done, "eval": evaluate(model, args.task, eval_set, collate_eval,
                                                                 args.eval_batch_size, autocast)}) + "\n")
        if done % args.save_every == 0 or done == args.steps or done in args.keep_at:
            if master:
                checkpoint = checkpoint_dict(model, args, done, optimizer, scheduler, scaler)
                save_checkpoint(ckpt_path, checkpoint)
                if done in args.keep_at:
                    save_checkpoint(snapshot_path(args.out, done), checkpoint)
            barrier()
    bar.close()
    if log:
        log.close()


def snapshot_path(out, step):
    return os.path.join(out, f"ckpt_step{step}.pt")


def reduce_logs(parts_sum, n):
    """Mean over steps and ranks; stops the run with a clear error on a non-finite loss."""
    keys = sorted(parts_sum)
    values = torch.stack([parts_sum[k].float() for k in keys]) / n
    if dist_world() > 1:
        dist.all_reduce(values)
        values /= dist_world()
    values = values.tolist()
    record = dict(zip(keys, values))
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f"non-finite loss {record}: lower --lr, or use --precision fp32/bf16")
    return record


def dist_world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier():
    if dist_world() > 1:
        dist.barrier()


def finish(model, args, eval_set, collate_eval, autocast, master, step):
    """Evaluate on rank 0, print a Markdown table, write metrics.json (atomically)."""
    metrics = {}
    if master and eval_set is not None:
        metrics = evaluate(model, args.task, eval_set, collate_eval, args.eval_batch_size, autocast)
        metrics["step"] = step
        metrics["seconds"] = time.time() - args.started  # wall time of this run, evaluation included
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        if not args.quiet:
            print_table(metrics, f"{args.task} · {args.variant} · {args.out}")
    barrier()
    return metrics


def main(argv=None):
    try:
        run(argv)
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
