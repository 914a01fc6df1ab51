"""train.py: each loss against a hand computation, ITC over 2 gloo ranks = 1 process with the
global batch, interrupt-and-resume exactness, atomic checkpoints, learning on the synthetic world,
and bad input."""
import contextlib
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import train
from conftest import ROOT, fresh_python


# --- losses against hand computation ---------------------------------------------------------------

def test_itc_loss_is_symmetric_cross_entropy():
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    log_scale = torch.tensor(math.log(10.0))
    loss, sim = train.itc_loss(img, txt, log_scale)
    expected = 0.0
    for i in range(4):  # -log softmax of the matching pair, both directions, averaged
        row = [10 * float(img[i] @ txt[j]) for j in range(4)]
        col = [10 * float(txt[i] @ img[j]) for j in range(4)]
        expected += -(row[i] - math.log(sum(math.exp(r) for r in row))) / 8
        expected += -(col[i] - math.log(sum(math.exp(c) for c in col))) / 8
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert torch.allclose(sim, 10 * img @ txt.T)


def test_itc_temperature_is_clamped_at_100():
    img = F.normalize(torch.randn(3, 4), dim=-1)
    big, _ = train.itc_loss(img, img, torch.tensor(20.0))
    clamped, _ = train.itc_loss(img, img, torch.tensor(math.log(100)))
    assert big.item() == pytest.approx(clamped.item(), rel=1e-6)


def test_hard_negatives_are_never_the_positive_and_follow_similarity():
    torch.manual_seed(0)
    sim = torch.zeros(5, 5)
    sim[torch.arange(5), (torch.arange(5) + 1) % 5] = 50.0  # one very similar wrong caption per image
    sim.fill_diagonal_(100.0)  # the positive is the most similar, and must still never be drawn
    for _ in range(20):
        neg = train.sample_hard_negatives(sim)
        assert (neg != torch.arange(5)).all()
        assert torch.equal(neg, (torch.arange(5) + 1) % 5)


def test_itm_labels_are_positives_then_two_negatives_each():
    assert train.itm_labels(3).tolist() == [1, 1, 1, 0, 0, 0, 0, 0, 0]


def test_mlm_loss_counts_masked_positions_only():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g)
    labels = torch.tensor([[-100, 4, -100], [2, -100, -100]])
    expected = -(logits[0, 1].log_softmax(-1)[4] + logits[1, 0].log_softmax(-1)[2]) / 2
    assert train.mlm_loss(logits, labels).item() == pytest.approx(expected.item(), rel=1e-6)
    assert train.mlm_loss(logits, torch.full((2, 3), -100)).item() == 0.0  # nothing masked: no signal, no NaN


def test_vqa_loss_is_soft_bce_times_answers():
    logits, target = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.3]])
    by_hand = sum(-(t * math.log(1 / (1 + math.exp(-x))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-x))))
                  for x, t in zip(logits[0].tolist(), target[0].tolist()))
    assert train.vqa_loss(logits, target).item() == pytest.approx(by_hand, rel=1e-6)


def pretrain_batch(b=4, length=6, vocab=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.long)
    mask[1, 3:] = 0  # caption 1 is padded: its mask must travel with it into the negatives
    mlm_labels = torch.full((b, length), -100)
    mlm_labels[0, 1], mlm_labels[2, 2] = ids[0, 1], ids[2, 2]
    mlm_ids = ids.clone()
    mlm_ids[0, 1] = mlm_ids[2, 2] = 4  # [MASK]
    return {"images": torch.randn(b, 3, 32, 32, generator=g), "input_ids": ids, "attention_mask": mask,
            "mlm_input_ids": mlm_ids, "mlm_labels": mlm_labels}


def test_pretraining_objective_is_itc_plus_itm_plus_quarter_mlm(monkeypatch):
    from model import build_model
    torch.manual_seed(0)
    model = build_model("vit_tiny", "msa", vocab_size=40, image_size=32, patch_size=8, depth=2, fusion_layers=1)
    batch = pretrain_batch()
    neg_text, neg_image = torch.tensor([2, 3, 0, 1]), torch.tensor([1, 0, 3, 2])
    draws = iter([neg_text, neg_image])
    monkeypatch.setattr(train, "sample_hard_negatives", lambda sim: next(draws))
    loss, parts = train.Objective(model)(batch)

    images, ids, mask = batch["images"], batch["input_ids"], batch["attention_mask"]
    itc, _ = train.itc_loss(*model.itc_embed(model.encode_image(images), model.encode_text(ids, mask)),
                            model.logit_scale)
    # ITM by hand: the 4 true pairs, each image with its hard negative text (and that text's mask),
    # each text with its hard negative image; labels 1 for the true pairs, 0 for the 8 negatives
    pairs = [(images, ids, mask), (images, ids[neg_text], mask[neg_text]), (images[neg_image], ids, mask)]
    logits = torch.cat([model.itm_logits(model.encode_pair(*p)) for p in pairs])
    itm = F.cross_entropy(logits, torch.tensor([1] * 4 + [0] * 8))
    mlm = train.mlm_loss(model.mlm_logits(model.encode_pair(images, batch["mlm_input_ids"], mask), 6),
                         batch["mlm_labels"])
    for got, want in ((parts["itc"], itc), (parts["itm"], itm), (parts["mlm"], mlm), (loss, itc + itm + 0.25 * mlm)):
        assert got.item() == pytest.approx(want.item(), rel=1e-5, abs=1e-6)


def test_gradient_accumulation_equals_one_step_on_the_full_batch():
    """Two micro-batches of 4 with --accum-steps 2 move the weights exactly as one batch of 8 (SGD, so
    that the size of the gradient shows: Adam's first step would only see its sign)."""
    import argparse
    from model import build_model
    g = torch.Generator().manual_seed(0)
    full = {"images": torch.randn(8, 3, 32, 32, generator=g), "label": torch.randint(0, 5, (8,), generator=g)}
    halves = [{k: v[:4] for k, v in full.items()}, {k: v[4:] for k, v in full.items()}]
    results = []
    for accum, batches in ((1, [full]), (2, halves)):
        torch.manual_seed(0)
        model = build_model("vit_tiny", "maa", "cls", vocab_size=40, image_size=32, patch_size=8, depth=2,
                            fusion_layers=1, num_classes=5)
        optimizer = torch.optim.SGD([{"params": list(model.parameters())}, {"params": []}], lr=1.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        args = argparse.Namespace(accum_steps=accum, clip_grad=0.0)
        train.train_step(train.Objective(model), iter(batches), optimizer, scheduler, scaler,
                         contextlib.nullcontext(), args, train.Meter())
        results.append(model.state_dict())
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-6, msg=key)


def test_head_lr_mult_speeds_up_only_the_freshly_initialized_head():
    """--head-lr-mult 10: Adam's first step moves every weight by about its group's lr (|g| / (|g| + eps)),
    so the VQA head (which no pre-trained checkpoint has) moves 10x as far as the backbone and as the
    pooler (which pre-training's ITM trained); without the flag the optimizer keeps its two groups."""
    import argparse
    from model import build_model
    torch.manual_seed(0)
    model = build_model("vit_tiny", "maa", "vqa", vocab_size=40, image_size=32, patch_size=8, depth=2,
                        fusion_layers=1, num_answers=6)
    args = argparse.Namespace(lr=1e-3, head_lr_mult=10.0, weight_decay=0.0, steps=10, warmup=0, precision="fp32")
    optimizer, scheduler, _ = train.make_optimizer(args, model, torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    fast = {names[id(p)] for g in optimizer.param_groups if g["lr"] == pytest.approx(1e-2) for p in g["params"]}
    assert fast == {n for n, _ in model.named_parameters() if n.startswith("vqa_head.")}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    assert moved["vqa_head.3.weight"] == pytest.approx(1e-2, rel=1e-3)
    assert moved["pooler.0.weight"] == pytest.approx(1e-3, rel=1e-3)
    assert moved["patch_embed.proj.weight"] == pytest.approx(1e-3, rel=1e-3)
    args.head_lr_mult = 1.0
    assert len(train.make_optimizer(args, model, torch.device("cpu"))[0].param_groups) == 2


def test_gram_forward_feeds_each_expert_only_its_own_modality():
    """RegMean's Grams are X^T X of each expert's inputs: the v experts must see image tokens only, the
    l experts text tokens only, the vl experts the fused sequence (Fig. 2b), never the other's."""
    import vlmerge
    from model import build_model
    torch.manual_seed(0)
    model = build_model("vit_tiny", "msa", vocab_size=40, image_size=32, patch_size=8, depth=2,
                        fusion_layers=1).eval()
    batch = pretrain_batch()
    seen = {}
    hooks = [model.blocks[i].attn[m].qkv.register_forward_hook(
        lambda mod, inp, out, key=(i, m): seen.setdefault(key, []).append(inp[0].shape[1]))
        for i, m in ((0, "v"), (0, "l"), (1, "v"), (1, "l"), (1, "vl"))]
    with torch.no_grad():
        vlmerge.modality_forward(model, batch)
    for h in hooks:
        h.remove()
    # token counts per call: 17 image tokens (16 patches + [CLS]), 6 text tokens, 23 fused
    assert seen == {(0, "v"): [17], (0, "l"): [6], (1, "v"): [17], (1, "l"): [6], (1, "vl"): [23]}


def test_recall_at_k_by_hand():
    # 2 images, 4 captions; captions 0,1 belong to image 0 and 2,3 to image 1
    sim = torch.tensor([[0.1, 0.9, 0.8, 0.0],    # image 0: best caption 1 (its own) -> TR@1 hit
                        [0.9, 0.0, 0.1, 0.2]])   # image 1: best caption 0 (wrong) -> TR@1 miss
    out = train.recall_at_k(sim, torch.tensor([0, 0, 1, 1]), ks=(1, 2))
    assert out["tr_r1"] == 50.0 and out["tr_r2"] == 100.0  # image 1's caption 3 is its 2nd best
    # IR: caption 0 -> image 1 (miss), 1 -> 0 (hit), 2 -> 0 (miss), 3 -> 1 (hit)
    assert out["ir_r1"] == 50.0 and out["ir_r2"] == 100.0


def test_miou_by_hand():
    confusion = torch.tensor([[3, 1], [0, 2]])  # rows: truth, columns: prediction
    assert train.confusion_miou(confusion) == pytest.approx(100 * (3 / 4 + 2 / 3) / 2)


# --- ITC over 2 gloo ranks == one process with the global batch --------------------------------------

class TinyTowers(nn.Module):
    """Two linear towers and a temperature: enough to make ITC gradients reach parameters."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = nn.Linear(6, 4), nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    def forward(self, x_img, x_txt):
        loss, _ = train.itc_loss(F.normalize(self.image(x_img), dim=-1), F.normalize(self.text(x_txt), dim=-1),
                                 self.logit_scale)
        return loss


def itc_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 6, generator=g), torch.randn(8, 5, generator=g)


def _itc_rank(rank, world, port, out_dir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        x_img, x_txt = itc_inputs()
        b = len(x_img) // world
        model = nn.parallel.DistributedDataParallel(TinyTowers())
        loss = model(x_img[rank * b:(rank + 1) * b], x_txt[rank * b:(rank + 1) * b])
        loss.backward()
        reduced = loss.detach().clone()
        dist.all_reduce(reduced)
        grads = {n: p.grad for n, p in model.module.named_parameters()}
        torch.save({"loss": reduced / world, "grads": grads}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_itc_two_gloo_ranks_equal_one_process_with_twice_the_batch(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_itc_rank, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    model = TinyTowers()
    loss = model(*itc_inputs())
    loss.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["grads"][name], p.grad, rtol=1e-5, atol=1e-7)


# --- runs on the synthetic world --------------------------------------------------------------------

TINY = ["--arch", "vit_tiny", "--depth", "2", "--fusion-layers", "1", "--image-size", "32", "--patch-size", "8",
        "--max-len", "24", "--eval-batch-size", "64", "--workers", "0", "--quiet"]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_interrupt_and_resume_reaches_the_same_loss(tmp_path, monkeypatch):
    common = TINY + ["--steps", "6", "--batch-size", "8", "--precision", "fp32", "--log-every", "1",
                     "--save-every", "3", "--lr", "1e-3"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    train.run(common + ["--out", full])

    real_save = train.save_checkpoint

    def save_then_die(path, ckpt):  # the machine goes down right after the step-3 checkpoint
        real_save(path, ckpt)
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.run(common + ["--out", cut])
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    with open(os.path.join(cut, f"ckpt.pt.{os.getpid()}.tmp"), "wb") as f:  # a later save that was cut off mid-write
        f.write(b"\x80\x02truncated")
    train.run(common + ["--out", cut, "--resume"])

    a, b = read_log(full), read_log(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], abs=1e-5)
    sa = train.load_checkpoint(os.path.join(full, "ckpt.pt"))["model"]
    sb = train.load_checkpoint(os.path.join(cut, "ckpt.pt"))["model"]
    # Weights: AdamW divides by sqrt(v)+eps, so a near-zero gradient that differs in its last bits (CPU
    # reduction order under load) can move one entry by up to lr per step; the bulk must agree to 1e-6.
    diffs = torch.cat([(sa[k].float() - sb[k].float()).abs().flatten() for k in sa])
    assert diffs.mean() < 1e-6 and diffs.max() <= 3 * 1e-3, (diffs.mean(), diffs.max())


def test_keep_at_writes_snapshots_of_the_run_at_those_steps(tmp_path):
    out = str(tmp_path / "run")
    common = TINY + ["--steps", "4", "--batch-size", "8", "--precision", "fp32", "--lr", "1e-3", "--out", out]
    with pytest.raises(ValueError, match="--keep-at"):
        train.run(common + ["--keep-at", "5"])
    train.run(common + ["--keep-at", "2", "3"])
    snap, last = (train.load_checkpoint(os.path.join(out, f)) for f in ("ckpt_step2.pt", "ckpt.pt"))
    assert (snap["step"], last["step"]) == (2, 4)
    assert not os.path.exists(os.path.join(out, "ckpt_step4.pt"))
    assert os.path.exists(os.path.join(out, "ckpt_step3.pt"))
    assert any(not torch.equal(snap["model"][k], last["model"][k]) for k in snap["model"])


def test_a_cpu_training_step_in_reuse_mode_does_not_fault_its_activations_in_again():
    # glibc's defaults hand freed activations back to the kernel, so each tiny-preset step faulted ~46 000 pages
    # in again (~18 % of the step). fit() sets malloc_mode("reuse"); after warm-up a step then takes (almost) no
    # minor faults. A fresh process, so that what pytest has allocated does not decide the heap's shape.
    script = ("import resource, torch, train, vlmerge\n"
              "train.malloc_mode('reuse')\n"
              "m = train.build_model('vit_tiny', 'msa', image_size=32, patch_size=8, depth=4, fusion_layers=2,"
              " vocab_size=69)\n"
              "obj, opt = train.Objective(m), torch.optim.AdamW(m.parameters(), lr=1e-4)\n"
              "b = vlmerge.random_pretrain_batch(m.cfg, 64, 32, torch.device('cpu'), torch.Generator().manual_seed(0))\n"
              "def step():\n"
              "    with torch.autocast('cpu', torch.bfloat16):\n"
              "        loss, _ = obj(b)\n"
              "    loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)\n"
              "for _ in range(3): step()\n"
              "f = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
              "for _ in range(3): step()\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f)\n")
    assert int(fresh_python(script)) < 20_000  # faults in 3 steps (seen: 0, once 5 832); glibc's defaults: ~150 000


def test_fit_puts_glibc_in_reuse_mode(tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(train, "malloc_mode", modes.append)
    train.run(TINY + ["--steps", "1", "--batch-size", "4", "--precision", "fp32", "--out", str(tmp_path / "r")])
    assert modes == ["reuse"]
    monkeypatch.undo()
    with pytest.raises(ValueError, match="unknown mode 'fast'"):
        train.malloc_mode("fast")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot be read safely"):
        train.load_checkpoint(str(path))


def caption_unigram_entropy(max_len, scenes=600):
    """The entropy of the ordinary tokens of the synthetic training captions (cut at max_len): the MLM
    loss of a predictor that knows the token frequencies and nothing of the context."""
    import data
    world = data.SyntheticWorld(seed=0, image_size=32)
    tokenizer, captions = world.tokenizer(), world.dataset("pretrain", "train")
    counts = {}
    for j in range(scenes):
        for text in captions.scene_spec(j)["captions"]:
            ids, mask = tokenizer.encode(text, max_len)
            for i in ids[mask.bool()].tolist():
                if i not in tokenizer.special_ids:
                    counts[i] = counts.get(i, 0) + 1
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values()), len(tokenizer)


def test_pretraining_lowers_each_loss(tmp_path):
    out, batch = str(tmp_path / "pt"), 32
    train.run(TINY + ["--steps", "40", "--batch-size", str(batch), "--lr", "1e-3", "--log-every", "1",
                      "--out", out, "--precision", "fp32"])
    log = read_log(out)
    first = log[0]  # step 1: the losses of the initial model on the first batch
    last = {part: sum(r[part] for r in log[-10:]) / 10 for part in ("itc", "itm", "mlm")}  # steps 31..40
    unigram, vocab = caption_unigram_entropy(max_len=24)
    # At the start every prediction is near uniform: ITC picks among B candidates both ways (ln B),
    # ITM between two classes (ln 2, whatever the label mix), MLM among the whole vocabulary (ln V).
    assert first["itc"] == pytest.approx(math.log(batch), abs=0.1), first
    assert first["itm"] == pytest.approx(math.log(2), abs=0.05), first
    assert first["mlm"] == pytest.approx(math.log(vocab), abs=0.15), first
    # ITC learns which caption is whose: a wrong diagonal (labels that are not the matching pairs)
    # leaves nothing to learn and stays at ln B.
    assert last["itc"] < math.log(batch) - 0.15, last
    # ITM learns at least its label mix, 1 positive to 2 hard negatives: the best predictor that ignores
    # the pair has loss H(1/3) = −(⅓ ln ⅓ + ⅔ ln ⅔) ≈ 0.6365; a 1:1 mix would stay at ln 2.
    assert last["itm"] < -(math.log(1 / 3) / 3 + 2 * math.log(2 / 3) / 3) + 0.02, last
    # MLM learns at least the token frequencies of the captions: its loss falls from ln V to about
    # their unigram entropy. 40 steps learn little context beyond that, so labels shifted by one
    # position (same frequencies) are left to the hand computations of mlm_loss and the objective.
    assert last["mlm"] < unigram + 0.2 < math.log(vocab) - 0.7, (last, unigram)
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert {"tr_r1", "ir_r1", "avg"} <= set(metrics)


def test_finetuning_vqa_beats_chance(tmp_path):
    out = str(tmp_path / "vqa")
    metrics = train.run(TINY + ["--task", "vqa", "--variant", "maa", "--steps", "150", "--batch-size", "32",
                                "--lr", "2e-3", "--out", out, "--eval-split", "val"])
    import data
    world = data.SyntheticWorld(seed=0, image_size=32)
    val = world.dataset("vqa", "val")
    # the best constant answer: what a model that ignores image and question would score
    targets = torch.stack([val[i]["target"] for i in range(len(val))])
    constant = 100 * targets.mean(0).max().item()
    assert metrics["vqa_score"] > constant + 2, (metrics, constant)


def test_finetuning_msa_on_a_vision_task_trains_only_the_vision_route(tmp_path):
    out = str(tmp_path / "cls")
    train.run(TINY + ["--task", "cls", "--variant", "msa", "--steps", "2", "--batch-size", "8", "--out", out])
    frozen = set(json.load(open(os.path.join(out, "args.json")))["frozen_parameters"])
    model = train.model_from_checkpoint(train.load_checkpoint(os.path.join(out, "ckpt.pt")))
    # Sec. 6.5: every language and fusion expert, and the text embeddings, stay as they were
    language = {n for n, _ in model.named_parameters()
                if ".l." in n or ".vl." in n or n.startswith(("word_embed.", "text_pos_embed"))}
    assert frozen == language and "norm.l.weight" in frozen and "norm.v.weight" not in frozen


# --- bad input ------------------------------------------------------------------------------------

def run_cli(*argv):
    return subprocess.run([sys.executable, "train.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_unknown_flag_value_exits_nonzero_naming_it():
    proc = run_cli("--variant", "moe")
    assert proc.returncode == 2 and "moe" in proc.stderr


def test_missing_data_file_is_one_clear_line(tmp_path):
    proc = run_cli(*TINY, "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == f"error: --data {tmp_path / 'nope.jsonl'}: no such file"


def test_checkpoint_of_another_arch_is_refused(tmp_path):
    out = str(tmp_path / "a")
    train.run(TINY + ["--steps", "1", "--batch-size", "8", "--out", out, "--variant", "maa"])
    with pytest.raises(ValueError, match="arch 'vit_tiny', but --arch is 'vit_small'"):
        train.run(TINY[:1] + ["vit_small"] + TINY[2:] + ["--steps", "1", "--init", os.path.join(out, "ckpt.pt"),
                                                          "--out", str(tmp_path / "b")])
    with pytest.raises(ValueError, match="variant 'maa', but --variant is 'msa'"):
        train.run(TINY + ["--steps", "2", "--resume", "--out", out, "--variant", "msa"])


def test_msa_checkpoint_cannot_initialize_another_variant(tmp_path):
    out = str(tmp_path / "m")
    train.run(TINY + ["--steps", "1", "--batch-size", "8", "--out", out, "--variant", "msa"])
    with pytest.raises(ValueError, match="merge it first"):
        train.run(TINY + ["--steps", "1", "--variant", "custom_ln", "--init", os.path.join(out, "ckpt.pt"),
                          "--out", str(tmp_path / "n")])


def test_nan_loss_stops_with_clear_error_and_no_checkpoint(tmp_path):
    out = str(tmp_path / "nan")
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        train.run(TINY + ["--steps", "6", "--batch-size", "8", "--lr", "1e30", "--clip-grad", "0", "--log-every", "1",
                          "--out", out, "--precision", "fp32"])
    assert not os.path.exists(os.path.join(out, "ckpt.pt"))
    assert not any(name.endswith(".tmp") for name in os.listdir(out))


# --- defaults: the card's command is a quick run; --paper is Sec. 5 / Table 6 ------------------------

def test_the_cards_command_resolves_to_a_quick_run():
    args = train.parse_args(["--arch", "vit_tiny"])
    assert (args.image_size, args.patch_size, args.depth, args.max_len) == (32, 8, 4, 40)
    assert (args.batch_size, args.steps, args.lr) == (64, 500, 5e-4)
    assert args.warmup <= args.steps // 10 and args.data == "synthetic"
    # the budget: steps x global batch stays in the thousands of samples a 2-core CPU does in minutes
    assert args.steps * args.batch_size <= 50_000
    finetune = train.parse_args(["--task", "vqa"])
    assert (finetune.steps, finetune.batch_size, finetune.image_size, finetune.warmup) == (300, 64, 32, None)


def test_paper_flag_resolves_to_section_5_and_table_6():
    args = train.parse_args(["--paper"])
    assert (args.arch, args.image_size, args.patch_size, args.depth, args.fusion_layers, args.max_len) == \
        ("vit_base", 224, 16, 12, 2, 40)
    assert (args.batch_size, args.steps, args.warmup, args.lr) == (1024, 200_000, 2500, 2e-4)
    vqa = train.parse_args(["--paper", "--task", "vqa"])   # Table 6: 480 px, 3e-5, batch 128, 10 epochs
    assert (vqa.image_size, vqa.lr, vqa.batch_size, vqa.epochs) == (480, 3e-5, 128, 10)
    nlvr2 = train.parse_args(["--paper", "--task", "nlvr2"])
    assert (nlvr2.image_size, nlvr2.lr, nlvr2.batch_size, nlvr2.epochs) == (384, 5e-5, 128, 10)
    coco = train.parse_args(["--paper", "--task", "retrieval"])
    assert (coco.image_size, coco.lr, coco.batch_size, coco.epochs) == (384, 6.25e-6, 640, 20)
    # a flag on the command line beats the profile
    assert train.parse_args(["--paper", "--batch-size", "256", "--image-size", "64"]).batch_size == 256


def test_batch_size_is_global_and_split_over_ranks_and_accumulation():
    args = train.parse_args(["--batch-size", "64", "--accum-steps", "4"])
    assert train.micro_batch_size(args, world=2) == 8
    with pytest.raises(ValueError, match="--batch-size 60 does not split over 2 rank"):
        train.micro_batch_size(train.parse_args(["--batch-size", "60", "--accum-steps", "4"]), world=2)


def test_epochs_become_steps_from_the_data_size(tmp_path):
    out = str(tmp_path / "run")
    train.run(TINY + ["--epochs", "0.01", "--batch-size", "32", "--out", out, "--precision", "fp32"])
    # 0.01 epochs of the 100 000 pre-training captions at batch 32 -> ceil(1000 / 32) = 32 steps
    assert train.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 32


# --- DDP: a 2-rank gloo run killed and resumed is the uninterrupted run, on every rank -----------------

def _train_rank(rank, world, port, argv, interrupt, rng_dir):
    """One torchrun-like rank running train.run; `interrupt` kills it right after the first checkpoint
    (every rank reaches the barrier that follows a save), as a pre-empted job would die."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import torch.distributed as dist
    real_barrier = train.barrier

    def barrier_then_die():
        real_barrier()
        raise KeyboardInterrupt
    if interrupt:
        train.barrier = barrier_then_die
    try:
        train.run(argv)
        torch.save(torch.get_rng_state(), os.path.join(rng_dir, f"rng{rank}.pt"))  # where each rank's stream ended
    except KeyboardInterrupt:
        pass
    finally:
        train.barrier = real_barrier
        if dist.is_initialized():
            dist.destroy_process_group()


def test_two_rank_run_killed_and_resumed_equals_the_uninterrupted_run(tmp_path):
    import torch.multiprocessing as mp
    common = TINY + ["--steps", "4", "--batch-size", "8", "--precision", "fp32", "--log-every", "1",
                     "--save-every", "2", "--lr", "1e-3", "--device", "cpu"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    for d in (full, cut):
        os.makedirs(d)
    mp.spawn(_train_rank, args=(2, free_port(), common + ["--out", full], False, full), nprocs=2, join=True)
    mp.spawn(_train_rank, args=(2, free_port(), common + ["--out", cut], True, cut), nprocs=2, join=True)
    assert train.load_checkpoint(os.path.join(cut, "ckpt.pt"))["step"] == 2
    mp.spawn(_train_rank, args=(2, free_port(), common + ["--out", cut, "--resume"], False, cut), nprocs=2, join=True)
    # logged losses are all-reduced over ranks: each rank's hard negatives (its own RNG) enter them
    assert [r["loss"] for r in read_log(cut)] == [r["loss"] for r in read_log(full)]
    a, b = (train.load_checkpoint(os.path.join(d, "ckpt.pt")) for d in (full, cut))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(b["rng"]) == 2 and not torch.equal(b["rng"][0]["torch"], b["rng"][1]["torch"])
    for rank in (0, 1):  # every rank's random stream continued where its own left off
        assert torch.equal(torch.load(os.path.join(full, f"rng{rank}.pt"), weights_only=True),
                           torch.load(os.path.join(cut, f"rng{rank}.pt"), weights_only=True))


def test_batch_stream_is_deterministic_shards_ranks_and_skips_to_a_step():
    """train.batch_stream, the one loader of the project: the same batches for the same seed (with DataLoader
    workers too), disjoint shards per rank, and a stream started at step s equal to the full stream's step s."""
    import data

    class Numbered(torch.utils.data.Dataset):  # sample i says which it is
        def __len__(self):
            return 400

        def __getitem__(self, i):
            return {"image": torch.zeros(3, 8, 8, dtype=torch.uint8), "text": "a", "image_id": i}
    dataset = Numbered()
    collate = data.Collator(data.SyntheticWorld().tokenizer(), max_len=8, seed=0)
    args = train.parse_args(["--seed", "5"])
    cpu = torch.device("cpu")

    def ids(rank=0, world_size=1, start=0, workers=0, n=4):
        args.workers = workers
        stream = train.batch_stream(dataset, collate, args, 50, rank, world_size, start, cpu)
        return [next(stream)["image_id"].tolist() for _ in range(n)]
    first = ids()
    assert first == ids(workers=2) and first[2:] == ids(start=2, n=2)  # workers; resume at step 2
    assert sorted(sum(first + ids(start=4), [])) == list(range(400))     # an epoch sees each sample once
    shards = [sum(ids(rank=r, world_size=2), []) for r in (0, 1)]         # 4 x 50 per rank: one epoch
    assert sorted(shards[0] + shards[1]) == list(range(400))
    assert sum(ids(n=8), []) != sum(ids(n=16)[8:], [])                     # the next epoch is reshuffled
    with pytest.raises(ValueError, match="smaller than one micro-batch"):
        next(train.batch_stream(dataset, collate, args, 401, 0, 1, 0, cpu))
