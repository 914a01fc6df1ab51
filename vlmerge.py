"""vlmerge: the paper's recipe end to end, merging over time, and the tools around them (Sung et al. 2023,
Fig. 1; Dziadzio et al. 2025).

    python vlmerge.py recipe --preset tiny            # pre-train, merge, fine-tune, evaluate, REPORT.md
    python vlmerge.py temporal --preset tiny --grid   # init × deploy × technique over a task stream, TEMPORAL.md
    python vlmerge.py merge CKPT --method interpolation --alpha 0.75 -o merged.pt
    python vlmerge.py distance CKPT [CKPT2] [--init-state W0]  # L2, cosine, SSD, TSSD (Sec. 7), per layer
    python vlmerge.py eval CKPT --task vqa            # + --eval-data / --eval-annotations: real files
    python vlmerge.py bench --quick                   # speed and memory vs references

The recipe (`recipe`), stage by stage -- each stage is an ordinary train.py run or a merge, its
output under OUT/<stage>/ with a record of what it was made from (its flags and the content of its input
files). A stage is reused when that record matches, so an interrupted recipe resumes; a stage whose flags or
parent changed is made anew, and so is everything downstream of it:
  0. init      the shared starting point W⁰, a timm-format ViT file loaded through model.load_vit_weights:
               the paper uses BEiT (`--init`, required by `paper`); stage 0 stands in for it by training a
               plain ViT on the synthetic images (shape classification, `init_steps`; `smoke` runs it); `tiny`
               saves a random ViT instead (init_steps=0): every image-only W⁰ we built slows VL learning at
               that scale (README, "Departures", has the measurements).
  1. Table 1   maa and msa pre-trained from W⁰; the merging baseline = that msa, interpolated α=0.5.
  2. Fig. 3    seed pre-training: maa for K_seed steps, then msa from it for K_VL, K_seed + K_VL = K.
               The maa seeds are snapshots of the maa run of step 1 at step K_seed (train.py --keep-at):
               one maa run serves the whole sweep. With --seeds N, steps 1-2 run once per pre-training
               seed (seed s > 0 under OUT/s<s>/) and Table 1, Fig. 3, Table 5 report mean ± std.
  3. Table 2   the default seeded msa merged by interpolation (α), modality arithmetic (λ), RegMean (γ);
           3b  every merged model scored right away by zero-shot retrieval (ITC), before fine-tuning,
               on test (reported) and on val (selection: α, λ, γ and the best method -> `ours`).
  4. Tables 1-3 fine-tuning on VQA, retrieval (and NLVR2 / classification / segmentation by preset).
     4b Fig. 4 the shared-weight variants through the same seed -> VL -> merge (val-chosen α) -> fine-tune.
  5. Table 5   L2 / cosine / SSD / TSSD between the vision and language experts of each msa, on the
               weights and on the modality vectors τ_m = W_m − W⁰, the merge drop, and the Pearson
               correlation of each metric with the drop over every (seed, K_seed) point (Fisher-z interval,
               range leaving one point out).

Merging over time (`temporal`): a base maa θ_0, then T tasks; per task, TIME's init phase picks the weights
the expert starts from, train.fit trains it, it is stored, the deploy phase picks the shipped weights, and
those are scored on every task and on a retention set. `--grid` runs every cell of the paper's grid and the
findings T1–T6; see run_temporal.

How this file reads, top down: presets and the paper's numbers; the recipe (Recipe, its stage cache, run_recipe);
its report; its statistics and distances; merging a checkpoint file (shared with the `merge` command); merging
over time (run_temporal, then its stages, metrics and report); bench and its timing machinery (paired timing,
peak memory, FLOP counts); the other commands and the command line.
"""
import argparse
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from typing import NamedTuple

import torch
from tqdm import tqdm

import data
import merge
import train
import model as model_lib
from model import ARCHS, VARIANTS, build_model, is_backbone_key


# ----------------------------------------------------------------------------------------------
# Presets: one small dataclass, three instances.

@dataclasses.dataclass
class Preset:
    arch: str = "vit_tiny"
    depth: int = 12
    fusion_layers: int = 2
    image_size: int = 224
    patch_size: int = 16
    max_len: int = 40              # Sec. 5; the synthetic world's texts take up to 31 (data.py: "Text length")
    batch_size: int = 1024
    lr: float = 2e-4
    precision: str = "bf16"
    init_steps: int | None = None  # stage 0: image-only pre-training steps (0: random W⁰; None: --init needed)
    pretrain_steps: int = 200_000  # K = K_seed + K_VL (Sec. 4.3)
    seed_fracs: tuple = (0.25, 0.5, 0.75)  # K_seed / K (Fig. 3: 50k, 100k, 150k of 200k)
    default_frac: float = 0.5      # Sec. 6.1: K_seed = K_VL is the recipe
    alphas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    lams: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    gammas: tuple = (0.0, 0.25, 0.5, 0.75, 1.0)
    gram_samples: int = 512        # RegMean: pre-training samples whose linear-layer inputs make the Grams
    # task -> fine-tuning steps (at batch_size, finetune_lr), or None: train.py --paper's Table 6 schedule
    finetune: dict = dataclasses.field(default_factory=lambda: {"vqa": 1000, "retrieval": 1000})
    finetune_lr: float = 1e-4
    finetune_task_lr: dict = dataclasses.field(default_factory=dict)  # task -> lr, where it is not finetune_lr
    finetune_head_lr_mult: float = 1.0  # lr multiplier of a task's freshly initialized head (train.py --head-lr-mult)
    finetune_seeds: int = 1        # >1: the spread of one number over fine-tuning seeds
    finetune_sweeps: bool = True   # fine-tune every Table 2 point on VQA (the paper's protocol)
    ablation: bool = True          # Fig. 4: custom_attn / custom_ffn / custom_ln
    eval_split: str = "test"
    data: dict = dataclasses.field(default_factory=dict)  # task -> real-format file ('paper')


PRESETS = {
    # every stage, a few steps each: the test suite runs this (a few minutes on 2 CPU cores)
    "smoke": Preset(depth=2, fusion_layers=1, image_size=32, patch_size=8, max_len=32, batch_size=16, lr=1e-3,
                    precision="fp32", init_steps=4, pretrain_steps=6, seed_fracs=(0.5,), gram_samples=32,
                    alphas=(0.0, 0.5, 1.0), lams=(0.5, 1.0), gammas=(0.5, 1.0),
                    finetune={"vqa": 3, "retrieval": 3, "nlvr2": 2, "cls": 2, "seg": 2}, finetune_lr=1e-3,
                    finetune_seeds=2, finetune_sweeps=True),
    # the README's headline reproduction: 13 min wall on 2 CPU cores, 35 min with --seeds 3 (README, "Results");
    # K_seed/K = 0.875 costs 38 msa steps and makes 5 points per pre-training seed for Table 5's r (15 with
    # --seeds 3); VQA: 300 steps at its own lr with a 10x head (at 150 steps and 5e-4 it collapsed to one answer)
    # init_steps=0: a random W⁰, because every image-only W⁰ we built (classification, multi-label,
    # masked-image) costs ~700 VL steps of warm-start, more than tiny's 300 (README, "Departures"); smoke
    # runs stage 0
    "tiny": Preset(depth=4, fusion_layers=2, image_size=32, patch_size=8, max_len=32, batch_size=64, lr=5e-4,
                   precision="bf16", init_steps=0, pretrain_steps=300, seed_fracs=(0.25, 0.5, 0.75, 0.875),
                   gram_samples=512, finetune={"vqa": 300, "retrieval": 100}, finetune_lr=5e-4,
                   # VQA: 150 steps at 5e-4 collapsed to one answer (notes in README, "tiny results"); a 10x lr
                   # for the fresh answer head, a gentler 2e-4 for the backbone and 300 steps get past the prior
                   finetune_task_lr={"vqa": 2e-4}, finetune_head_lr_mult=10.0,
                   finetune_seeds=3, finetune_sweeps=False, ablation=False),
    # Sec. 5 / Table 6: ViT-B/16 at 224 px, batch 1024, 200k steps; real data; GPUs via torchrun
    "paper": Preset(arch="vit_base", init_steps=None, gram_samples=65_536,
                    finetune=dict.fromkeys(("vqa", "retrieval", "nlvr2", "cls", "seg")),  # Table 6, per task
                    finetune_seeds=1, ablation=True),
}

# The paper's numbers, beside which ours are reported (Tables 1, 2, 3, 5).
PAPER = {
    "table1": {"maa": [73.94, 83.91, 72.23], "msa": [75.14, 86.46, 74.67], "merging_baseline": [70.89, 77.38, 65.43]},
    "table2": {
        "interpolation": {0.0: [68.58, 75.25, 62.64], 0.25: [72.40, 81.34, 69.29], 0.5: [73.59, 83.64, 71.77],
                          0.75: [73.91, 83.83, 72.30], 1.0: [73.15, 82.75, 71.25]},
        "modality_arithmetic": {0.0: [73.44, 83.27, 70.84], 0.25: [73.85, 83.56, 71.61], 0.5: [73.59, 83.64, 71.77],
                                0.75: [72.49, 80.22, 68.51], 1.0: [69.49, 73.94, 62.07]},
        "regmean": {0.0: [74.14, 83.73, 72.03], 0.25: [74.17, 83.64, 72.20], 0.5: [74.13, 83.80, 72.18],
                    0.75: [74.07, 83.80, 72.18], 1.0: [74.15, 83.71, 72.25]},
    },
    "table3": {"msa": [79.71, 83.25, 49.85], "maa": [78.39, 82.78, 48.65], "merging_baseline": [52.55, 82.90, 46.80],
               "ours": [77.54, 83.00, 50.14]},  # NLVR2 acc, ImageNet top-1, ADE20k mIoU
    "table5": {"k_seed": ["0", "50k", "100k", "150k"], "l2": [580.6, 496.8, 388.5, 284.6, 0.881],
               "cosine": [0.371, 0.264, 0.163, 0.098, 0.938], "ssd": [0.198, 0.161, 0.125, 0.104, 0.939],
               "tssd": [0.066, 0.037, 0.015, 0.006, 0.971], "drop": [9.16, 4.50, 2.80, 2.60]},
}
GRAM_BATCH = 64  # samples per forward while collecting Grams (memory only: the Grams are sums over samples)
METRICS = {"l2": merge.l2_distance, "cosine": merge.cosine_dissimilarity, "ssd": merge.ssd, "tssd": merge.tssd}
# the Table 2 sweeps: method -> (its option, the preset field of its values, its symbol)
SWEEPS = {"interpolation": ("alpha", "alphas", "α"), "modality_arithmetic": ("lam", "lams", "λ"),
          "regmean": ("gamma", "gammas", "γ")}
TABLE5_METRICS = [*METRICS, *(f"tau_{m}" for m in METRICS)]  # on the weights W_m, and on τ_m = W_m − W⁰


def fmt(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


# ----------------------------------------------------------------------------------------------
# The recipe.

@dataclasses.dataclass
class Model:
    """One model of the recipe, as results.json keeps it under "models"[name]. A merge names the model it was
    merged from (`source`), its `method` and option `value`; `w0` names the model every expert started from
    (W⁰ of modality arithmetic and of the τ distances)."""
    name: str
    ckpt: str
    variant: str
    w0: str | None = None
    source: str | None = None
    method: str | None = None
    value: float | None = None
    zero_shot: dict = dataclasses.field(default_factory=dict)      # test split: what the tables report
    zero_shot_val: dict = dataclasses.field(default_factory=dict)  # val split: what selection reads
    finetune: dict = dataclasses.field(default_factory=dict)       # task -> [metrics of each fine-tuning seed]


def merges_of(models: dict, source: str, method: str) -> dict:
    """{option value: model} of the merges of `source` by `method`; models as results.json keeps them."""
    return {m["value"]: m for m in models.values() if m["source"] == source and m["method"] == method}


@functools.lru_cache(maxsize=None)
def _digest(path, size, mtime_ns):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()[:16]


def fingerprint(path) -> str:
    """A file's content hash (computed once per size and mtime): what the stage cache compares. Content, not
    mtime, so that a copied run directory is still a valid cache."""
    st = os.stat(path)
    return _digest(os.path.abspath(path), st.st_size, st.st_mtime_ns)


class Recipe:
    """Runs the stages of the module docstring, caching each under OUT/<stage>/.

    The cache knows what each output was made from (`made_from`: the command line and the content of every
    file it read, kept beside it). An output made from anything else -- other flags, a parent stage that ran
    again -- is removed and made anew, and so is everything downstream of it, whose parent file has changed."""

    def __init__(self, preset: Preset, out: str, init=None, dry_run=False, seeds=1):
        self.p, self.out, self.init, self.dry_run, self.seeds = preset, out, init, dry_run, seeds
        self.plan = []  # the train.py command lines, for --dry-run and the report
        self.models: dict[str, Model] = {}
        self.seconds = {}  # stage -> seconds of the train.py run that made it (reused runs included)
        self.gram_cache = {}  # model name -> RegMean's Gram matrices
        os.makedirs(out, exist_ok=True)

    # -- running one stage, and the cache ---------------------------------------------------------
    def flags(self, task="pretrain", image_size=True):
        """The shape and data flags of a stage; image_size=False leaves the size to train.py's profile
        (Table 6 fine-tunes at 384 / 480 px: the position embedding is resized on loading)."""
        p = self.p
        size = ["--image-size", str(p.image_size)] if image_size else []
        return ["--arch", p.arch, "--depth", str(p.depth), "--fusion-layers", str(p.fusion_layers), *size,
                "--patch-size", str(p.patch_size), "--max-len", str(p.max_len),
                "--precision", p.precision, "--eval-split", p.eval_split, "--quiet", *p.data.get(task, [])]

    def made_from(self, argv, **extra) -> dict:
        """What an output is made from: a command line (paths under OUT written relative to it, so the run
        directory may move) and the content of every file it names."""
        rel = lambda a: "OUT/" + os.path.relpath(a, self.out) if a.startswith(self.out + os.sep) else a  # noqa: E731
        return {"argv": [rel(a) for a in argv], **extra,
                "inputs": {rel(a): fingerprint(a) for a in argv if os.path.isfile(a)}}

    def cached(self, output, record, made_from) -> bool:
        """Whether `output` exists and its `record` says it was made from `made_from`. If not, the stale
        output is reported and removed (the caller makes it anew)."""
        if not os.path.exists(output):
            return False
        old = json.load(open(record)) if os.path.exists(record) else None
        if old == made_from:
            return True
        changed = "no record of its inputs" if old is None else ", ".join(
            k for k in made_from if old.get(k) != made_from[k]) + " changed"
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # ranks would race to remove and re-make it
            raise ValueError(f"recipe: {output} is stale ({changed}); re-make stale stages with one process "
                             f"(python vlmerge.py recipe ...), then resume under torchrun")
        print(f"recipe: re-making {output} ({changed})", file=sys.stderr)
        os.remove(output)
        return False

    def stage(self, name, argv) -> dict:
        """One train.py run under OUT/name, reused when its metrics.json was made from the same inputs."""
        out = os.path.join(self.out, name)
        argv = argv + ["--out", out]
        self.plan.append("python train.py " + " ".join(argv))
        if self.dry_run:
            build_only(argv)
            return {}
        made_from, record = self.made_from(argv), os.path.join(out, "made_from.json")
        metrics_path = os.path.join(out, "metrics.json")
        if not self.cached(metrics_path, record, made_from):
            shutil.rmtree(out, ignore_errors=True)  # a stale run's log, checkpoints and snapshots go with it
            train.run(argv)
            train.write_json(record, made_from)
        with open(metrics_path) as f:
            metrics = json.load(f)
        self.seconds[name] = metrics.get("seconds", 0.0)
        return metrics

    def batch(self):
        """The preset's batch is global (Sec. 5: 1024); train.py splits it over the ranks under torchrun."""
        return str(self.p.batch_size)

    def ckpt(self, name):
        return os.path.join(self.out, name, "ckpt.pt")

    def add(self, name, ckpt, variant, **fields) -> str:
        self.models[name] = Model(name, ckpt, variant, **fields)
        return name

    # -- stage 0: the image-only initialization W⁰ ------------------------------------------------
    def initialization(self) -> str:
        """W⁰, a timm-format ViT file that every model of the recipe loads: --init, else stage 0 --
        image-only pre-training for init_steps, or with init_steps=0 a random init (saved all the same,
        so that maa, msa and the seeds still start from one and the same W⁰)."""
        if self.init:
            self.add("init_vit", self.init, "maa")
            return self.init
        if self.p.init_steps is None:
            raise ValueError("preset needs --init PATH (a timm-format ViT, e.g. BEiT converted): it has no stage 0")
        path = os.path.join(self.out, "init_vit", "vit.pt")
        self.add("init_vit", path, "maa")
        if self.p.init_steps > 0:
            self.stage("init_vit", self.flags("cls") + [
                "--task", "cls", "--variant", "maa", "--steps", str(self.p.init_steps),
                "--batch-size", self.batch(), "--lr", str(self.p.lr)])
        if self.dry_run:
            return path
        parent = [self.ckpt("init_vit")] if self.p.init_steps > 0 else []
        made_from = self.made_from(parent, stage0=self.flags("cls") + ["--steps", str(self.p.init_steps)])
        if self.cached(path, path + ".json", made_from):
            return path
        if self.p.init_steps > 0:
            state = train.load_checkpoint(self.ckpt("init_vit"))["model"]
        else:
            torch.manual_seed(0)
            state = build_model(self.p.arch, "maa", "pretrain", vocab_size=2, image_size=self.p.image_size,
                                patch_size=self.p.patch_size, depth=self.p.depth,
                                fusion_layers=self.p.fusion_layers).state_dict()
        # maa keys are timm's keys: keep the backbone, rename a classifier to timm's `head`
        vit = {k: v for k, v in state.items() if is_backbone_key(k)}
        vit |= {"head." + k.split(".")[-1]: v for k, v in state.items() if k.startswith("cls_head.")}
        train.save_checkpoint(path, vit)
        train.write_json(path + ".json", made_from)
        return path

    # -- stages 1-2: pre-training ------------------------------------------------------------------
    def pretraining(self, w0, seed) -> dict:
        """Stages 1-2 for one pre-training seed: maa (keeping the K_seed snapshots), msa, and the seeded msa of
        every K_seed, each msa merged with α = 0.5 (the merging baseline; Fig. 3, Table 5). Returns the names."""
        p, at = self.p, run_prefix(seed)
        fracs = sorted({*p.seed_fracs, p.default_frac})
        maa = self.pretrain(at + "maa", "maa", p.pretrain_steps, w0, seed, keep_at=[self.k_seed(f) for f in fracs])
        msa = self.pretrain(at + "msa", "msa", p.pretrain_steps, w0, seed, w0="init_vit")
        sweep = [{"frac": 0.0, "before": msa}] + [{"frac": f, "before": self.seeded("msa", f, seed)} for f in fracs]
        for point in sweep:
            point |= {"steps": self.k_seed(point["frac"]), "after": self.merged(point["before"], "interpolation", 0.5)}
        return {"seed": seed, "maa": maa, "msa": msa, "sweep": sweep}

    def pretrain(self, name, variant, steps, init, seed=0, keep_at=(), w0=None):
        extra = ["--keep-at", *map(str, keep_at)] if keep_at else []
        metrics = self.stage(name, self.flags() + ["--variant", variant, "--steps", str(steps), "--init", init,
                                                   "--batch-size", self.batch(), "--lr", str(self.p.lr),
                                                   "--seed", str(seed), *extra])
        return self.add(name, self.ckpt(name), variant, w0=w0, zero_shot=metrics)

    def k_seed(self, frac):
        return round(frac * self.p.pretrain_steps)

    def seeded(self, variant, frac, seed=0):
        """Seed pre-training (Sec. 4.3): maa for K_seed steps, then `variant` from it for K_VL = K - K_seed.

        The maa seed is the step-K_seed snapshot of the maa baseline run (kept with --keep-at), so the
        whole K_seed sweep costs one maa run instead of one per point. It is also the model's W⁰."""
        at, k_seed = run_prefix(seed), self.k_seed(frac)
        snapshot = train.snapshot_path(os.path.join(self.out, at + "maa"), k_seed)
        if not self.dry_run and not os.path.exists(snapshot):
            raise FileNotFoundError(f"{snapshot}: the maa run kept no snapshot at step {k_seed}; "
                                    f"delete {os.path.join(self.out, at + 'maa')} to re-run it with this preset")
        w0 = self.add(f"{at}seed{frac}", snapshot, "maa")
        return self.pretrain(f"{at}{variant}_seed{frac}", variant, self.p.pretrain_steps - k_seed, snapshot, seed,
                             w0=w0)

    # -- stage 3: merging -------------------------------------------------------------------------
    def merged(self, source, method, value):
        """Merge model `source` and score it zero-shot (3b). Returns the merged model's name."""
        option = SWEEPS[method][0]
        name = f"{source}~{method}{value}"  # a file name; the record says what it is
        if name in self.models:
            return name
        model = self.models[source]
        init = self.models[model.w0].ckpt if method == "modality_arithmetic" else None  # W_0 (Sec. 4.1)
        path = os.path.join(self.out, "merged", f"{name}.pt")
        self.plan.append(f"python vlmerge.py merge {model.ckpt} --method {method} --{option} {value} -o {path}")
        if not self.dry_run:
            grams = {"samples": self.p.gram_samples, "data": self.p.data.get("pretrain")} if method == "regmean" else {}
            made_from = self.made_from([model.ckpt] + ([init] if init else []), merge=[method, option, value], **grams)
            if not self.cached(path, path + ".json", made_from):
                os.makedirs(os.path.dirname(path), exist_ok=True)
                checkpoint = train.load_checkpoint(model.ckpt)
                w0 = train.load_checkpoint(init) if init else None
                grams = self.grams(source, checkpoint) if method == "regmean" else None
                train.save_checkpoint(path, merge_checkpoint(checkpoint, method, w0, grams, **{option: value}))
                train.write_json(path + ".json", made_from)
        self.add(name, path, "maa", source=source, method=method, value=value)
        # scored on test (the tables) and on val (model selection: select_on_val)
        for key, split in (("zero_shot", self.p.eval_split), ("zero_shot_val", "val")):
            setattr(self.models[name], key, self.stage(f"{key}/{name}", self.flags() + [
                "--variant", "maa", "--eval-only", "--init", path, "--eval-split", split]))
        return name

    def grams(self, source, checkpoint):
        """RegMean's Gram matrices of `source`, collected once (they do not depend on γ) on the run's device
        from the pre-training data of the preset (its data config), with that data's tokenizer."""
        if source not in self.gram_cache:
            batches = gram_batches(checkpoint, self.p.gram_samples, GRAM_BATCH, self.p.data.get("pretrain"))
            self.gram_cache[source] = checkpoint_grams(checkpoint, batches, default_device())
        return self.gram_cache[source]

    # -- stage 4: fine-tuning ---------------------------------------------------------------------
    def finetune(self, name, task, seed=0):
        model = self.models[name]
        steps = self.p.finetune[task]
        suffix = f"_s{seed}" if seed else ""
        common = ["--task", task, "--variant", model.variant, "--init", model.ckpt, "--seed", str(seed)]
        if steps is None:  # train.py --paper: Table 6's image size, lr, global batch and epochs for this task
            argv = self.flags(task, image_size=False) + common + ["--paper"]
        else:
            lr = self.p.finetune_task_lr.get(task, self.p.finetune_lr)
            argv = self.flags(task) + common + ["--steps", str(steps), "--batch-size", self.batch(), "--lr", str(lr),
                                                "--warmup", str(steps // 10),
                                                "--head-lr-mult", str(self.p.finetune_head_lr_mult)]
        metrics = self.stage(f"finetune/{task}/{name}{suffix}", argv)
        model.finetune.setdefault(task, []).append(metrics)
        return metrics

    # -- the whole pipeline -----------------------------------------------------------------------
    def run(self) -> dict:
        p = self.p
        w0 = self.initialization()
        # 1-2. Table 1's pre-trained models and Fig. 3's K_seed sweep, once per pre-training seed
        runs = [self.pretraining(w0, seed) for seed in range(self.seeds)]
        # 3. the three methods on the recipe's msa of the first seed (Table 2)
        ours = sweep_point(runs[0], p.default_frac)["before"]
        for method, (_, field, _) in SWEEPS.items():
            for value in getattr(p, field):
                self.merged(ours, method, value)
        # α, λ, γ and the method chosen on val (the paper's "α ≈ 0.75" would be a choice made on test)
        selection = {} if self.dry_run else select_on_val(self.records(), ours, dataclasses.asdict(p))
        chosen = selection["best"] if selection else {"method": "interpolation", "value": 0.75}
        method, value = chosen["method"], chosen["value"]
        alpha = selection["interpolation"]["value"] if selection else 0.75
        # 4. fine-tuning (Tables 1, 3): maa, msa, merging baseline, ours (the val choice) of every seed
        tables = [{"maa": run["maa"], "msa": run["msa"], "merging_baseline": run["sweep"][0]["after"],
                   "ours": self.merged(sweep_point(run, p.default_frac)["before"], method, value)} for run in runs]
        best = tables[0]["ours"]
        for task in p.finetune:  # Table 1's tasks on every seed, Table 3's on the first
            for name in (name for t in (tables if task in SPREAD else tables[:1]) for name in t.values()):
                self.finetune(name, task)
        for seed in range(1, p.finetune_seeds):           # seed-to-seed spread of the headline numbers
            for task in SPREAD:
                if task in p.finetune:
                    self.finetune(best, task, seed)
        sweeps = [m.name for m in self.models.values() if m.source == ours and m.name != best]
        for name in sweeps if p.finetune_sweeps and "vqa" in p.finetune else []:
            self.finetune(name, "vqa")                     # Table 2 after fine-tuning, as the paper reports
        # 4b. the shared-weight variants (Fig. 4)
        ablation = {}
        if p.ablation:
            for variant in ("custom_attn", "custom_ffn", "custom_ln"):
                before = self.seeded(variant, p.default_frac)
                after = self.merged(before, "interpolation", alpha)
                for name in (before, after):
                    self.finetune(name, "vqa")
                ablation[variant] = {"before": before, "after": after}
        ablation["msa"] = {"before": ours, "after": self.merged(ours, "interpolation", alpha)}
        for name in ablation["msa"].values() if "vqa" in p.finetune else []:
            if "vqa" not in self.models[name].finetune:
                self.finetune(name, "vqa")                 # the msa before merging (Fig. 4), after if not yet
        # 5. distances vs the merge drop over every (seed, K_seed) point (Table 5)
        table5 = self.distance_table(runs)
        return {"table": tables[0], "tables": tables, "sweeps": [run["sweep"] for run in runs],
                "ablation": ablation, "table5": table5, "selection": selection}

    def records(self) -> dict:
        """The models as results.json keeps them: name -> the fields of Model."""
        return {name: dataclasses.asdict(model) for name, model in self.models.items()}

    def distance_table(self, runs):
        """Table 5: the metrics between the v and l experts, on the weights and on τ_m = W_m − W⁰ (W⁰: what the
        msa started from), and the merge drop, for every (seed, K_seed) point; Pearson r with a 95% interval."""
        rows = {}
        for run in runs:
            for point in run["sweep"] if not self.dry_run else []:
                model, after = self.models[point["before"]], self.models[point["after"]]
                state = train.load_checkpoint(model.ckpt)["model"]
                init = train.load_checkpoint(self.models[model.w0].ckpt)["model"]
                drop = model.zero_shot["avg"] - after.zero_shot["avg"]
                rows[model.name] = {"seed": run["seed"], "frac": point["frac"], **distances(state, init_state=init),
                                    "drop": drop}
        drops = [r["drop"] for r in rows.values()]
        corr = {m: pearson([r[m] for r in rows.values()], drops) for m in TABLE5_METRICS}
        interval = {m: pearson_interval(r, len(rows)) for m, r in corr.items()}
        leave_one_out = {m: pearson_range([r[m] for r in rows.values()], drops) for m in TABLE5_METRICS}
        return {"rows": rows, "correlation": corr, "interval": interval, "leave_one_out": leave_one_out,
                "points": len(rows)}


def build_only(argv):
    """--dry-run: check a stage's flags and build its model (on the meta device: no memory)."""
    args = train.resolve_defaults(train.build_parser().parse_args(argv))  # not parse_args: no file is read
    with torch.device("meta"):
        train.model_from_args(args, vocab_size=30522)

def read_data_config(path, preset) -> dict:
    """--data-config: {task: [train.py data flags]} for pre-training and every task the preset fine-tunes
    (and "cls" when it has a stage 0). Each entry must name evaluation data, so that no stage is left
    without a score; a missing or score-less entry is one error naming the task."""
    config = data._read_json(path)  # a malformed file: one error naming its line
    tasks = ["pretrain", *preset.finetune] + (["cls"] if preset.init_steps else [])
    for task in dict.fromkeys(tasks):
        flags = config.get(task) if isinstance(config, dict) else None
        if not isinstance(flags, list) or not all(isinstance(f, str) for f in flags):
            raise ValueError(f"--data-config {path}: {task!r} needs a list of train.py flags (the preset runs "
                             f"{', '.join(dict.fromkeys(tasks))})")
        if not train.names_evaluation(train.parse_args(["--task", task, *flags])):
            raise ValueError(f"--data-config {path}: {task!r} names no evaluation data (--eval-data"
                             f"{', --eval-annotations' if task == 'vqa' else ''}): its stages would have no score")
    return config


def run_recipe(args) -> dict:
    preset = PRESETS[args.preset]
    if args.ablation:
        preset = dataclasses.replace(preset, ablation=True)
    if args.data_config:
        preset = dataclasses.replace(preset, data=read_data_config(args.data_config, preset))
    out = args.out or os.path.join("runs", f"recipe_{args.preset}")
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: give at least 1")
    recipe = Recipe(preset, out, init=args.init, dry_run=args.dry_run, seeds=args.seeds)
    start = time.time()
    layout = recipe.run()
    if args.dry_run:
        print("\n".join(recipe.plan))
        return {"plan": recipe.plan}
    results = {"preset_name": args.preset, "preset": dataclasses.asdict(preset), "paper": PAPER,
               "models": recipe.records(), **layout, "seconds": time.time() - start,
               # every train.py stage the results came from, reused ones included
               "stage_seconds": sum(recipe.seconds.values()),
               "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"}
    results["spread"] = spread(results["models"][layout["table"]["ours"]])
    results["over_seeds"] = over_seeds(results)
    results["findings"] = findings(results)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun, rank 0 writes the report
        return results
    train.write_json(os.path.join(out, "results.json"), results)
    report = write_report(json.loads(json.dumps(results)))  # exactly what results.json holds
    train.write_text(os.path.join(out, "REPORT.md"), report)
    plot_sweeps(results, os.path.join(out, "sweeps.png"))
    print(report)
    return results


# ----------------------------------------------------------------------------------------------
# The report: every number in it is read from results.json.

def first(model, task, key):
    runs = model.get("finetune", {}).get(task)
    return runs[0].get(key) if runs else None


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def stats(values) -> dict | None:
    """Mean and std over pre-training seeds (std None for one seed); None when no seed has the number."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def pm(st, show=fmt):
    """A cell: mean ± std over seeds, the mean alone for one seed."""
    if st is None:
        return "–"
    return show(st["mean"]) if st["std"] is None else f"{show(st['mean'])} ± {show(st['std'])}"


TABLE1_COLUMNS = {"vqa": ("vqa", "vqa_score"), "tr_avg": ("retrieval", "tr_avg"), "ir_avg": ("retrieval", "ir_avg")}


def over_seeds(r) -> dict:
    """Table 1, Fig. 3 and Table 5 as mean ± std over the pre-training seeds (what the report prints)."""
    m = r["models"]

    def cell(name, column):
        return m[name]["zero_shot"].get("avg") if column == "zero_shot" else first(m[name], *TABLE1_COLUMNS[column])
    table1 = {label: {c: stats([cell(t[label], c) for t in r["tables"]]) for c in [*TABLE1_COLUMNS, "zero_shot"]}
              for label in r["table"]}
    fig3 = []
    for i, point in enumerate(r["sweeps"][0]):
        before = [m[sweep[i]["before"]]["zero_shot"]["avg"] for sweep in r["sweeps"]]
        after = [m[sweep[i]["after"]]["zero_shot"]["avg"] for sweep in r["sweeps"]]
        fig3.append({"frac": point["frac"], "steps": point["steps"], "before": stats(before), "after": stats(after),
                     "drop": stats([b - a for b, a in zip(before, after)])})
    rows = list(r["table5"]["rows"].values())
    table5 = [{"frac": point["frac"], **{k: stats([row[k] for row in rows if row["frac"] == point["frac"]])
                                         for k in [*TABLE5_METRICS, "drop"]}} for point in r["sweeps"][0]]
    return {"seeds": len(r["tables"]), "table1": table1, "fig3": fig3, "table5": table5}


def seeds_note(r):
    n = r["over_seeds"]["seeds"]
    return f" Mean ± std over {n} pre-training seeds." if n > 1 else ""


def section_table1(r):
    rows = []
    for label, cells in r["over_seeds"]["table1"].items():
        paper = PAPER["table1"].get(label, [None] * 3)
        rows.append([label, *(pm(cells[c]) for c in [*TABLE1_COLUMNS, "zero_shot"]), *map(fmt, paper)])
    return "## Table 1 — merging a modality-specific model, with and without seed pre-training\n\n" + table(
        ["model", "VQA", "TR avg", "IR avg", "zero-shot R avg", "paper VQA", "paper TR", "paper IR"], rows) + \
        "\n\nVQA = VQA score of the fine-tuned model; TR/IR avg = mean of R@1/5/10 after retrieval fine-tuning; " \
        "zero-shot = mean of TR/IR avg of the pre-trained (or merged) model, before fine-tuning; ours = the merge " \
        "chosen on val (Table 2)." + seeds_note(r)


def section_fig3(r):
    rows = [[fmt(p["frac"]), p["steps"], pm(p["before"]), pm(p["after"]), pm(p["drop"])]
            for p in r["over_seeds"]["fig3"]]
    return "## Fig. 3 — the length of seed pre-training (zero-shot retrieval, merged by interpolation α = 0.5)\n\n" + \
        table(["K_seed / K", "K_seed steps", "msa before merging", "after merging", "drop"], rows) + \
        ("\n\n" + seeds_note(r).strip() if seeds_note(r) else "")


def section_table2(r):
    sel = r["selection"]
    parts = []
    for method, (_, field, symbol) in SWEEPS.items():
        rows = []
        merges = merges_of(r["models"], sel["source"], method)
        for v in r["preset"][field]:
            m = merges[v]
            paper = PAPER["table2"][method].get(v, [None] * 3)
            rows.append([v, fmt(m["zero_shot"]["tr_avg"]), fmt(m["zero_shot"]["ir_avg"]),
                         fmt(m["zero_shot_val"]["avg"]), "✓" if v == sel[method]["value"] else "",
                         fmt(first(m, "vqa", "vqa_score")), *map(fmt, paper)])
        parts.append(f"### {method} ({symbol})\n\n" + table(
            [symbol, "zero-shot TR avg", "zero-shot IR avg", "val R avg", "chosen on val", "VQA (fine-tuned)",
             "paper VQA", "paper TR", "paper IR"], rows))
    best = sel["best"]
    return "## Table 2 — merging methods on the seeded msa (ours: right after merging; paper: after fine-tuning)\n\n" + \
        "\n\n".join(parts) + f"\n\nEach value is chosen by zero-shot retrieval on val, then the best method: " \
        f"{best['method']} {SWEEPS[best['method']][2]} = {best['value']} (val {fmt(best['val'])}, test " \
        f"{fmt(best['test'])}) is `ours` in Table 1. Test scores are reported, never used to choose."


def section_table3(r):
    tasks = [t for t in ("nlvr2", "cls", "seg") if t in r["preset"]["finetune"]]
    if not tasks:
        return ""
    keys = {"nlvr2": "accuracy", "cls": "accuracy", "seg": "miou"}
    rows = [[label, *[fmt(first(r["models"][name], t, keys[t])) for t in tasks], *map(fmt, PAPER["table3"][label])]
            for label, name in r["table"].items()]
    header = ["model", *[{"nlvr2": "NLVR2 acc", "cls": "cls top-1", "seg": "seg mIoU"}[t] for t in tasks],
              "paper NLVR2", "paper ImageNet", "paper ADE20k"]
    return "## Table 3 — more tasks (classification and segmentation fine-tune the vision route only)\n\n" + \
        table(header, rows)


def section_fig4(r):
    rows = []
    for variant, names in r["ablation"].items():
        before, after = r["models"][names["before"]], r["models"][names["after"]]
        rows.append([variant, fmt(first(before, "vqa", "vqa_score")), fmt(first(after, "vqa", "vqa_score")),
                     fmt(before["zero_shot"]["avg"]), fmt(after["zero_shot"]["avg"])])
    rows.append(["maa (reference)", fmt(first(r["models"]["maa"], "vqa", "vqa_score")), "–",
                 fmt(r["models"]["maa"]["zero_shot"]["avg"]), "–"])
    alpha = r["selection"]["interpolation"]["value"]
    return f"## Fig. 4 — shared-weight architectures, before and after merging (α = {alpha}, chosen on val)\n\n" + table(
        ["variant", "VQA before", "VQA after", "zero-shot before", "zero-shot after"], rows)


def section_table5(r):
    t5, points = r["table5"], r["over_seeds"]["table5"]
    # three significant digits: TSSD of barely-trained experts is orders of magnitude below L2
    sig3 = lambda x: f"{x:.3g}"  # noqa: E731
    rows = []
    for metric in TABLE5_METRICS:
        interval, loo = t5["interval"][metric], t5["leave_one_out"][metric]
        r_cell = fmt(t5["correlation"][metric], 3)
        r_cell += f" [{fmt(interval[0], 3)}, {fmt(interval[1], 3)}]" if interval else ""
        loo_cell = f"{fmt(loo[0], 3)} to {fmt(loo[1], 3)}" if loo else "–"
        paper = PAPER["table5"].get(metric, [None])[-1]
        label = f"{metric[4:]} of τ" if metric.startswith("tau_") else metric
        rows.append([label, *[pm(point[metric], sig3) for point in points], r_cell, loo_cell, fmt(paper, 3)])
    rows.append(["merge drop (zero-shot R avg)", *[pm(point["drop"]) for point in points], "", "", ""])
    return "## Table 5 — distance between the vision and language experts vs the merge drop\n\n" + table(
        ["metric", *[f"K_seed/K = {fmt(point['frac'])}" for point in points],
         f"Pearson r with drop [95% CI] over {t5['points']} points", "r leaving one point out", "paper r"], rows) + \
        "\n\nThe metrics on the weights W_v, W_l (the paper's) and on the modality vectors τ_m = W_m − W⁰, " \
        "W⁰ being what the msa started from (the seed checkpoint; the init ViT at K_seed = 0). r is over every (seed, " \
        "K_seed) point; its interval is Fisher's z." + seeds_note(r)


def findings(r) -> list:
    """(claim, paper's direction, ours, replicates?) -- computed, never written by hand; every choice of α, γ or
    method is the one made on val (`select_on_val`), every number a test score (mean over seeds where there are)."""
    m, sel, fig3 = r["models"], r["selection"], r["over_seeds"]["fig3"]
    zs = lambda method, v: merges_of(m, sel["source"], method)[v]["zero_shot"]["avg"]  # noqa: E731
    no_seed = fig3[0]
    seeded = next(p for p in fig3 if p["frac"] == r["preset"]["default_frac"])
    out = [("Merging without seed pre-training loses much of the msa's performance (Table 1)",
            f"msa {fmt(no_seed['before']['mean'])} → merged {fmt(no_seed['after']['mean'])}",
            no_seed["drop"]["mean"] > 0),
           ("Seed pre-training shrinks the merge drop (Sec. 6.1)",
            f"drop {fmt(no_seed['drop']['mean'])} without seed vs {fmt(seeded['drop']['mean'])} with K_seed/K = "
            f"{r['preset']['default_frac']}", seeded["drop"]["mean"] < no_seed["drop"]["mean"])]
    a = {v: zs("interpolation", v) for v in r["preset"]["alphas"]}
    alpha = sel["interpolation"]["value"]
    out.append(("Interpolation: α ≈ 0.5–0.75 beats either expert alone (Table 2a)",
                f"α = {alpha} (chosen on val) {fmt(a[alpha])} vs α=0 {fmt(a.get(0.0))}, α=1 {fmt(a.get(1.0))}",
                0 < alpha < 1 and a[alpha] > max(a.get(0.0, -1), a.get(1.0, -1))))
    if 0.0 in a and 1.0 in a:
        out.append(("The vision expert alone beats the language expert alone (α=1 > α=0, Table 2a)",
                    f"α=1 {fmt(a[1.0])} vs α=0 {fmt(a[0.0])}", a[1.0] > a[0.0]))
    lam = {v: zs("modality_arithmetic", v) for v in r["preset"]["lams"]}
    if 0.5 in lam and 1.0 in lam:
        out.append(("Modality arithmetic degrades at large λ (Table 2b)",
                    f"λ=1 {fmt(lam[1.0])} vs λ=0.5 {fmt(lam[0.5])}", lam[1.0] < lam[0.5]))
    regmean, interpolation = sel["regmean"], sel["interpolation"]
    out.append(("RegMean is about as good as the best interpolation (within 2 points) (Table 2c)",
                f"RegMean γ = {regmean['value']} {fmt(regmean['test'])} vs interpolation α = {alpha} "
                f"{fmt(interpolation['test'])} (each chosen on val)", regmean["test"] >= interpolation["test"] - 2))
    corr = r["table5"]["correlation"]
    valid = {k: corr[k] for k in METRICS if corr[k] is not None}  # the paper's claim is about the weights
    if valid:
        top = max(valid, key=valid.get)
        out.append(("TSSD correlates best with the merge drop (Table 5)",
                    "Pearson r: " + ", ".join(f"{k} {fmt(v, 3)}" for k, v in valid.items()), top == "tssd"))
    return out


def write_report(r) -> str:
    lines = [f"# vlmerge recipe — preset `{r['preset_name']}`", "",
             f"{r['preset']['arch']} with depth {r['preset']['depth']} (M = {r['preset']['fusion_layers']}), "
             f"{r['preset']['image_size']} px, K = {r['preset']['pretrain_steps']} pre-training steps, "
             f"batch {r['preset']['batch_size']}; {fmt(r['stage_seconds'] / 60, 1)} minutes of training and evaluation "
             f"summed over the stages ({fmt(r['seconds'] / 60, 1)} in this invocation) on {r['device']}.", "",
             "## Findings", "", table(["the paper's finding", "ours", "same direction?"],
                                      [[c, o, "yes" if ok else "**no**"] for c, o, ok in r["findings"]]), ""]
    for section in (section_table1, section_fig3, section_table2, section_table3, section_fig4, section_table5):
        text = section(r)
        if text:
            lines += [text, ""]
    if r.get("spread"):
        lines += ["## Seed-to-seed spread", "", "`ours` fine-tuned again with other seeds: the seed sets the fresh "
                  "head's initialization and the data order; the merged weights are the same.", "",
                  table(["metric", "seeds", "mean", "std", "min", "max"],
                        [[SPREAD_LABEL[task], s["n"], *(fmt(s[k]) for k in ("mean", "std", "min", "max"))]
                         for task, s in r["spread"].items()]), ""]
    return "\n".join(lines)


SPREAD = {"vqa": "vqa_score", "retrieval": "avg"}  # task -> the metric whose seed-to-seed spread is reported
SPREAD_LABEL = {"vqa": "VQA score", "retrieval": "retrieval R avg (TR, IR)"}


def spread(model):
    """Mean / std / range over the fine-tuning seeds of each SPREAD metric (None: one seed only)."""
    out = {}
    for task, key in SPREAD.items():
        scores = [run[key] for run in model.get("finetune", {}).get(task, [])]
        if len(scores) >= 2:
            out[task] = {"n": len(scores), "mean": statistics.fmean(scores), "std": statistics.stdev(scores),
                         "min": min(scores), "max": max(scores)}
    return out or None


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None: plots are an optional extra, never required."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_sweeps(r, path):
    """Fig. 3 and Table 2 as a picture, when matplotlib is installed (an optional extra)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    sweep = r["over_seeds"]["fig3"]
    axes[0].plot([s["frac"] for s in sweep], [s["before"]["mean"] for s in sweep], "o-", label="msa before merging")
    axes[0].plot([s["frac"] for s in sweep], [s["after"]["mean"] for s in sweep], "s-", label="after (α=0.5)")
    axes[0].set(xlabel="K_seed / K", ylabel="zero-shot retrieval", title="Fig. 3")
    for method, (_, key, _) in SWEEPS.items():
        xs = r["preset"][key]
        merges = merges_of(r["models"], r["selection"]["source"], method)
        axes[1].plot(xs, [merges[x]["zero_shot"]["avg"] for x in xs], "o-", label=method)
    axes[1].set(xlabel="α / λ / γ", title="Table 2 (zero-shot)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# ----------------------------------------------------------------------------------------------
# The recipe's statistics and distances: model selection on val, Pearson r with its interval, the Sec. 7
# metrics between experts (Table 5).

def run_prefix(seed):
    """Where the models of pre-training seed `seed` live: OUT/ itself for seed 0, OUT/s<seed>/ for the others."""
    return f"s{seed}/" if seed else ""


def sweep_point(run, frac):
    """The {"frac", "steps", "before", "after"} of one K_seed / K in a pre-training seed's sweep."""
    return next(point for point in run["sweep"] if point["frac"] == frac)


def pearson_interval(r, n, level=0.95):
    """The confidence interval of a Pearson r over n points by Fisher's z: atanh(r) is about normal with
    standard error 1 / sqrt(n − 3); None below 4 points or without r."""
    if r is None or n < 4:
        return None
    if abs(r) == 1:
        return [r, r]
    half = statistics.NormalDist().inv_cdf((1 + level) / 2) / math.sqrt(n - 3)
    return [math.tanh(math.atanh(r) - half), math.tanh(math.atanh(r) + half)]


def pearson_range(xs, ys):
    """[min, max] of r with any one point left out: whether a single point decides r (None below 4 points)."""
    if len(xs) < 4:
        return None
    rs = [pearson(xs[:i] + xs[i + 1:], ys[:i] + ys[i + 1:]) for i in range(len(xs))]
    return None if None in rs else [min(rs), max(rs)]


def pearson(xs, ys):
    """Pearson correlation coefficient; None when either series is constant, too short or has a gap (None)."""
    if len(xs) < 2 or None in xs or None in ys:
        return None
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return None if sxx == 0 or syy == 0 else sxy / math.sqrt(sxx * syy)


def select_on_val(models, source, preset) -> dict:
    """Model selection on val, never on test: for each sweep of Table 2 the value whose merged model has the best
    zero-shot retrieval on val (ties: the first listed), then the best of those three methods. `models` as
    results.json keeps them (Recipe.records).

    {method: {"value", "name", "val", "test"}, "best": {"method", "value", "name", "val", "test"}, "source"}
    """
    out = {}
    for method, (_, field, _) in SWEEPS.items():
        merges = merges_of(models, source, method)
        value = max(preset[field], key=lambda v: merges[v]["zero_shot_val"]["avg"])
        chosen = merges[value]
        out[method] = {"value": value, "name": chosen["name"], "val": chosen["zero_shot_val"]["avg"],
                       "test": chosen["zero_shot"]["avg"]}
    method = max(SWEEPS, key=lambda m: out[m]["val"])
    return out | {"best": {"method": method, **out[method]}, "source": source}


def distances(state_dict, other=None, init_state=None, by_layer=False) -> dict:
    """The four Sec. 7 metrics between the v and l experts of one state dict, or between two state dicts; with
    init_state (W⁰) also between the modality vectors τ_v = W_v − W⁰ and τ_l = W_l − W⁰, as "tau_<metric>".
    by_layer: {layer: {metric: value}} instead, each metric over that layer's weights alone."""
    pairs = {"": merge.modality_weights(state_dict) if other is None else (state_dict, other)}
    if init_state is not None:
        pairs["tau_"] = merge.modality_vectors(state_dict, init_state)
    if not by_layer:
        return {prefix + name: metric_or_none(metric, a, b) for prefix, (a, b) in pairs.items()
                for name, metric in METRICS.items()}
    layers = {}
    for prefix, (a, b) in pairs.items():
        for layer, keys in group_by_layer(a).items():
            part_a, part_b = {k: a[k] for k in keys}, {k: b[k] for k in keys}
            row = layers.setdefault(layer, {})
            row.update({prefix + name: metric_or_none(metric, part_a, part_b) for name, metric in METRICS.items()})
    return layers


def group_by_layer(state_dict) -> dict:
    """'blocks.3.attn.qkv.weight' -> 'blocks.3'; any other key -> its first segment ('norm'); in key order."""
    groups = {}
    for key in state_dict:
        parts = key.split(".")
        groups.setdefault(".".join(parts[:2]) if parts[0] == "blocks" else parts[0], []).append(key)
    return groups


def metric_or_none(metric, a, b):
    """A metric, or None where it is undefined (the cosine of an all-zero vector: a layer that never moved)."""
    try:
        return metric(a, b)
    except ValueError:
        return None


# ----------------------------------------------------------------------------------------------
# Merging a checkpoint file (the `merge` command and recipe stage 3).

def modality_forward(model, batch):
    """RegMean's Gram forward: both routes of Fig. 2b, so every expert sees its own modality's inputs
    (images -> v, text -> l, the pair -> vl). The same method pre-training runs (model.routes)."""
    model.routes(batch["images"], batch["input_ids"], batch["attention_mask"])


# train.py's flags that name the pre-training data; a checkpoint written by train.py keeps their values
DATA_FLAGS = ("data", "image_root", "vocab", "world_seed")


def data_flags(values: dict) -> list:
    """train.py's data flags from a dict of their values (a checkpoint's saved args, or a command's)."""
    return [x for key in DATA_FLAGS if values.get(key) is not None
            for x in (f"--{key.replace('_', '-')}", str(values[key]))]


def gram_batches(checkpoint, samples, batch_size, flags=None):
    """RegMean's inputs: `samples` pre-training samples (a fixed shuffle, no augmentation) of the data that
    `flags` name (train.py's --data / --image-root / --vocab; default: the checkpoint's own, from its
    saved args; none at all: the synthetic world), tokenized by that data's tokenizer at the checkpoint's
    shapes. Returns a list of collated batches (on the CPU)."""
    if "config" not in checkpoint:
        raise ValueError("--method regmean needs a vlmerge checkpoint (with 'config') to collect Gram matrices")
    cfg = checkpoint["config"]
    flags = list(flags) if flags else data_flags(checkpoint.get("args") or {})  # the checkpoint's own data
    args = train.parse_args(flags + ["--image-size", str(cfg["image_size"]), "--max-len", str(cfg["max_text_len"])])
    dataset, _, tokenizer, _ = train.make_data(args, "pretrain", evaluation=False)
    if len(tokenizer) != cfg["vocab_size"]:  # another tokenizer's ids would index the wrong words
        source = f"--vocab {args.vocab}" if args.vocab else "the synthetic world's tokenizer"
        raise ValueError(f"RegMean's data: {source} has {len(tokenizer)} tokens, the checkpoint's word embedding "
                         f"{cfg['vocab_size']}: give the --data / --vocab it was pre-trained with")
    collate = data.Collator(tokenizer, max_len=cfg["max_text_len"], image_size=cfg["image_size"])
    subset = torch.utils.data.Subset(dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
                                     [:samples].tolist())
    return list(torch.utils.data.DataLoader(subset, batch_size, shuffle=False, collate_fn=collate))


def checkpoint_grams(checkpoint, batches, device="cpu") -> dict:
    """RegMean's Gram matrices of a vlmerge checkpoint's linear layers on `batches`, collected on `device`
    (returned on the CPU, where the merge runs)."""
    model = train.model_from_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["model"], strict=True)
    model.to(device)
    on_device = (train.to_device(batch, device) for batch in batches)
    grams = merge.collect_grams(model, on_device, forward=modality_forward)
    return {k: g.cpu() for k, g in grams.items()}


def merge_checkpoint(checkpoint, method, init=None, grams=None, **options) -> dict:
    """A maa checkpoint merged from an msa-family one. `init` (a checkpoint) gives W_0 for the
    methods that subtract it; `grams` (checkpoint_grams) are RegMean's."""
    state = checkpoint["model"]
    if method in ("modality_arithmetic", "ties", "dare"):
        if init is None:
            raise ValueError(f"--method {method} needs --init-state (the seed / initial maa checkpoint: W_0)")
        options["init_state"] = init["model"]
    if method == "regmean":
        if grams is None:
            raise ValueError("--method regmean needs Gram matrices (checkpoint_grams)")
        options["grams"] = grams
    merged = merge.merge_modalities(state, method, **options)
    out = {k: v for k, v in checkpoint.items() if k in ("arch", "task", "step")}
    if "config" in checkpoint:
        out["config"] = {**checkpoint["config"], "variant": "maa"}
    shown = {k: v for k, v in options.items() if isinstance(v, (int, float))}
    return out | {"model": merged, "variant": "maa", "merge": {"method": method, **shown}}


def default_device():
    """The device a run trains on: this process's GPU, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# Merging over time (Dziadzio et al. 2025): the `temporal` command.
#
# Stages of run_temporal: the stream (data.TaskStream, or --stream files); the base θ_0 (--base, or a
# maa pre-trained on the base world, cached under OUT/base); the base scored on every task and on the
# retention set (t = 0); per seed, each *chain* of experts trained task by task with train.fit from the
# weights its init hands over, every cell sharing the chain storing the same expert and deploying its own
# weights, scored after every step; the oracle; mean ± std over seeds, findings, TEMPORAL.md.

@dataclasses.dataclass
class TemporalPreset:
    depth: int = 2
    image_size: int = 32
    patch_size: int = 8
    max_len: int = 32             # every text of the synthetic world fits 32 tokens
    batch_size: int = 32
    precision: str = "fp32"
    base_steps: int = 300          # pre-training of θ_0 on the base world (cached under OUT/base)
    base_lr: float = 1e-3
    task_steps: int = 4            # optimizer steps per task (FoMo-in-Flux: 1 420 at batch 512)
    lr: float = 5e-4               # peak lr, fresh warm-up + cosine per task (FoMo-in-Flux: 1e-5 for CLIP)
    num_tasks: int = 5
    order: str = "random"
    test_per_concept: int = 4      # test scenes per class: 25 × this for the stream, 10 × this for retention
    recency: str = "linear"        # the schedule T3 compares with uniform
    short_budget: float = 0.5      # T6: ema/ema and the oracle again at this fraction of task_steps
    # options of each technique (one set for the EMA fold and the one-shot merge; λ = 0.5 makes task
    # arithmetic's EMA the interpolation EMA exactly, ties / dare / magmax use their usual values)
    techniques: dict = dataclasses.field(default_factory=lambda: {
        "interpolation": {}, "task_arithmetic": {"lam": 0.5}, "ties": {"density": 0.2, "lam": 1.0},
        "dare": {"p": 0.5, "lam": 0.5}, "magmax": {"lam": 1.0}})


TEMPORAL_PRESETS = {
    # the whole grid in a few steps per task: the test suite runs it (README: the suite's slowest tests)
    "smoke": TemporalPreset(),
    # the README's grid with --seeds 3: 9.7 min wall on a quiet 2-core machine (README, "Merging over time")
    "tiny": TemporalPreset(base_steps=1500, task_steps=30, lr=1e-3, test_per_concept=8),
}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One row of the grid: what starts each expert, what is deployed, with which technique and data."""
    kind: str = "time"             # time (TemporalMerge) | paint | base (θ_0 alone) | oracle (multitask)
    init: str = "ema"
    deploy: str = "ema"
    technique: str = "interpolation"
    ema_weight: float = 0.5
    schedule: str = "uniform"
    replay: bool = True
    budget: float = 1.0            # × task_steps

    @property
    def name(self):
        """`init/deploy`, then only what differs from the defaults (e.g. `zs/all ties`, `zs/all no-replay`)."""
        head = f"{self.init}/{self.deploy}" if self.kind == "time" else self.kind
        extra = [self.technique if self.technique != "interpolation" else "",
                 f"w={self.ema_weight}" if self.ema_weight != 0.5 else "",
                 self.schedule if self.schedule != "uniform" else "", "" if self.replay else "no-replay",
                 f"steps×{self.budget}" if self.budget != 1 else ""]
        return " ".join([head, *filter(None, extra)])


def grid_cells(p: TemporalPreset) -> list:
    """--grid: the init × deploy grid (interpolation), every technique at ema/ema and at zs/all, the
    baselines, offline merging without replay and with a recency schedule, and T6's shorter budget."""
    techniques = [t for t in merge.TECHNIQUES if t != "interpolation"]
    return ([Cell(init=i, deploy=d) for i in merge.INITS for d in merge.DEPLOYS]
            + [Cell(technique=t) for t in techniques]
            + [Cell(init="zs", deploy="all", technique=t) for t in techniques]
            + [Cell(kind="base"), Cell(kind="paint"), Cell(kind="oracle")]
            + [Cell(init="zs", deploy="all", replay=False), Cell(init="zs", deploy="all", schedule=p.recency)]
            + [Cell(budget=p.short_budget), Cell(kind="oracle", budget=p.short_budget)])


@dataclasses.dataclass
class Stream:
    """What the loop consumes, synthetic or from files: per-task train / test data, retention, replay data."""
    train: list
    test: list
    retention: object
    base: object                   # pre-training data mixed in by replay (None: none given)
    names: list
    metric: str                    # "accuracy" (zero-shot classification) or "recall@5" (retrieval)
    tokenizer: object


def run_temporal(args) -> dict:
    """Merging over time end to end (the stages are listed above this section)."""
    if args.seeds < 1:
        raise ValueError(f"--seeds {args.seeds}: give at least 1")
    preset = TEMPORAL_PRESETS[args.preset]
    out = args.out or os.path.join("runs", f"temporal_{args.preset}")
    os.makedirs(out, exist_ok=True)
    start = time.time()
    cells = grid_cells(preset) if args.grid else [Cell(kind="base"), cell_from_flags(args)]
    stream = load_stream(args, preset)                              # 1. tasks, tests, retention
    base = base_weights(args, preset, stream, out)                  # 2. θ_0
    run = TemporalRun(preset, stream, base, out)
    run.t0 = run.score(base["model"])                               # 3. t = 0: the base on everything
    trajectories = {cell.name: [] for cell in cells}
    for seed in range(args.seeds):                                  # 4. chains of experts, every cell
        for name, rows in run.run_seed(cells, seed).items():
            trajectories[name].append(rows)
    results = summarize(preset, stream, cells, trajectories, args)  # 5. mean ± std, findings, layout
    results["seconds"] = time.time() - start
    write_temporal(results, out)                                    # 6. temporal.json, TEMPORAL.md, plot
    return results


def cell_from_flags(args) -> Cell:
    return Cell(init=args.init, deploy=args.deploy, technique=args.technique, ema_weight=args.ema_weight,
                schedule=args.schedule, replay=not args.no_replay)


def load_stream(args, p: TemporalPreset) -> Stream:
    """The synthetic stream of the preset, or --stream / --stream-test / --retention files (retrieval)."""
    if not args.stream:
        ts = data.TaskStream(seed=0, image_size=p.image_size, num_tasks=p.num_tasks, order=args.order or p.order,
                             test_per_concept=p.test_per_concept)
        return Stream([ts.task(t, "train") for t in range(ts.num_tasks)],
                      [ts.task(t, "test") for t in range(ts.num_tasks)],
                      ts.retention(), ts.base_data(), ts.task_names(), "accuracy", ts.world.tokenizer())
    if len(args.stream_test or []) != len(args.stream) or not args.retention or not args.vocab or not args.base:
        raise ValueError("--stream T1.jsonl ... needs --stream-test with one test file per task, --retention, "
                         "--vocab (a BERT vocab.txt) and --base (a maa checkpoint)")
    root = lambda path: args.image_root or os.path.dirname(path)  # noqa: E731
    base = data.load_image_text_jsonl(args.base_data, root(args.base_data)) if args.base_data else None
    return Stream([data.load_image_text_jsonl(f, root(f)) for f in args.stream],
                  [data.retrieval_jsonl(f, root(f)) for f in args.stream_test],
                  data.retrieval_jsonl(args.retention, root(args.retention)), base,
                  [os.path.basename(f) for f in args.stream], "recall@5", data.Tokenizer.from_vocab_file(args.vocab))


def base_weights(args, p: TemporalPreset, stream: Stream, out: str) -> dict:
    """θ_0 as {"model": state dict, "config": ...}: --base (any maa checkpoint), else the preset's maa
    pre-trained on the base world with ITC, cached as OUT/base/ckpt.pt. Every model of the loop is a maa
    model of task `retrieval` (ITC only, as CLIP): the heads a pre-training checkpoint has beyond ITC are
    dropped."""
    path = args.base or os.path.join(out, "base", "ckpt.pt")
    if args.base or os.path.exists(path):
        checkpoint = train.load_checkpoint(path)
        if checkpoint.get("variant") != "maa" or "config" not in checkpoint:
            raise ValueError(f"--base {path}: not a maa checkpoint (variant {checkpoint.get('variant')!r}); "
                             f"merging over time needs one set of weights: merge it first with `vlmerge.py merge`")
        if checkpoint["config"]["vocab_size"] != len(stream.tokenizer):
            raise ValueError(f"--base {path} embeds {checkpoint['config']['vocab_size']} tokens, but the stream's "
                             f"tokenizer has {len(stream.tokenizer)} (give the --vocab it was trained with)")
        model = train.model_from_checkpoint(checkpoint, task="retrieval", variant="maa")
        train.transfer_weights(model, checkpoint["model"], "maa")
        return {"model": model.state_dict(), "config": dataclasses.asdict(model.cfg)}
    torch.manual_seed(0)
    model = model_for(p, stream)
    train.fit(fit_args(p, dataclasses.asdict(model.cfg), p.base_steps, p.base_lr, 0, os.path.dirname(path)),
              model, stream.base, tokenizer=stream.tokenizer)
    return {"model": model.state_dict(), "config": dataclasses.asdict(model.cfg)}


def model_for(p: TemporalPreset, stream: Stream):
    return build_model("vit_tiny", "maa", "retrieval", vocab_size=len(stream.tokenizer), image_size=p.image_size,
                       patch_size=p.patch_size, depth=p.depth, fusion_layers=1, max_text_len=p.max_len)


def fit_args(p: TemporalPreset, config: dict, steps: int, lr: float, seed: int, out: str):
    """train.py's flags for one run of the loop; the shapes come from the model's config."""
    return train.parse_args([
        "--task", "retrieval", "--variant", "maa", "--depth", str(config["depth"]),
        "--fusion-layers", str(config["fusion_layers"]), "--image-size", str(config["image_size"]),
        "--patch-size", str(config["patch_size"]), "--max-len", str(config["max_text_len"]),
        "--steps", str(steps), "--batch-size", str(p.batch_size), "--lr", str(lr), "--warmup", str(steps // 10),
        "--precision", p.precision, "--seed", str(seed), "--randaugment", "off", "--save-every", str(steps),
        "--quiet", "--out", out])


class Paint:
    """PAINT (Ilharco et al. 2022) as a TIME baseline: the newest expert interpolated with θ_0, both to
    start the next expert and to deploy. A one-expert EMA from θ_0 is exactly that: w θ^s_t + (1 − w) θ_0."""

    def __init__(self, base, ema_weight=0.5):
        self.base, self.ema_weight = base, ema_weight
        self.tm = merge.TemporalMerge(base, "ema", "ema", ema_weight=ema_weight)

    def store(self, expert):
        self.tm = merge.TemporalMerge(self.base, "ema", "ema", ema_weight=self.ema_weight)
        self.tm.store(expert)

    def init_weights(self):
        return self.tm.init_weights()

    deploy_weights = init_weights


# What starts each expert of a chain and what each cell deploys, by the cell's kind.
_DRIVERS = {
    "time": lambda cell, base, options: merge.TemporalMerge(
        base, cell.init, cell.deploy, cell.technique, ema_weight=cell.ema_weight, schedule=cell.schedule,
        **options),
    "paint": lambda cell, base, options: Paint(base, cell.ema_weight),
}


def chain_key(cell: Cell):
    """Cells whose experts start from the same weights share one chain of experts (trained once): the init
    choice and whatever shapes its weights (the technique for all / ema, the schedule for all, w for ema).
    None: nothing to train (the base) or one run of its own (the oracle)."""
    if cell.kind in ("base", "oracle"):
        return None
    if cell.kind == "paint":
        return ("paint", cell.ema_weight, cell.replay, cell.budget)
    shaping = {"zs": (), "ft": (), "all": (cell.technique, cell.schedule), "ema": (cell.technique, cell.ema_weight)}
    return (cell.init, *shaping[cell.init], cell.replay, cell.budget)


class TemporalRun:
    """The loop's fixed parts (preset, stream, θ_0, one model used for scoring) and its three kinds of run."""

    def __init__(self, preset, stream, base, out):
        self.p, self.stream, self.base, self.out = preset, stream, base["model"], out
        self.config = base["config"]
        self.model = train.model_from_checkpoint(base)
        collate = data.Collator(stream.tokenizer, max_len=self.config["max_text_len"],
                                image_size=self.config["image_size"])
        self.measure = _SCORERS[stream.metric](stream, collate)
        self.t0 = None

    def run_seed(self, cells, seed) -> dict:
        """cell name -> its T + 1 scores ({"tasks": [...], "retention": x}; t = 0 first) for one seed."""
        rows = {}
        chains = {}
        for cell in cells:
            chains.setdefault(chain_key(cell), []).append(cell)
        for key, members in chains.items():
            if key is not None:
                rows |= self.chain(members, seed)
        for cell in chains.get(None, []):
            rows[cell.name] = self.oracle(cell, seed) if cell.kind == "oracle" else [self.t0] * (len(self.stream.train) + 1)
        return rows

    def chain(self, cells, seed) -> dict:
        """Init → train → store → deploy → evaluate, task by task; the first cell's init starts each expert."""
        drivers = [_DRIVERS[c.kind](c, self.base, self.options(c, seed)) for c in cells]
        rows = {c.name: [self.t0] for c in cells}
        label = run_label(cells[0])
        for t in tqdm(range(len(self.stream.train)), desc=f"seed {seed} {cells[0].name}", leave=False):
            expert = self.train(drivers[0].init_weights(), self.task_data(t, cells[0].replay),
                                round(cells[0].budget * self.p.task_steps), seed,
                                os.path.join(self.out, f"seed{seed}", label, f"task{t + 1}"))
            for cell, driver in zip(cells, drivers):
                driver.store(expert)
                rows[cell.name].append(self.score(driver.deploy_weights()))
        return rows

    def oracle(self, cell, seed) -> list:
        """The multitask bound: one run from θ_0 on the union of every task, T × the per-task budget.
        Scored at the end only (t = T); the steps in between have no oracle."""
        union = torch.utils.data.ConcatDataset(self.stream.train)
        # FoMo-in-Flux: 1/3 pre-training data, 2/3 task data
        mixture = data.Mixture([self.stream.base, union, union]) if cell.replay else union
        steps = round(cell.budget * self.p.task_steps) * len(self.stream.train)
        weights = self.train(self.base, mixture, steps, seed, os.path.join(self.out, f"seed{seed}", run_label(cell)))
        return [self.t0] + [None] * (len(self.stream.train) - 1) + [self.score(weights)]

    def task_data(self, t, replay):
        """Task t's training data: alone, or the replay mixture (base data, task t, tasks before t; ⅓ each)."""
        s = self.stream
        return data.replay_mixture(s.base, s.train[t], s.train[:t]) if replay else s.train[t]

    def options(self, cell, seed):
        options = dict(self.p.techniques[cell.technique])
        return options | {"seed": seed} if cell.technique == "dare" else options

    def train(self, start, dataset, steps, seed, out) -> dict:
        """One expert: θ^i loaded into a fresh model, trained by train.fit (fresh AdamW, warm-up + cosine)."""
        model = train.model_from_checkpoint({"config": self.config})
        model.load_state_dict(start, strict=True)
        train.fit(fit_args(self.p, self.config, steps, self.p.lr, seed, out), model, dataset,
                  tokenizer=self.stream.tokenizer)
        # the expert lives on in the merges; its checkpoint file would only fill the disk
        os.remove(os.path.join(out, "ckpt.pt"))
        return model.state_dict()

    def score(self, weights) -> dict:
        """The deployed weights on every task's test set and on the retention set."""
        self.model.load_state_dict(weights, strict=True)
        return self.measure(self.model)


def run_label(cell) -> str:
    """A directory name for people (the record of what ran is args.json beside it): `ema/ema steps×0.5`
    -> `ema-ema_steps_0.5`."""
    return re.sub(r"[^\w.-]+", "_", cell.name.replace("/", "-"))


def zero_shot_scorer(stream, collate):
    """Every test set scored by zero-shot classification; images rendered and normalized once for the run."""
    tests = [train.zero_shot_inputs(d, collate) for d in stream.test]
    retention = train.zero_shot_inputs(stream.retention, collate)
    return lambda model: {"tasks": [train.zero_shot_accuracy(model, *t) for t in tests],
                          "retention": train.zero_shot_accuracy(model, *retention)}


def retrieval_scorer(stream, collate):
    """Every test set scored by retrieval recall@5 (FoMo-in-Flux's retrieval score), mean of TR and IR."""
    def recall(model, dataset):
        r = train.evaluate(model, "retrieval", dataset, collate, batch_size=128)
        return (r["tr_r5"] + r["ir_r5"]) / 2
    return lambda model: {"tasks": [recall(model, d) for d in stream.test], "retention": recall(model, stream.retention)}


_SCORERS = {"accuracy": zero_shot_scorer, "recall@5": retrieval_scorer}


# -- the numbers: FoMo-in-Flux's metrics per step, mean ± std over seeds ---------------------------

def step_metrics(rows) -> dict:
    """One seed's trajectory: the (T+1) × T accuracy matrix, A_KA(t) (all tasks; seen-only too), A_ZS(t),
    GM(t) = √(A_KA·A_ZS). Steps without a score (the oracle before t = T) hold None."""
    out = {"matrix": [], "a_ka": [], "a_ka_seen": [], "a_zs": [], "gm": []}
    for t, row in enumerate(rows):
        if row is None:
            for values in out.values():
                values.append(None)
            continue
        a_ka, a_zs = statistics.fmean(row["tasks"]), row["retention"]
        out["matrix"].append(row["tasks"])
        out["a_ka"].append(a_ka)
        out["a_ka_seen"].append(statistics.fmean(row["tasks"][:t]) if t else None)
        out["a_zs"].append(a_zs)
        out["gm"].append(math.sqrt(a_ka * a_zs))
    return out


def seed_stats(runs: list, reduce) -> dict:
    """reduce over seeds, element by element through the nested lists (None where any seed has None)."""
    def walk(values):
        if isinstance(values[0], list):
            return [walk(list(v)) for v in zip(*values)]
        return None if any(v is None for v in values) else reduce(values)
    return {key: walk([run[key] for run in runs]) for key in runs[0]}


def summarize(p, stream, cells, trajectories, args) -> dict:
    cells_out = {}
    for cell in cells:
        runs = [step_metrics(rows) for rows in trajectories[cell.name]]
        std = (lambda v: statistics.stdev(v)) if len(runs) > 1 else (lambda v: 0.0)
        cells_out[cell.name] = {"spec": dataclasses.asdict(cell), "runs": runs,
                                "mean": seed_stats(runs, statistics.fmean), "std": seed_stats(runs, std)}
    results = {"preset_name": args.preset, "preset": dataclasses.asdict(p), "seeds": args.seeds,
               "stream": {"tasks": stream.names, "metric": stream.metric, "order": args.order or p.order,
                          "num_tasks": len(stream.train)},
               "cells": cells_out,
               "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"}
    results["findings"] = temporal_findings(results) if args.grid else []
    results["layout"] = temporal_layout(results)
    return results


def final(results, name, metric="gm", stat="mean"):
    return results["cells"][name][stat][metric][-1]


def temporal_findings(r) -> list:
    """T1–T6, each computed from the seed means of the final step (t = T), never written by hand."""
    f = lambda name, metric="gm": final(r, name, metric)  # noqa: E731
    cells = r["cells"]
    recency = next(n for n in cells if n.startswith("zs/all ") and cells[n]["spec"]["schedule"] != "uniform")
    grid = [f"{i}/{d}" for i in merge.INITS for d in merge.DEPLOYS]
    techniques = ["ema/ema"] + [f"ema/ema {t}" for t in merge.TECHNIQUES if t != "interpolation"]
    spread = lambda names: max(f(n) for n in names) - min(f(n) for n in names)  # noqa: E731
    short = next(n for n in cells if n.startswith("ema/ema steps"))
    short_oracle = next(n for n in cells if n.startswith("oracle steps"))
    best = max(f(n) for n in cells if cells[n]["spec"]["kind"] != "oracle" and cells[n]["spec"]["budget"] == 1)
    gap, gap_short = f("oracle") - f("ema/ema"), f(short_oracle) - f(short)
    rows = [
        ("T1", "Offline merging (zs/all) accumulates less than continual fine-tuning (ft/ft) by the end",
         f"A_KA zs/all {fmt(f('zs/all', 'a_ka'), 1)} vs ft/ft {fmt(f('ft/ft', 'a_ka'), 1)}",
         f("zs/all", "a_ka") < f("ft/ft", "a_ka")),
        ("T2", "Replay helps offline merging",
         f"GM zs/all {fmt(f('zs/all'), 1)} with replay vs {fmt(f('zs/all no-replay'), 1)} without",
         f("zs/all") > f("zs/all no-replay")),
        ("T3", "Recency weighting raises offline merging's A_KA",
         f"A_KA {recency} {fmt(f(recency, 'a_ka'), 1)} vs uniform {fmt(f('zs/all', 'a_ka'), 1)}",
         f(recency, "a_ka") > f("zs/all", "a_ka")),
        ("T4", "Init × deploy matters more than the technique: spread of GM across init × deploy (interpolation) "
               "exceeds the spread across techniques at ema/ema",
         f"spread {fmt(spread(grid), 1)} vs {fmt(spread(techniques), 1)}", spread(grid) > spread(techniques)),
        ("T5", "ema/ema has the best GM (within one std), more retention than ft/ft, more accumulation than zs/all",
         f"GM {fmt(f('ema/ema'), 1)} ± {fmt(final(r, 'ema/ema', 'gm', 'std'), 1)} (best {fmt(best, 1)}); "
         f"A_ZS {fmt(f('ema/ema', 'a_zs'), 1)} vs ft/ft {fmt(f('ft/ft', 'a_zs'), 1)}; "
         f"A_KA {fmt(f('ema/ema', 'a_ka'), 1)} vs zs/all {fmt(f('zs/all', 'a_ka'), 1)}",
         f("ema/ema") >= best - final(r, "ema/ema", "gm", "std") and f("ema/ema", "a_zs") > f("ft/ft", "a_zs")
         and f("ema/ema", "a_ka") > f("zs/all", "a_ka")),
        ("T6", "More steps per task narrow ema/ema's gap to the multitask oracle (GM)",
         f"gap {fmt(gap, 1)} at {r['preset']['task_steps']} steps/task vs {fmt(gap_short, 1)} at "
         f"{round(r['preset']['short_budget'] * r['preset']['task_steps'])}", gap < gap_short),
    ]
    return [{"id": i, "claim": c, "ours": o, "same": bool(s)} for i, c, o, s in rows]


def temporal_layout(r) -> list:
    """The tables of TEMPORAL.md as references into r["cells"]: [cell, metric, step, stat] (a cell shown
    as "mean ± std" when stat is "both"); the writer looks every number up."""
    names = list(r["cells"])
    steps = range(r["stream"]["num_tasks"] + 1)
    tables = [{"title": "Final step (t = T): mean ± std over seeds",
               "header": ["cell", "A_KA", "A_KA seen", "A_ZS", "GM"],
               "rows": [[n, *[[n, m, -1, "both"] for m in ("a_ka", "a_ka_seen", "a_zs", "gm")]] for n in names]}]
    for metric, label in (("a_ka", "A_KA(t)"), ("a_zs", "A_ZS(t)"), ("gm", "GM(t)")):
        tables.append({"title": f"Trajectories: {label}, seed mean, t = 0 is the base model",
                       "header": ["cell", *[f"t={t}" for t in steps]],
                       "rows": [[n, *[[n, metric, t, "mean"] for t in steps]] for n in names]})
    if "ema/ema" in r["cells"]:
        tables.append({"title": "ema/ema: accuracy of θ^o_t (rows) on every task (columns), seed mean",
                       "header": ["t", *[f"task {k + 1}" for k in range(len(r["stream"]["tasks"]))]],
                       "rows": [[str(t), *[["ema/ema", "matrix", t, "mean", k] for k in range(len(r["stream"]["tasks"]))]]
                                for t in steps]})
    return tables


def layout_value(r, ref) -> str:
    """One table cell of TEMPORAL.md from its reference (see temporal_layout)."""
    if isinstance(ref, str):
        return ref
    name, metric, t, stat, *task = ref
    pick = lambda s: r["cells"][name][s][metric][t] if not task else r["cells"][name][s][metric][t][task[0]]  # noqa: E731
    if stat == "both":
        return "–" if pick("mean") is None else f"{pick('mean'):.1f} ± {pick('std'):.1f}"
    return fmt(pick(stat), 1)


def write_temporal(r, out):
    """temporal.json (every number and the layout), then TEMPORAL.md as a view of exactly that JSON."""
    train.write_json(os.path.join(out, "temporal.json"), r)
    r = json.loads(json.dumps(r))
    p, s = r["preset"], r["stream"]
    lines = [f"# Merging over time — preset `{r['preset_name']}`", "",
             f"{s['num_tasks']} tasks ({s['order']} order), scored by {s['metric']}; vit_tiny maa of depth "
             f"{p['depth']}, {p['image_size']} px, {p['task_steps']} steps of batch {p['batch_size']} per task, "
             f"{r['seeds']} seed(s); {fmt(r['seconds'] / 60, 1)} minutes on {r['device']}. Cells are named "
             f"`init/deploy` (TIME's initialization and deployment phases), then what differs from the defaults "
             f"(interpolation, w = 0.5, uniform schedule, replay, full budget). Technique options: "
             + "; ".join(f"{k} {v}" for k, v in p["techniques"].items() if v) + ".", "",
             "Tasks: " + "; ".join(f"{k + 1}. {name}" for k, name in enumerate(s["tasks"])) + ".", ""]
    if r["findings"]:
        lines += ["## Findings", "", "T1–T6 are the paper's claims as summarized from its abstract and official code "
                  "(ExplainableML/fomo_in_flux), not quotations; *same direction?* compares the seed means at t = T.",
                  "", table(["", "the paper's claim", "ours", "same direction?"],
                            [[f["id"], f["claim"], f["ours"], "yes" if f["same"] else "**no**"] for f in r["findings"]]),
                  ""]
    for t in r["layout"]:
        lines += [f"## {t['title']}", "", table(t["header"], [[layout_value(r, ref) for ref in row] for row in t["rows"]]), ""]
    train.write_text(os.path.join(out, "TEMPORAL.md"), "\n".join(lines))
    plot_temporal(r, os.path.join(out, "temporal.png"))
    print("\n".join(lines))


def plot_temporal(r, path):
    """A_KA and A_ZS over t for the headline cells, when matplotlib is installed (an optional extra)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for name in [n for n in ("ema/ema", "ft/ft", "zs/all", "paint", "base") if n in r["cells"]] or list(r["cells"]):
        for ax, metric in zip(axes, ("a_ka", "a_zs")):
            ys = r["cells"][name]["mean"][metric]
            ax.plot(range(len(ys)), ys, "o-", label=name)
    for ax, label in zip(axes, ("A_KA (knowledge accumulation)", "A_ZS (zero-shot retention)")):
        ax.set(xlabel="task t", ylabel=label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


# ----------------------------------------------------------------------------------------------
# bench: every figure is a ratio against a reference timed in the same process. A ratio is the median
# over interleaved pairs (reference, candidate, reference, candidate, ...), each pair timed back to back,
# with the min-max of the pair ratios beside it: a slow minute on a shared machine then slows both sides
# of a pair instead of one side of the ratio.

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16, from the vendors' sheets


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, calls=1):
    """Seconds per call of `fn`, over `calls` calls back to back."""
    sync(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - start) / calls


def median_seconds(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


class PeakMemory:
    """Peak bytes allocated inside a `with` block, above what was allocated when it began.

    CUDA: the caching allocator's own counter. CPU: the process's resident set, sampled every
    0.5 ms by a thread (torch ops release the GIL; the interpreter is asked to switch threads every
    0.1 ms, so a block that is one Python loop of small ops is sampled too). glibc first returns its
    free lists to the system and then mmaps every block over 128 KiB, so that what the block allocates
    shows in the resident set and what it frees leaves it (see `train.malloc_mode`)."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    def __enter__(self):
        import threading
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        train.malloc_mode("measure")
        self.switch = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        self.base = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while self.running:
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(0.0005)

    @staticmethod
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self.rss() - self.base)
            sys.setswitchinterval(self.switch)
            train.malloc_mode("reuse")


class Paired(NamedTuple):
    ref: float     # median seconds of the reference
    ours: float    # median seconds of the candidate
    ratio: float   # median over the pairs of ours / ref
    lo: float      # min and max of the pair ratios
    hi: float


MIN_SAMPLE_S = 0.025  # one timing sample lasts at least this long (timeit's autorange, shorter)


def paired_seconds(ref_fn, fn, device, pairs, warmup=2) -> Paired:
    """Time `ref_fn` and `fn` in alternation, `pairs` times, after `warmup` calls of each.

    A call shorter than MIN_SAMPLE_S is repeated within its sample (a 2 ms reduction timed once is
    mostly timer and scheduler noise); the repeat counts are fixed from the last warm-up call."""
    for _ in range(warmup):
        ref_fn(), fn()
    ref_calls, calls = (max(1, math.ceil(MIN_SAMPLE_S / max(timed(f, device), 1e-6))) for f in (ref_fn, fn))
    times = [(timed(ref_fn, device, ref_calls), timed(fn, device, calls)) for _ in range(pairs)]
    ratios = [ours / ref for ref, ours in times]
    return Paired(statistics.median(r for r, _ in times), statistics.median(o for _, o in times),
                  statistics.median(ratios), min(ratios), max(ratios))


def peak_bytes(fn, device):
    """Peak extra bytes of one call, its result held until the measurement ends (a result dropped at once
    would leave only the sampler's chance of seeing it)."""
    with PeakMemory(device) as mem:
        result = fn()
    del result
    return mem.peak


def layer_flops(tokens, dim):
    """Forward FLOPs of one block on a sequence: 24·T·D² for qkv/proj/fc1/fc2, 4·T²·D for attention."""
    return 24 * tokens * dim * dim + 4 * tokens * tokens * dim


def pretrain_flops(cfg, batch, text_len):
    """Model FLOPs of one ITC+ITM+MLM training step (forward + backward = 3 × forward), from shapes.

    Per pair: image and text through the lower N-M layers, both through the top M layers (ITC),
    the masked text through the lower layers again (MLM), the fused sequence through the top M
    layers four times (ITM positive + 2 negatives, MLM), and the MLM decoder on every text token."""
    n_low, n_top, d = cfg.depth - cfg.fusion_layers, cfg.fusion_layers, cfg.dim
    image = 1 + cfg.num_patches
    fused = image + text_len
    per_pair = (n_low * (layer_flops(image, d) + 2 * layer_flops(text_len, d))
                + n_top * (layer_flops(image, d) + layer_flops(text_len, d) + 4 * layer_flops(fused, d))
                + 2 * cfg.num_patches * 3 * cfg.patch_size ** 2 * d
                + text_len * (2 * d * d + 2 * d * cfg.vocab_size))
    return 3 * batch * per_pair


def random_pretrain_batch(cfg, batch, text_len, device, generator):
    ids = torch.randint(5, cfg.vocab_size, (batch, text_len), generator=generator)
    labels = torch.where(torch.rand(batch, text_len, generator=generator) < 0.15, ids, -100)
    return {"images": torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=generator).to(device),
            "input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device),
            "mlm_input_ids": torch.where(labels >= 0, 3, ids).to(device), "mlm_labels": labels.to(device)}


def bench_vision(args, device, shape, rows):
    """Forward+backward of our encode_image vs torchvision's VisionTransformer, same shapes."""
    from torchvision.models.vision_transformer import VisionTransformer
    dim, heads = ARCHS[args.arch]["dim"], ARCHS[args.arch]["heads"]
    size, patch, depth, batch, repeats = shape
    autocast = torch.autocast(device.type, torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    torch.manual_seed(0)
    ref = VisionTransformer(size, patch, depth, heads, dim, 4 * dim).to(device)
    images = torch.randn(batch, 3, size, size, device=device)

    def ref_step():
        with autocast:
            x = ref._process_input(images)
            x = ref.encoder(torch.cat([ref.class_token.expand(batch, -1, -1), x], dim=1))
        x.float().mean().backward()
    for variant in VARIANTS:
        model = build_model(args.arch, variant, image_size=size, patch_size=patch, depth=depth,
                            vocab_size=1000).to(device)

        def step():
            with autocast:
                x = model.encode_image(images)
            x.float().mean().backward()
        t = paired_seconds(ref_step, step, device, repeats)
        rows.append(["vision route fwd+bwd", variant, f"{1000 * t.ours:.1f} ms",
                     f"torchvision ViT {1000 * t.ref:.1f} ms", t, "≤ 1.05"])


def pretrain_step(args, device, arch, size, patch, depth, batch, text_len):
    """One full ITC+ITM+MLM optimizer step of an msa on a fixed random batch, as a function; and its model."""
    model = build_model(arch, "msa", image_size=size, patch_size=patch, depth=depth).to(device)
    objective = train.Objective(model)
    runner = torch.compile(objective) if args.compile else objective
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    batch_data = random_pretrain_batch(model.cfg, batch, text_len, device, torch.Generator().manual_seed(0))
    autocast = torch.autocast(device.type, torch.bfloat16)

    def step():
        with autocast:
            loss, _ = runner(batch_data)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step, model


def bench_pretrain(args, device, shape, rows, arch):
    """A full ITC+ITM+MLM optimizer step: samples/s, tokens/s, and on CUDA the MFU."""
    size, patch, depth, batch, repeats = shape
    text_len = 40
    step, model = pretrain_step(args, device, arch, size, patch, depth, batch, text_len)
    t = median_seconds(step, device, repeats)
    flops = pretrain_flops(model.cfg, batch, text_len)
    achieved = flops / t / 1e12
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    label = f"{arch} msa, batch {batch}, {size} px" + (", compiled" if args.compile else "")
    rows.append(["pre-training step (bf16)", label, f"{batch / t:.1f} img/s, {batch * text_len / t:.0f} tok/s",
                 f"{achieved:.2f} TFLOP/s" + (f" of {peak:.0f} peak" if peak else ""),
                 achieved / peak if peak else None, "MFU ≥ 0.45 (vit_base, H100, --compile)"])


@contextlib.contextmanager
def sdpa_own_choice():
    """SDPA picks its kernel itself (model.attention_kernel's CPU math-kernel rule switched off)."""
    saved, model_lib.CPU_MATH_UP_TO = model_lib.CPU_MATH_UP_TO, 0
    try:
        yield
    finally:
        model_lib.CPU_MATH_UP_TO = saved


def bench_attention(args, device, rows, repeats):
    """The CPU attention rule (model.attention_kernel) against SDPA's own kernel choice, in a bf16 pre-training
    step of the tiny preset's shapes (17 / 32 / 49 tokens) and of 224-px images (197 image tokens)."""
    if device.type != "cpu":
        return
    shapes = [(32, 8, 4, 64, 32)] + ([] if args.quick else [(224, 16, 4, 8, 32)])
    for size, patch, depth, batch, text_len in shapes:
        step, _ = pretrain_step(args, device, "vit_tiny", size, patch, depth, batch, text_len)

        def own_choice():
            with sdpa_own_choice():
                step()
        paired = paired_seconds(own_choice, step, device, max(repeats, 3))
        rows.append(["attention kernel, pre-training step", f"vit_tiny msa depth {depth}, batch {batch}, {size} px",
                     f"{paired.ours * 1e3:.0f} ms (math ≤ {model_lib.CPU_MATH_UP_TO} tokens)",
                     f"SDPA's own choice {paired.ref * 1e3:.0f} ms", paired, "< 1"])


def bench_merge(args, device, arch, rows, repeats):
    """merge_modalities vs a plain state-dict copy; RegMean's Gram collection vs bare forwards."""
    with torch.device("cpu"):
        model = build_model(arch, "msa", image_size=32 if args.quick else 224, patch_size=8 if args.quick else 16)
    state = {k: v.to(device) for k, v in model.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in state.values())
    copy = lambda: {k: v.clone() for k, v in state.items()}  # noqa: E731  the reference
    rows.append(["state-dict copy (reference)", f"{arch} msa, {size / 2**20:.0f} MiB", "",
                 f"peak +{peak_bytes(copy, device) / size:.2f}× ckpt", None, ""])
    init = merge.merge_modalities(state, "interpolation", alpha=0.5)
    grams = {k: torch.eye(v.shape[1], device=device) + 0.01 for k, v in state.items()
             if v.dim() == 2 and merge.merged_key(k)[1] is not None}
    methods = {"interpolation": {"alpha": 0.75}, "modality_arithmetic": {"lam": 0.5, "init_state": init},
               "regmean": {"gamma": 0.5, "grams": grams}, "ties": {"density": 0.2, "lam": 1.0, "init_state": init},
               "dare": {"p": 0.9, "lam": 0.5, "seed": 0, "init_state": init}}
    for method, options in methods.items():
        run = lambda: merge.merge_modalities(state, method, **options)  # noqa: E731
        t = paired_seconds(copy, run, device, repeats)
        target = "≤ 2× time, ≤ 1.2× ckpt memory" if method == "interpolation" else ""
        rows.append([f"merge_modalities {method}", f"{arch} msa", f"{1000 * t.ours:.0f} ms",
                     f"copy {1000 * t.ref:.0f} ms; peak +{peak_bytes(run, device) / size:.2f}× ckpt", t, target])
    # Gram collection: the same forward passes with and without the hooks
    model = model.to(device).eval()
    cfg = model.cfg
    batches = [random_pretrain_batch(cfg, 8, 40, device, torch.Generator().manual_seed(i)) for i in range(2)]

    def bare():
        with torch.no_grad():
            for b in batches:
                modality_forward(model, b)
    t = paired_seconds(bare, lambda: merge.collect_grams(model, batches, forward=modality_forward), device, repeats)
    # Arithmetic floor: per token and block the Grams of qkv, proj, fc1 (D² each) and fc2 ((4D)² = 16D²)
    # cost 2·19·D² multiply-adds against the block's own 2·12·D²: hooks cannot cost less than ~2.6x.
    floor = 1 + 19 / 12
    rows.append(["collect_grams", f"{arch} msa, 2 batches", f"{1000 * t.ours:.0f} ms",
                 f"forwards {1000 * t.ref:.0f} ms; FLOP floor {floor:.2f}×", t,
                 f"≤ 1.2 (below the {floor:.1f}× floor: see README)"])
    return state


def bench_distances(device, state, rows, repeats):
    """The four Sec. 7 metrics between the v and l experts; peak memory in MiB and in copies of one expert
    set (the target: no flattened copies of the weights; the temporaries are bounded by merge._CHUNK)."""
    a, b = merge.modality_weights(state)
    weights = sum(v.numel() * v.element_size() for v in a.values())
    reference = lambda: sum(float((x - y).pow(2).sum()) for x, y in zip(a.values(), b.values()))  # noqa: E731
    for name, metric in METRICS.items():
        t = paired_seconds(reference, lambda: metric(a, b), device, repeats)
        peak = peak_bytes(lambda: metric(a, b), device)
        rows.append([f"distance {name}", f"{sum(v.numel() for v in a.values()) / 1e6:.1f}M weights",
                     f"{1000 * t.ours:.0f} ms", f"Σ(a−b)² {1000 * t.ref:.0f} ms; "
                     f"peak +{peak / 2**20:.0f} MiB = {peak / weights:.2f}× the weights", t,
                     "≤ ~2 extra copies" if name == "tssd" else ""])


def bench_data(args, rows, repeats):
    """Synthetic images drawn per second, and collated pre-training batches with DataLoader workers."""
    world = data.SyntheticWorld(seed=0, image_size=32)
    n = 256 if args.quick else 4096
    t = median_seconds(lambda: world.generate(n, seed=1), torch.device("cpu"), repeats, warmup=1)
    rows.append(["synthetic world", f"{n} scenes, 32 px", f"{n / t:.0f} img/s", "", None, "thousands/s"])
    dataset = world.dataset("pretrain", "train")
    collate = data.Collator(world.tokenizer(), max_len=32, image_size=32, train=True)
    n_batches = 4 if args.quick else 40

    def consume(workers):
        loader = torch.utils.data.DataLoader(dataset, 64, shuffle=True, collate_fn=collate, num_workers=workers)
        return lambda: [None for _, _batch in zip(range(n_batches), loader)]
    t = paired_seconds(consume(0), consume(2), torch.device("cpu"), repeats, warmup=0)
    rows.append(["loader (RandAugment + MLM)", "2 workers", f"{n_batches * 64 / t.ours:.0f} samples/s",
                 f"0 workers {n_batches * 64 / t.ref:.0f}/s", t, "time ratio < 1"])


def flat_row(row):
    """[..., ratio or Paired or None, target] -> [..., median ratio, (min, max) or None, target]."""
    *head, ratio, target = row
    if isinstance(ratio, Paired):
        return [*head, ratio.ratio, (ratio.lo, ratio.hi), target]
    return [*head, ratio, None, target]


def run_bench(args):
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but no CUDA device is available")
    # pairs of (reference, candidate) timings per ratio: its median and min-max; one pair has no range
    repeats = args.pairs or (3 if args.quick else 5)
    if repeats < 1:
        raise ValueError(f"--pairs {args.pairs}: give at least 1")
    # (image size, patch, depth, batch, repeats) of the vision-route and pre-training comparisons
    vision = (32, 8, 2, 8, repeats) if args.quick else ((224, 16, 12, 64 if device.type == "cuda" else 8, repeats))
    rows = []
    train.malloc_mode("reuse")  # timed calls reuse touched pages, as training does (PeakMemory switches per use)
    bench_vision(args, device, vision, rows)
    archs = [args.arch] if args.quick else ["vit_tiny", "vit_base"]
    for arch in archs:
        shape = vision if args.quick else (224, 16, 12, (128 if arch == "vit_tiny" else 64) if device.type == "cuda"
                                           else 8, repeats)
        bench_pretrain(args, device, shape, rows, arch)
    bench_attention(args, device, rows, repeats)
    state = bench_merge(args, device, args.arch if args.quick else "vit_base", rows, repeats)
    bench_distances(device, state, rows, repeats)
    bench_data(args, rows, repeats)
    header = ["benchmark", "setting", "ours", "reference", "ratio", "range", "target"]
    print(f"\n**vlmerge bench** — {device.type}"
          f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}),"
          f" torch {torch.__version__}\n")
    rows = [flat_row(r) for r in rows]
    print(table(header, [r[:4] + [fmt(r[4]), "" if r[5] is None else f"{r[5][0]:.2f}–{r[5][1]:.2f}", r[6]]
                         for r in rows]))  # a ratio None has no reference (MFU on a CPU)
    result = {"device": str(device), "torch": torch.__version__, "quick": args.quick,
              "rows": [dict(zip(header, r)) for r in rows]}
    train.write_json(args.json, result)
    return result


# ----------------------------------------------------------------------------------------------
# The other commands.

def cmd_merge(args):
    checkpoint = train.load_checkpoint(args.ckpt)
    if "variant" in checkpoint and checkpoint["variant"] == "maa":
        raise ValueError(f"{args.ckpt} is already modality-agnostic (variant maa): nothing to merge")
    options = {"interpolation": {"alpha": args.alpha}, "modality_arithmetic": {"lam": args.lam},
               "regmean": {"gamma": args.gamma}, "ties": {"density": args.density, "lam": args.lam},
               "dare": {"p": args.p, "lam": args.lam, "seed": args.seed}}[args.method]
    init = train.load_checkpoint(args.init_state) if args.init_state else None
    grams = None
    if args.method == "regmean":
        batches = gram_batches(checkpoint, args.gram_samples, args.batch_size, data_flags(vars(args)))
        grams = checkpoint_grams(checkpoint, batches, args.device)
    merged = merge_checkpoint(checkpoint, args.method, init, grams, **options)
    train.save_checkpoint(args.output, merged)
    print(f"merged {args.ckpt} by {args.method} {options} -> {args.output}")


def cmd_distance(args):
    a = train.load_checkpoint(args.ckpt)["model"]
    b = train.load_checkpoint(args.ckpt2)["model"] if args.ckpt2 else None
    if args.init_state and b is not None:
        raise ValueError("--init-state measures the v and l experts of one checkpoint: give one CKPT")
    init = train.load_checkpoint(args.init_state)["model"] if args.init_state else None
    result = distances(a, b, init)
    layers = distances(a, b, init, by_layer=True)
    what = f"v vs l experts of {args.ckpt}" if b is None else f"{args.ckpt} vs {args.ckpt2}"
    shown = lambda v: "–" if v is None else f"{v:.6g}"  # noqa: E731
    print(table(["metric", what], [[k, shown(v)] for k, v in result.items()]))
    print("\nper layer:\n")
    print(table(["layer", *result], [[layer, *(shown(row[k]) for k in result)] for layer, row in layers.items()]))
    result["layers"] = layers
    if args.json:
        train.write_json(args.json, result)
    return result


def cmd_eval(args):
    checkpoint = train.load_checkpoint(args.ckpt)
    if "config" not in checkpoint:
        raise ValueError(f"{args.ckpt} is a bare state dict: evaluate it with train.py --eval-only --init and flags")
    cfg = checkpoint["config"]
    task = args.task or cfg["task"]
    argv = ["--task", task, "--variant", cfg["variant"], "--arch", checkpoint.get("arch", "vit_tiny"),
            "--depth", str(cfg["depth"]), "--fusion-layers", str(cfg["fusion_layers"]),
            "--image-size", str(cfg["image_size"]), "--patch-size", str(cfg["patch_size"]),
            "--max-len", str(cfg["max_text_len"]), "--eval-only", "--init", args.ckpt,
            "--eval-split", args.split, "--out", args.out, *args.train_args]
    saved_vocab = (checkpoint.get("args") or {}).get("vocab")
    if saved_vocab and "--vocab" not in args.train_args:  # real data: the checkpoint's own tokenizer by default
        argv += ["--vocab", saved_vocab]
    return train.run(argv)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("recipe", help="the paper's pipeline end to end; writes REPORT.md and results.json")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS),
                   help="smoke: every stage, a few steps each (~2.5 min on 2 CPU cores); tiny: the paper in miniature; "
                        "paper: ViT-B, Sec. 5 / Table 6 on real files")
    p.add_argument("--out", default=None, help="run directory (default runs/recipe_<preset>)")
    p.add_argument("--init", default=None, help="timm-format ViT state dict (skips stage 0; 'paper' needs it)")
    p.add_argument("--ablation", action="store_true", help="add Fig. 4's shared-weight variants")
    p.add_argument("--seeds", type=int, default=1,
                   help="pre-train N times (seeds 0..N-1): Table 1, Fig. 3, Table 5 as mean ± std, r over all points")
    p.add_argument("--data-config", default=None, help="JSON {task: [train.py data flags]} for real data")
    p.add_argument("--dry-run", action="store_true", help="print every stage's command and build its model")
    p.set_defaults(func=run_recipe)

    p = sub.add_parser("temporal", help="merging over time (Dziadzio et al. 2025): init × deploy × technique over "
                                        "a stream of tasks; writes TEMPORAL.md and temporal.json")
    p.add_argument("--preset", default="tiny", choices=list(TEMPORAL_PRESETS),
                   help="smoke: the whole grid in a few steps per task (the test suite); tiny: the README's grid")
    p.add_argument("--out", default=None, help="run directory (default runs/temporal_<preset>)")
    p.add_argument("--base", default=None, help="θ_0: any maa checkpoint (default: pre-train one, cached in OUT/base)")
    # the three axes of TIME (a single cell; --grid runs them all)
    p.add_argument("--init", default="ema", choices=merge.INITS,
                   help="initialization phase: zs θ_0, ft the latest expert, all the offline merge, ema the running merge")
    p.add_argument("--deploy", default="ema", choices=merge.DEPLOYS, help="deployment phase: ft, all or ema")
    p.add_argument("--technique", default="interpolation", choices=merge.TECHNIQUES, help="merging technique M")
    p.add_argument("--ema-weight", type=float, default=0.5, help="w of the newest expert in the running merge (paper: 0.5)")
    p.add_argument("--schedule", default="uniform", choices=merge.SCHEDULES, help="weights of `all` over experts 1..t")
    p.add_argument("--no-replay", action="store_true",
                   help="train on the current task only (default: ⅓ base data, ⅓ current task, ⅓ previous tasks)")
    p.add_argument("--grid", action="store_true", help="every init × deploy cell, every technique, the baselines, T1–T6")
    p.add_argument("--seeds", type=int, default=1, help="training seeds; tables show mean ± std")
    p.add_argument("--order", default=None, choices=list(data.ORDERS), help="task order of the synthetic stream")
    # the real-file form
    p.add_argument("--stream", nargs="+", default=None, help="image–text JSON-lines, one file per task, in order")
    p.add_argument("--stream-test", nargs="+", default=None, help="one test JSON-lines file per --stream file")
    p.add_argument("--retention", default=None, help="held-out image–text JSON-lines (zero-shot retention)")
    p.add_argument("--base-data", default=None, help="pre-training image–text JSON-lines mixed in by replay")
    p.add_argument("--vocab", default=None, help="BERT vocab.txt (with --stream)")
    p.add_argument("--image-root", default=None, help="image folder (default: each file's folder)")
    p.set_defaults(func=run_temporal)

    p = sub.add_parser("merge", help="merge an msa-family checkpoint into a maa checkpoint (Sec. 4.1)")
    p.add_argument("ckpt")
    p.add_argument("--method", required=True, choices=merge.METHODS)
    p.add_argument("--alpha", type=float, default=0.75, help="interpolation: α·W_v + (1−α)·W_l (Sec. 6.4: 0.75)")
    p.add_argument("--lam", type=float, default=0.5, help="modality arithmetic / ties / dare: λ")
    p.add_argument("--gamma", type=float, default=1.0, help="RegMean: off-diagonal scale of the Gram matrices")
    p.add_argument("--density", type=float, default=0.2, help="ties: fraction of each modality vector kept")
    p.add_argument("--p", type=float, default=0.9, help="dare: drop probability")
    p.add_argument("--seed", type=int, default=0, help="dare: random seed")
    p.add_argument("--init-state", default=None, help="W_0: the seed maa checkpoint (arithmetic / ties / dare)")
    p.add_argument("--gram-samples", type=int, default=512, help="RegMean: pre-training samples for the Grams")
    p.add_argument("--batch-size", type=int, default=GRAM_BATCH, help="RegMean: samples per forward")
    # RegMean's data: train.py's data flags; by default the checkpoint's own (saved in it by train.py)
    p.add_argument("--data", default=None, help="RegMean: pre-training data ('synthetic', .jsonl, Karpathy .json)")
    p.add_argument("--image-root", default=None, help="RegMean: folder of --data's images")
    p.add_argument("--vocab", default=None, help="RegMean: the BERT vocab.txt the checkpoint was trained with")
    p.add_argument("--device", default=str(default_device()), help="RegMean: where the Grams are collected")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("distance", help="L2 / cosine / SSD / TSSD (Sec. 7) between experts or checkpoints")
    p.add_argument("ckpt")
    p.add_argument("ckpt2", nargs="?", default=None)
    p.add_argument("--init-state", default=None,
                   help="W⁰ (the seed checkpoint or init ViT): also the metrics on τ_m = W_m − W⁰ (tau_*)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    p.set_defaults(func=cmd_distance)

    p = sub.add_parser("eval", help="evaluate a checkpoint on its task (or --task)")
    p.add_argument("ckpt")
    p.add_argument("--task", default=None, choices=train.TASKS)
    p.add_argument("--split", default="test", choices=["val", "test"])
    p.add_argument("--out", default="runs/eval")
    p.add_argument("train_args", nargs=argparse.REMAINDER,
                   help="further train.py flags: real data is --eval-data (+ --eval-annotations for VQA, "
                        "--eval-image-root, --predictions FILE), or --data ROOT for cls / seg; --vocab defaults "
                        "to the one the checkpoint was trained with")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="speed and memory against references in the same process")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--arch", default="vit_tiny", choices=list(ARCHS))
    p.add_argument("--quick", action="store_true", help="tiny sizes, 3 pairs: a fast check of the table")
    p.add_argument("--pairs", type=int, default=None, help="timing pairs per ratio (default 5; --quick: 3)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd training steps")
    p.add_argument("--json", default="bench.json")
    p.set_defaults(func=run_bench)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, KeyError, FileNotFoundError, FloatingPointError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
