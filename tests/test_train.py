"""train.py: each loss against a hand computation, ITC over 2 gloo ranks = 1 process with the
global batch, interrupt-and-resume exactness, atomic checkpoints, learning on the synthetic world,
and bad input."""
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="cannot be read safely"):
        train.load_checkpoint(str(path))


def test_pretraining_lowers_each_loss(tmp_path):
    out = str(tmp_path / "pt")
    train.run(TINY + ["--steps", "40", "--batch-size", "32", "--lr", "1e-3", "--log-every", "5",
                      "--out", out, "--precision", "fp32"])
    log = read_log(out)
    for part in ("itc", "itm", "mlm"):
        assert log[-1][part] < log[0][part], (part, log[0][part], log[-1][part])
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
    args = json.load(open(os.path.join(out, "args.json")))
    model = train.model_from_checkpoint(train.load_checkpoint(os.path.join(out, "ckpt.pt")))
    language = [n for n, _ in model.named_parameters() if ".l." in n or ".vl." in n or n.startswith("word_embed")]
    assert args["frozen_parameters"] == len(language) + 1  # + text_pos_embed


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
