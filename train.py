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

Evaluation uses the metric each community reports (Sec. 5): TR/IR R@1/5/10, the official VQA accuracy
(data.vqa_accuracy, every question), NLVR2 and top-1 accuracy, mIoU. Data is the synthetic world or real
files (REAL_DATA: --data for training, --eval-data for scoring); --eval-only scores a checkpoint and refuses
one that lacks the task's head.

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
from model import (ARCHS, HEADS, TASKS, VARIANTS, ModelConfig, VLTransformer, build_model, is_backbone_key, is_head_key,
                   load_vit_weights, resize_pos_embed, shared_key, strip_prefixes)

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
    # float32 logits even under autocast: bf16 keeps ~3 significant digits, too few for a softmax over
    # the global batch, and these similarities also pick ITM's hard negatives
    image_emb, text_emb = image_emb.float(), text_emb.float()
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


def seg_loss(logits, mask):
    """Per-pixel cross-entropy over the labelled pixels; summed and divided by max(1, #labelled) as MLM's."""
    total = F.cross_entropy(logits.float(), mask, ignore_index=data.SEG_IGNORE, reduction="sum")
    return total / (mask != data.SEG_IGNORE).sum().clamp(min=1)


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
        r = m.routes(batch["images"], batch["input_ids"], mask)  # both routes of Fig. 2b, lower layers once
        # ITC on the retrieval route
        image_emb, text_emb = m.itc_embed(r.image, r.text)
        itc, sim = itc_loss(image_emb, text_emb, m.logit_scale)
        # ITM on the fusion route: the positives (r.fused), then a hard negative text for each image and
        # a hard negative image for each text, fused from the same lower-layer features
        neg_text, neg_image = sample_hard_negatives(sim), sample_hard_negatives(sim.T)
        negatives = m.fuse(torch.cat([r.image_lower, r.image_lower[neg_image]]),
                           torch.cat([r.text_lower[neg_text], r.text_lower]),
                           torch.cat([mask[neg_text], mask]))                  # (2B, 1+P+L, D)
        itm_logits = m.itm_logits(torch.cat([r.fused, negatives]))            # (3B, 2)
        itm = F.cross_entropy(itm_logits.float(), itm_labels(len(mask), itm_logits.device))
        # MLM on the fusion route, from the masked text
        mlm_fused = m.fuse(r.image_lower, m.text_lower(batch["mlm_input_ids"], mask), mask)
        mlm = mlm_loss(m.mlm_logits(mlm_fused, mask.shape[1]), batch["mlm_labels"])
        loss = itc + itm + self.mlm_weight * mlm                                # Sec. 5
        return loss, {"itc": itc.detach(), "itm": itm.detach(), "mlm": mlm.detach()}

    def finetune(self, batch, task):
        out = self.model(batch)
        if task == "retrieval":
            loss, _ = itc_loss(*out, self.model.logit_scale)
        elif task == "vqa":
            loss = vqa_loss(out, batch["target"])
        elif task == "seg":  # ADE20k's "other" (data.SEG_IGNORE) is no class: no loss there
            loss = seg_loss(out, batch["mask"])
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
            image_embs.append(model.itc_image(model.encode_image(images)))
    for start in range(0, len(dataset.captions), batch_size):
        ids, mask = collate.texts(dataset.captions[start:start + batch_size])
        ids, mask = ids.to(model_device(model)), mask.to(model_device(model))
        with autocast:
            text_embs.append(model.itc_text(model.encode_text(ids, mask)))
    sim = torch.cat(image_embs) @ torch.cat(text_embs).T                     # (I, C)
    return recall_at_k(sim.cpu(), torch.as_tensor(dataset.caption_image))


@torch.no_grad()
def zero_shot_predict(model, images, prompt_ids, prompt_mask, batch_size=256, autocast=contextlib.nullcontext()):
    """Zero-shot classification through ITC, as CLIP: each image goes to the class whose text prompt has the
    most similar embedding. images (N,3,H,W) normalized; prompts (C,L) token ids and mask. Returns (N,) long."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    try:
        with autocast:
            text_feats = model.encode_text(prompt_ids.to(device), prompt_mask.to(device))       # (C, L, D)
        predicted = []
        for start in range(0, len(images), batch_size):
            with autocast:
                image, text = model.itc_embed(model.encode_image(images[start:start + batch_size].to(device)),
                                              text_feats)                                    # (B, D), (C, D)
            predicted.append((image.float() @ text.float().T).argmax(1).cpu())              # (B,)
    finally:
        model.train(was_training)
    return torch.cat(predicted)


def zero_shot_inputs(dataset, collate):
    """What zero-shot classification of `dataset` needs, prepared once: its images (normalized), labels, and
    the token ids and mask of its class prompts (`dataset.prompts`, `dataset.labels`)."""
    images = collate.images([dataset[i]["image"] for i in range(len(dataset))])              # (N, 3, H, W)
    return (images, torch.as_tensor(dataset.labels), *collate.texts(dataset.prompts))


def zero_shot_accuracy(model, images, labels, prompt_ids, prompt_mask) -> float:
    """Top-1 of zero_shot_predict, in percent; the arguments are zero_shot_inputs(dataset, collate)."""
    return 100 * (zero_shot_predict(model, images, prompt_ids, prompt_mask) == labels).float().mean().item()


@torch.no_grad()
def evaluate(model, task, dataset, collate, batch_size=64, autocast=contextlib.nullcontext(), predictions=None):
    """The task's metrics on `dataset` (percentages): the metric each community reports (Sec. 5). Pre-training
    is scored by zero-shot retrieval. `predictions`: a JSON file for the answers (VQA: the submission format)."""
    was_training = model.training
    model.eval()
    try:
        if task in ("pretrain", "retrieval"):
            return evaluate_retrieval(model, dataset, collate, batch_size, autocast)
        return evaluate_predictions(model, task, dataset, collate, batch_size, autocast, predictions)
    finally:
        model.train(was_training)


def evaluate_predictions(model, task, dataset, collate, batch_size, autocast, predictions=None):
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate)
    scorer = SCORERS[task](model, dataset)
    for batch in loader:
        batch = to_device(batch, model_device(model))
        with autocast:
            out = model(batch).float()
        scorer.add(out, batch)
    if predictions:  # VQA only (check_args)
        write_json(predictions, scorer.rows)
    return scorer.result()


class Accuracy:
    """NLVR2 and classification: top-1 accuracy (percent)."""

    def __init__(self, model, dataset):
        self.right, self.total = 0, 0

    def add(self, logits, batch):
        self.right += (logits.argmax(1) == batch["label"]).sum().item()
        self.total += len(logits)

    def result(self):
        return {"accuracy": 100 * self.right / self.total}


class VQAAccuracy:
    """VQA v2: the official accuracy (data.vqa_accuracy) of the top answer against the humans' answers as
    written, for every question; `rows` is the submission, [{"question_id": int, "answer": str}, ...]."""

    def __init__(self, model, dataset):
        # a real VQA file carries its answer vocabulary; the synthetic world's is the world's
        self.answers = getattr(dataset, "answers", None) or dataset.world.answers
        self.scores, self.rows = [], []

    def add(self, logits, batch):
        for i, index in enumerate(logits.argmax(1).tolist()):
            answer = self.answers[index]
            question = int(batch["question_id"][i]) if "question_id" in batch else len(self.rows)
            self.rows.append({"question_id": question, "answer": answer})
            if "answers" in batch:
                self.scores.append(data.vqa_accuracy(answer, batch["answers"][i]))

    def result(self):
        out = {"questions": len(self.rows)}
        if self.scores:  # test-dev has no public answers: only the submission
            out["vqa_score"] = 100 * sum(self.scores) / len(self.scores)
        return out


class MeanIoU:
    """Segmentation: mIoU and pixel accuracy over the labelled pixels (data.SEG_IGNORE skipped)."""

    def __init__(self, model, dataset):
        self.n = model.cfg.seg_classes
        self.confusion = torch.zeros(self.n, self.n, dtype=torch.long)

    def add(self, logits, batch):
        truth, pred = batch["mask"].flatten().cpu(), logits.argmax(1).flatten().cpu()
        keep = truth != data.SEG_IGNORE
        self.confusion += torch.bincount(truth[keep] * self.n + pred[keep], minlength=self.n ** 2).view(self.n, self.n)

    def result(self):
        labelled = max(1, self.confusion.sum().item())
        return {"miou": confusion_miou(self.confusion), "pixel_acc": 100 * self.confusion.diag().sum().item() / labelled}


SCORERS = {"vqa": VQAAccuracy, "nlvr2": Accuracy, "cls": Accuracy, "seg": MeanIoU}


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


def write_text(path, text: str):
    """A report written like a checkpoint: temp file, then rename (a reader never sees half of it)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=1))


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


# The heads each task's evaluation reads (a subset of model.HEADS[task]): a checkpoint without them has
# nothing to score on that task (pre-training is scored by zero-shot retrieval: ITC's projections).
EVAL_HEADS = {"pretrain": ("itc_image_proj", "itc_text_proj"), "retrieval": ("itc_image_proj", "itc_text_proj"),
              "vqa": ("pooler", "vqa_head"), "nlvr2": ("pooler", "nlvr2_head"), "cls": ("cls_norm", "cls_head"),
              "seg": ("seg_head",)}


def require_heads(task, fresh_keys, path):
    """--eval-only: the task's heads must come from the checkpoint; a freshly initialized one would be scored
    without a word. One error naming the missing heads."""
    missing = [h for h in EVAL_HEADS[task] if any(k.split(".")[0] == h for k in fresh_keys)]
    if missing:
        raise ValueError(f"checkpoint {path} has no {task} head ({', '.join(missing)} missing): it was not "
                         f"trained on {task}; fine-tune it first (train.py --task {task} --init {path})")


def transfer_weights(model: VLTransformer, source: dict, source_variant=None) -> list:
    """Initialize `model` from a checkpoint's state dict: the same variant, or a maa checkpoint
    expanded into every expert (the seed hand-over), or a timm ViT. Heads the source lacks stay as
    built; heads the target lacks are dropped; anything else missing or extra is an error naming
    the key. Returns the keys that were left freshly initialized."""
    source = strip_prefixes(source)
    if "pos_embed" in source:  # fine-tuning at another image size (Table 6: 384 / 480 px) resamples the grid
        source["pos_embed"] = resize_pos_embed(source["pos_embed"], model.cfg.num_patches)
    if "word_embed.weight" not in source:  # a plain image ViT (timm / BEiT converted)
        load_vit_weights(model, source)
        return [k for k in model.state_dict() if not is_backbone_key(k)]
    if source_variant not in (None, "maa", model.cfg.variant):
        raise ValueError(f"a {source_variant} checkpoint cannot initialize a {model.cfg.variant} model "
                         f"(merge it first with `vlmerge.py merge`, or initialize from a maa checkpoint)")
    target, fresh, used = model.state_dict(), [], set()
    for key, param in target.items():
        source_key = key if key in source else shared_key(key)
        if source_key not in source:
            if not is_head_key(key):
                raise KeyError(f"checkpoint is missing key {source_key!r}")
            fresh.append(key)
            continue
        if source[source_key].shape != param.shape:
            raise ValueError(f"key {source_key!r}: shape {tuple(source[source_key].shape)} in the checkpoint "
                             f"vs {tuple(param.shape)} in the model (another arch, image size or vocab?)")
        target[key] = source[source_key]
        used.add(source_key)
    extra = [k for k in source if k not in used and not is_head_key(k)]
    if extra:
        raise KeyError(f"unexpected key {extra[0]!r} in the checkpoint ({len(extra)} unexpected in all)")
    model.load_state_dict(target, strict=True)
    return fresh


# ----------------------------------------------------------------------------------------------
# Data: the synthetic world by default, real-format files when given.

def make_data(args, task: str, answers=None, evaluation=True):
    """(train dataset, eval dataset, tokenizer, task sizes) for `task`: the synthetic world, or real-format
    files (REAL_DATA). With --eval-only the training data is not read (train dataset None); `answers` is then
    the VQA answer vocabulary, from the checkpoint. evaluation=False: no evaluation data is read (None)."""
    if args.data == "synthetic" and not (args.eval_only and args.eval_data):
        world = data.SyntheticWorld(seed=args.world_seed, image_size=args.image_size)
        eval_task = "retrieval" if task == "pretrain" else task
        sizes = dict(num_answers=len(world.answers), num_classes=world.num_classes, seg_classes=world.seg_classes)
        return world.dataset(task, "train"), world.dataset(eval_task, args.eval_split), world.tokenizer(), sizes
    for flag in ("data", "eval_data", "annotations", "eval_annotations", "vocab"):
        path = getattr(args, flag)
        if path and path != "synthetic" and not os.path.exists(path):
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file")
    if not args.vocab and task not in ("cls", "seg"):
        raise ValueError("--vocab PATH (a BERT vocab.txt) is needed with real data")
    tokenizer = data.Tokenizer.from_vocab_file(args.vocab) if args.vocab else None
    load_train, load_eval = REAL_DATA[task]
    train = None if args.eval_only else load_train(args)
    evalset = load_eval(args, train, answers) if evaluation else None
    if evalset is None and evaluation and not args.eval_only:
        print(f"warning: no evaluation data for --task {task} (--eval-data): this run writes no metrics.json",
              file=sys.stderr)
    some = train if train is not None else evalset
    sizes = {"vqa": lambda: dict(num_answers=len(some.answers)), "cls": lambda: dict(num_classes=len(some.classes)),
             "seg": lambda: dict(seg_classes=data.ADE20K_CLASSES)}.get(task, dict)()
    return train, evalset, tokenizer, sizes


# Real-format data, per task: (training set from the flags, evaluation set from the flags). Images of the
# training files live under --image-root (default: the file's folder), those of the evaluation files under
# --eval-image-root (default: --image-root, else the evaluation file's folder).

def train_root(args):
    return args.image_root or os.path.dirname(args.data)


def eval_root(args):
    return args.eval_image_root or args.image_root or os.path.dirname(args.eval_data or args.data)


def image_text_train(args):
    if args.data.endswith(".jsonl"):
        return data.load_image_text_jsonl(args.data, train_root(args))
    return data.load_karpathy(args.data, train_root(args), "train")


def karpathy_eval(args, train, answers):
    """The --eval-split (val / test) of a Karpathy JSON: --eval-data, else --data when it is one."""
    path = args.eval_data or (args.data if args.data.endswith(".json") else None)
    return data.load_karpathy(path, eval_root(args), args.eval_split) if path else None


def vqa_train(args):
    if not args.annotations:
        raise ValueError("--annotations PATH (VQA v2 annotations JSON) is needed with --task vqa")
    return data.load_vqa(args.data, args.annotations, train_root(args))


def vqa_eval(args, train, answers):
    """Every question of --eval-data, scored against --eval-annotations (none: test-dev, --predictions only)."""
    if not args.eval_data:
        return None
    answers = train.answers if train is not None else answers
    if answers is None:
        raise ValueError("VQA evaluation needs the answer vocabulary: --init a checkpoint fine-tuned by train.py "
                         "--task vqa (it stores its answers), or give the training --data and --annotations")
    if not args.eval_annotations and not args.predictions:
        raise ValueError(f"--eval-data {args.eval_data} without --eval-annotations has nothing to score: give "
                         "--eval-annotations, or --predictions FILE for the submission (test-dev)")
    return data.load_vqa(args.eval_data, args.eval_annotations, eval_root(args), answers=answers)


def names_evaluation(args) -> bool:
    """Whether the flags name evaluation data for args.task (real data), i.e. whether the run will score."""
    if args.task in ("cls", "seg"):  # ROOT/val, ROOT/images/validation
        return True
    if args.task in ("pretrain", "retrieval") and args.data.endswith(".json"):  # its own Karpathy eval split
        return True
    return bool(args.eval_data) and (args.task != "vqa" or bool(args.eval_annotations))


REAL_DATA = {
    "pretrain": (image_text_train, karpathy_eval),
    "retrieval": (image_text_train, karpathy_eval),
    "vqa": (vqa_train, vqa_eval),
    "nlvr2": (lambda args: data.load_nlvr2(args.data, train_root(args)),
              lambda args, train, answers: data.load_nlvr2(args.eval_data, eval_root(args)) if args.eval_data else None),
    # --data ROOT: ROOT/train/<class>/*, ROOT/val/<class>/* (--eval-data ROOT2: ROOT2/val)
    "cls": (lambda args: data.load_image_folder(os.path.join(args.data, "train")),
            lambda args, train, answers: data.load_image_folder(os.path.join(args.eval_data or args.data, "val"),
                                                                train.classes if train is not None else None)),
    # --data ROOT: ADE20k SceneParsing, ROOT/{images,annotations}/{training,validation}
    "seg": (lambda args: data.load_ade20k(args.data, "training"),
            lambda args, train, answers: data.load_ade20k(args.eval_data or args.data, "validation")),
}


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


def batch_stream(dataset, collate, args, micro, rank, world_size, start_step, device):
    """Endless training micro-batches of `micro` samples; step s always gets the same batches, so a resumed
    run sees the same data as an uninterrupted one. DistributedSampler shards and reshuffles per epoch."""
    per_epoch = len(dataset) // (micro * world_size)
    if per_epoch == 0:
        raise ValueError(f"dataset of {len(dataset)} samples is smaller than one micro-batch on every rank "
                         f"({micro} x {world_size} ranks)")
    epoch, skip = divmod(start_step * args.accum_steps, per_epoch)
    while True:
        sampler = DistributedSampler(dataset, world_size, rank, shuffle=True, seed=args.seed, drop_last=True)
        sampler.set_epoch(epoch)
        # the generator seeds the workers' RandAugment draws: distinct per rank and epoch
        loader = DataLoader(dataset, micro, sampler=SkipSampler(sampler, skip * micro),
                            collate_fn=collate, num_workers=args.workers, drop_last=True,
                            pin_memory=device.type == "cuda", persistent_workers=False,
                            generator=torch.Generator().manual_seed(args.seed + 1_000_003 * rank + epoch))
        for batch in loader:
            yield to_device(batch, device)
        epoch, skip = epoch + 1, 0


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def model_device(model):
    return next(model.parameters()).device


# ----------------------------------------------------------------------------------------------
# The run.

# Defaults come in two profiles. QUICK (no flag) is the card's `train.py --arch vit_tiny`: a pre-training
# stage on the synthetic world that finishes in minutes on a laptop CPU (the tiny recipe's shapes). PAPER
# (`--paper`) is Sec. 5 for pre-training and Table 6 for fine-tuning. A flag given on the command line always
# wins; `resolve_defaults` fills the rest from the profile, so every default has one home and says whose it is.
SHAPES = {
    "quick": dict(image_size=32, patch_size=8, depth=4, fusion_layers=2, max_len=40),
    "paper": dict(image_size=224, patch_size=16, depth=12, fusion_layers=2, max_len=40),  # Sec. 3, 5
}
SCHEDULES = {  # global batch (summed over ranks and accumulation steps); warmup None = 10% of the steps
    "quick": {"pretrain": dict(steps=500, batch_size=64, lr=5e-4, warmup=50),
              "finetune": dict(steps=300, batch_size=64, lr=5e-4, warmup=None)},
    "paper": {"pretrain": dict(steps=200_000, batch_size=1024, lr=2e-4, warmup=2500),        # Sec. 5
              # Table 6 (epochs become steps once the data is loaded); retrieval = COCO's row
              # (Flickr30k's: --lr 6.25e-7 --batch-size 128 --epochs 40)
              "vqa": dict(image_size=480, lr=3e-5, batch_size=128, epochs=10, warmup=None),
              "retrieval": dict(image_size=384, lr=6.25e-6, batch_size=640, epochs=20, warmup=None),
              "nlvr2": dict(image_size=384, lr=5e-5, batch_size=128, epochs=10, warmup=None),
              # not in Table 6 (the paper fine-tunes these with BEiT's code): our choice, see README
              "cls": dict(image_size=224, lr=5e-4, batch_size=1024, epochs=100, warmup=None),
              "seg": dict(image_size=512, lr=1e-4, batch_size=16, steps=160_000, warmup=None)},
}


def profile_defaults(paper: bool, task: str) -> dict:
    """Every profile-dependent default for `task`: shapes, then the schedule (which may set the image size)."""
    name = "paper" if paper else "quick"
    schedule = SCHEDULES[name].get(task) or SCHEDULES[name]["finetune"]
    return {"arch": "vit_base" if paper else "vit_tiny", "epochs": None, **SHAPES[name], **schedule}


def resolve_defaults(args):
    """Fill every flag left unset (None) from the profile --paper chooses."""
    for key, value in profile_defaults(args.paper, args.task).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q, pp = SCHEDULES["quick"]["pretrain"], SCHEDULES["paper"]["pretrain"]
    # -- what to train
    p.add_argument("--task", default="pretrain", choices=TASKS)
    p.add_argument("--paper", action="store_true",
                   help="the paper's settings (Sec. 5: vit_base, 224 px, batch 1024, 200k steps, 2500 warm-up, "
                        "lr 2e-4; Table 6 for fine-tuning) instead of the quick synthetic-world run")
    p.add_argument("--arch", default=None, choices=list(ARCHS), help="backbone (quick: vit_tiny; --paper: vit_base)")
    p.add_argument("--variant", default="msa", choices=VARIANTS, help="Sec. 3 / Fig. 1 architecture")
    p.add_argument("--init", default=None, help="timm ViT state dict, a maa checkpoint (seed hand-over), or a "
                                                "checkpoint of this variant (fine-tuning)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.pt where it stopped")
    # -- schedule (defaults: quick / --paper)
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (quick: {q['steps']}; --paper: {pp['steps']}, Sec. 5)")
    p.add_argument("--epochs", type=float, default=None,
                   help="train this many passes over the data instead of --steps (--paper fine-tuning: Table 6)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"GLOBAL batch, split over ranks and --accum-steps (quick: {q['batch_size']}; "
                        f"--paper: {pp['batch_size']}, Sec. 5)")
    p.add_argument("--accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (quick: {q['lr']}; --paper: {pp['lr']})")
    p.add_argument("--warmup", type=int, default=None,
                   help=f"linear warm-up steps, at most 10%% of --steps (quick: {q['warmup']}; --paper: "
                        f"{pp['warmup']}, Sec. 5; fine-tuning: 10%% of the steps)")
    p.add_argument("--head-lr-mult", type=float, default=1.0,
                   help="lr multiplier of the task's freshly initialized head (ViLT: 10; 1: one lr for all)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip-grad", type=float, default=1.0, help="max gradient norm (0: off)")
    p.add_argument("--mlm-weight", type=float, default=0.25, help="Sec. 5: 0.25 for MLM")
    # -- shapes (defaults: quick / --paper)
    p.add_argument("--image-size", type=int, default=None, help="quick: 32; --paper: 224 (Sec. 5), Table 6 per task")
    p.add_argument("--patch-size", type=int, default=None, help="quick: 8; --paper: 16")
    p.add_argument("--depth", type=int, default=None, help="N layers (quick: 4; --paper: 12, Sec. 3)")
    p.add_argument("--fusion-layers", type=int, default=None, help="M top layers with VL experts (Sec. 3: 2)")
    p.add_argument("--max-len", type=int, default=None, help="text tokens (Sec. 5: 40)")
    # -- data
    p.add_argument("--data", default="synthetic",
                   help="'synthetic', or real training data: image-text .jsonl / Karpathy .json (pretrain, "
                        "retrieval), VQA v2 questions .json (+ --annotations), NLVR2 .jsonl, an ImageFolder ROOT "
                        "(cls: ROOT/train, ROOT/val) or an ADE20k ROOT (seg: ROOT/images, ROOT/annotations)")
    p.add_argument("--annotations", default=None, help="VQA v2 annotations JSON of --data (with --task vqa)")
    p.add_argument("--image-root", default=None, help="folder of --data's images (default: --data's folder)")
    p.add_argument("--eval-data", default=None,
                   help="real evaluation data: a Karpathy JSON (its --eval-split; default --data when that is one), "
                        "VQA v2 questions, NLVR2 dev / test-P .jsonl; cls / seg: a ROOT (default --data)")
    p.add_argument("--eval-annotations", default=None,
                   help="VQA v2 annotations of --eval-data (none: test-dev, write --predictions)")
    p.add_argument("--eval-image-root", default=None, help="folder of --eval-data's images (default: --image-root)")
    p.add_argument("--predictions", default=None,
                   help="VQA: write the answers here in the official submission format "
                        "[{\"question_id\": int, \"answer\": str}, ...]")
    p.add_argument("--randaugment", default="auto", choices=["auto", "on", "off"],
                   help="Sec. 5 RandAugment on training images; auto = on for real data, off for the synthetic world")
    p.add_argument("--vocab", default=None, help="BERT vocab.txt (real data)")
    p.add_argument("--world-seed", type=int, default=0, help="seed of the synthetic world")
    p.add_argument("--eval-split", default="test", choices=["val", "test"],
                   help="synthetic world / Karpathy JSON split that is scored (COCO 5k and Flickr30k 1k: test)")
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


def run(argv=None) -> dict:
    """`train.py` itself: the flags -> data, model (fresh or --init) -> `fit`. Returns the final metrics."""
    args = parse_args(argv)
    ckpt = load_checkpoint(args.init) if args.init else None
    if ckpt:
        check_arch(ckpt, args, args.init, same_variant=False)
    train_set, eval_set, tokenizer, sizes = make_data(args, args.task, answers=(ckpt or {}).get("answers"))
    if args.eval_only and eval_set is None:
        raise ValueError(f"--eval-only: no evaluation data for --task {args.task} (give --eval-data)")
    torch.manual_seed(args.seed)  # fresh weights (and heads new to a task) follow --seed, the same on every rank
    # image-only real data (cls, seg) needs no tokenizer: the word embedding keeps the checkpoint's size
    vocab_size = len(tokenizer) if tokenizer else (ckpt or {}).get("config", {}).get("vocab_size", 30522)
    model = model_from_args(args, vocab_size=vocab_size, **sizes)
    if ckpt:
        fresh = transfer_weights(model, ckpt["model"], ckpt.get("variant"))
        if args.eval_only:
            require_heads(args.task, fresh, args.init)
    elif args.eval_only:
        raise ValueError("--eval-only scores a checkpoint: give --init CKPT")
    return fit(args, model, train_set, eval_set, tokenizer)


def parse_args(argv=None):
    """The flags, with the profile's defaults filled in and checked."""
    args = resolve_defaults(build_parser().parse_args(argv))
    check_args(args)
    return args


def fit(args, model, train_set, eval_set=None, tokenizer=None) -> dict:
    """Train `model` in place on `train_set` as `args` say, then evaluate on `eval_set` (rank 0).

    The one training loop of the project: train.py, every recipe stage and every expert of the temporal
    grid go through it. Each call starts a fresh AdamW and a fresh warm-up + cosine schedule (or resumes
    both from OUT/ckpt.pt with --resume). Writes OUT/{args.json, log.jsonl, ckpt.pt, metrics.json}."""
    started = time.time()
    rank, world, device = setup_distributed(args)
    master = rank == 0
    malloc_mode("reuse")  # CPU steps reuse their activations' pages instead of faulting them in every step
    torch.manual_seed(args.seed + rank)  # each rank its own stream: its own hard negatives, its own dropout
    random.seed(args.seed + rank)
    if args.epochs and train_set is not None:
        args.steps = max(1, math.ceil(args.epochs * len(train_set) / args.batch_size))
    micro = micro_batch_size(args, world)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    model.to(device)
    # image-only tasks on real files (cls, seg without --vocab) have no tokenizer and never tokenize: the
    # collator still wants one, and the synthetic world's small one serves
    collate_train, collate_eval = collators(args, tokenizer or data.SyntheticWorld().tokenizer())
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    if args.eval_only:
        return finish(model, args, eval_set, collate_eval, autocast, master, 0, started)

    objective = Objective(model, args.mlm_weight).to(device)
    resumed = load_resume(args, model, ckpt_path)
    start = resumed["step"] if resumed else 0
    with autocast, out_of_memory_hint(args, micro, world):
        probe = next(batch_stream(train_set, collate_train, args, micro, rank, world, 0, device))
        frozen = freeze_unused(objective, probe)
    optimizer, scheduler, scaler = make_optimizer(args, model, device)
    if resumed:
        for name, thing in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
            thing.load_state_dict(resumed[name])
        set_rng_state(rank_rng_state(resumed["rng"], rank, world, ckpt_path))
    if master:
        write_json(os.path.join(args.out, "args.json"), vars(args) | {"frozen_parameters": frozen})
    runner = torch.compile(objective) if args.compile else objective
    if world > 1:
        runner = DDP(runner, device_ids=[device.index] if device.type == "cuda" else None)
    stream = batch_stream(train_set, collate_train, args, micro, rank, world, start, device)

    log = open(os.path.join(args.out, "log.jsonl"), "a") if master else None
    bar = tqdm(total=args.steps, initial=start, disable=not master or args.quiet, desc=f"{args.task} {args.variant}")
    meter = Meter()
    for step in range(start + 1, args.steps + 1):  # `step` = optimizer steps done after this iteration
        last_step = step == args.steps
        train_step(runner, stream, optimizer, scheduler, scaler, autocast, args, meter)
        if step % args.log_every == 0 or last_step:
            record = meter.flush(step, scheduler.get_last_lr()[0], world)  # the only host sync
            if master:
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{record['loss']:.3f}", sps=f"{record['samples_per_s']:.0f}")
        bar.update(1)
        if args.eval_every and step % args.eval_every == 0 and not last_step and master and eval_set is not None:
            metrics = evaluate(model, args.task, eval_set, collate_eval, args.eval_batch_size, autocast)
            log.write(json.dumps({"step": step, "eval": metrics}) + "\n")
        if step % args.save_every == 0 or last_step or step in args.keep_at:
            rngs = gather_rng_states(world)  # every rank's own, so a resume restores each rank's stream
            if master:
                checkpoint = checkpoint_dict(model, args, step, optimizer, scheduler, scaler, rngs) | labels(train_set)
                save_checkpoint(ckpt_path, checkpoint)
                if step in args.keep_at:
                    save_checkpoint(snapshot_path(args.out, step), checkpoint)
            barrier()
    bar.close()
    if log:
        log.close()
    return finish(model, args, eval_set, collate_eval, autocast, master, args.steps, started)


def train_step(runner, stream, optimizer, scheduler, scaler, autocast, args, meter):
    """One optimizer step over --accum-steps micro-batches."""
    ddp = isinstance(runner, DDP)
    for micro in range(args.accum_steps):
        batch = next(stream)
        # DDP: all-reduce gradients only on the last micro-step. ITC negatives come from this micro-batch.
        sync = micro == args.accum_steps - 1 or not ddp
        with (contextlib.nullcontext() if sync else runner.no_sync()), autocast:
            loss, parts = runner(batch)
        # Gradients add up over micro-steps; dividing makes them the gradient of the mean over the whole
        # batch, the same as one step on the full batch (a test checks this).
        scaler.scale(loss / args.accum_steps).backward()
        meter.add({"loss": loss.detach(), **parts}, args.accum_steps, batch["images"].shape[0])
    if args.clip_grad > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_([p for group in optimizer.param_groups for p in group["params"]], args.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


class Meter:
    """Running sums of the logged losses, kept on the device until `flush` (no per-step host sync)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.sums, self.steps, self.samples, self.t0 = {}, 0.0, 0, time.time()

    def add(self, parts, accum_steps, samples):
        for k, v in parts.items():
            self.sums[k] = self.sums.get(k, 0) + v / accum_steps
        self.steps += 1 / accum_steps
        self.samples += samples

    def flush(self, step, lr, world) -> dict:
        record = reduce_logs(self.sums, round(self.steps))
        record |= {"step": step, "lr": lr, "samples_per_s": self.samples * world / (time.time() - self.t0)}
        self.reset()
        return record


# -- the pieces of `fit`, in the order it uses them -----------------------------------------------

def malloc_mode(mode: str):
    """How glibc serves large CPU tensors; a no-op where the C library is not glibc.

    "reuse" (training, and bench's timings): blocks up to 32 MiB come from the heap and freed memory stays
    there. glibc's defaults give freed memory back to the kernel at the top of the heap and map the larger
    blocks afresh, so every step faulted its activations in again: a tiny-preset pre-training step took 46 000
    minor page faults and 371 ms, and 0 faults and 304 ms in this mode (README, "The tiny recipe's wall time").
    The resident set then stays at its peak instead of breathing, which the peak already allowed.
    "measure" (bench's PeakMemory): the free lists go back to the system and every block over 128 KiB is its
    own mapping, so the resident set rises and falls with what is allocated."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if mode == "measure":
        libc.malloc_trim(0)
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 17)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 17)
    elif mode == "reuse":
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 25)        # glibc's largest allowed value on 64-bit
        libc.mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)  # mallopt takes a C int: 1 << 62 would wrap to 0
    else:
        raise ValueError(f"malloc_mode: unknown mode {mode!r} (reuse, measure)")


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


def micro_batch_size(args, world: int) -> int:
    """--batch-size is the global batch (Sec. 5: 1024 in all): each rank runs batch / (ranks · accum) per micro-step."""
    share = world * args.accum_steps
    if args.batch_size % share:
        raise ValueError(f"--batch-size {args.batch_size} does not split over {world} rank(s) x "
                         f"--accum-steps {args.accum_steps}: give a multiple of {share}")
    return args.batch_size // share


def collators(args, tokenizer):
    # RandAugment (Sec. 5) on real photos; not on the synthetic world, whose captions name exact colours
    # and quadrants that solarize / translate would falsify. MLM masks follow --seed.
    augment = args.randaugment == "on" or (args.randaugment == "auto" and args.data != "synthetic")
    train_collate = data.Collator(tokenizer, max_len=args.max_len, image_size=args.image_size, train=True,
                                  mlm_prob=0.15, randaugment=augment, seed=args.seed)
    eval_collate = data.Collator(tokenizer, max_len=args.max_len, image_size=args.image_size, train=False)
    return train_collate, eval_collate


def load_resume(args, model, ckpt_path):
    """--resume: OUT/ckpt.pt's weights into `model`; the checkpoint (for optimizer, schedule, RNG) or None."""
    if not args.resume:
        return None
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(f"--resume: {ckpt_path} does not exist")
    ckpt = load_checkpoint(ckpt_path)
    check_arch(ckpt, args, ckpt_path, same_variant=True)
    model.load_state_dict(ckpt["model"], strict=True)
    return ckpt


@contextlib.contextmanager
def out_of_memory_hint(args, micro, world):
    """A batch that does not fit stops with the numbers to change, not a bare CUDA trace."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise MemoryError(
            f"out of GPU memory in the first step: {micro} samples per rank per micro-step (--batch-size "
            f"{args.batch_size} over {world} rank(s) x --accum-steps {args.accum_steps}) at --image-size "
            f"{args.image_size}. Raise --accum-steps (same global batch, less memory), or lower --batch-size "
            f"or --image-size") from None


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


def make_optimizer(args, model, device):
    """AdamW (β2 = 0.98, as BEiT / VLMo) without decay on biases, norms and the temperature; linear warm-up
    then cosine decay to zero; a GradScaler that only acts under fp16. The task's own head (one that
    pre-training never trains, `task_only_heads`) learns at --head-lr-mult × --lr, as ViLT's lr_mult."""
    heads = task_only_heads(model.cfg.task) if args.head_lr_mult != 1 else ()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if (p.ndim >= 2) == decay and (n.split(".")[0] in heads) == head],
               "weight_decay": args.weight_decay if decay else 0.0, "lr": args.lr * (args.head_lr_mult if head else 1)}
              for head in (False, True) for decay in (True, False)]
    groups = [g for g in groups if g["params"]]  # without a multiplier: the two groups of before (resumable)
    # fused: one kernel for every tensor, on the CPU too (7.8 -> 3.6 ms a step for the tiny msa's 4.7M parameters)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), fused=True)
    warmup = args.steps // 10 if args.warmup is None else min(args.warmup, args.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(warmup, args.steps))
    return optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")


def task_only_heads(task):
    """The heads `task` builds that no pre-trained checkpoint has (model.HEADS minus pre-training's): they
    start from random weights, so a fine-tuning lr sized for the pre-trained backbone moves them too slowly."""
    return tuple(h for h in HEADS[task] if h not in HEADS["pretrain"])


def lr_lambda(warmup, steps):
    """Linear warmup to the peak, then cosine decay to zero."""
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))
    return f


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def gather_rng_states(world):
    """[rank 0's RNG state, rank 1's, ...] (a collective: every rank calls it)."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def rank_rng_state(states, rank, world, path):
    """This rank's RNG state from a checkpoint's list (an old single-state checkpoint serves every rank)."""
    if isinstance(states, dict):
        return states
    if len(states) != world:
        raise ValueError(f"{path} was written by {len(states)} rank(s); resume it with the same number, not {world}")
    return states[rank]


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_args(args):
    for flag in ("steps", "batch_size", "accum_steps", "save_every", "log_every"):
        if flag == "steps" and args.epochs:  # set from the data size in `fit`
            continue
        if getattr(args, flag) <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.lr <= 0:
        raise ValueError(f"--lr must be positive, got {args.lr}")
    if args.epochs is not None and args.epochs <= 0:
        raise ValueError(f"--epochs must be positive, got {args.epochs}")
    if args.keep_at and args.epochs:
        raise ValueError("--keep-at names steps: give --steps, not --epochs")
    if any(not 0 < k <= args.steps for k in args.keep_at):
        raise ValueError(f"--keep-at {args.keep_at}: every step must lie in 1..--steps ({args.steps})")
    if args.predictions and args.task != "vqa":
        raise ValueError(f"--predictions writes VQA answers (the submission format), not --task {args.task}")
    if args.resume and args.init:
        raise ValueError("--resume continues OUT/ckpt.pt; --init starts a new run: give one of them")
    if args.init and not os.path.isfile(args.init):
        raise FileNotFoundError(f"--init {args.init}: no such file")


def model_from_args(args, vocab_size, **sizes) -> VLTransformer:
    """The model the flags describe (fresh weights)."""
    return build_model(args.arch, args.variant, args.task, vocab_size=vocab_size, image_size=args.image_size,
                       patch_size=args.patch_size, depth=args.depth, fusion_layers=args.fusion_layers,
                       max_text_len=args.max_len, **sizes)


def check_arch(ckpt, args, path, same_variant):
    for field in ("arch",) + (("variant", "task") if same_variant else ()):
        if field in ckpt and ckpt[field] != getattr(args, field):
            raise ValueError(f"checkpoint {path} is {field} {ckpt[field]!r}, but --{field} is {getattr(args, field)!r}")


def checkpoint_dict(model, args, step, optimizer, scheduler, scaler, rngs):
    return {"model": model.state_dict(), "config": dataclasses.asdict(model.cfg), "arch": args.arch,
            "variant": model.cfg.variant, "task": model.cfg.task, "step": step,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "rng": rngs, "args": vars(args)}


def labels(dataset) -> dict:
    """What the head's outputs mean, kept in the checkpoint: VQA's answer vocabulary, the classes' names."""
    return {key: list(getattr(dataset, key)) for key in ("answers", "classes") if hasattr(dataset, key)}


def print_table(metrics: dict, title: str):
    rows = "\n".join(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items())
    print(f"\n**{title}**\n\n| metric | value |\n|---|---|\n{rows}\n")


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


def finish(model, args, eval_set, collate_eval, autocast, master, step, started):
    """Evaluate on rank 0, print a Markdown table, write metrics.json (atomically)."""
    metrics = {}
    if master and eval_set is not None:
        metrics = evaluate(model, args.task, eval_set, collate_eval, args.eval_batch_size, autocast,
                           predictions=args.predictions)
        metrics["step"] = step
        metrics["seconds"] = time.time() - started  # wall time of this run, evaluation included
        write_json(os.path.join(args.out, "metrics.json"), metrics)
        if not args.quiet:
            print_table(metrics, f"{args.task} · {args.variant} · {args.out}")
    barrier()
    return metrics


def main(argv=None):
    try:
        run(argv)
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError, MemoryError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
