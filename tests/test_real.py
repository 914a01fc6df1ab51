"""Real-format data end to end: for each format (image-text JSON-lines, Karpathy retrieval, VQA v2, NLVR2,
ImageFolder, ADE20k) a small fixture of real JPEG / PNG files and annotation files is written here, a model is
trained a few steps on it and evaluated, and metrics.json must hold the task's metric with the value a hand
computation gives for a model whose outputs the test fixes."""
import json
import os

import pytest
import torch
from PIL import Image

import data
import model
import train
import vlmerge

FLAGS = ["--arch", "vit_tiny", "--depth", "2", "--fusion-layers", "1", "--image-size", "32", "--patch-size", "8",
         "--max-len", "16", "--eval-batch-size", "3", "--quiet", "--precision", "fp32", "--steps", "2",
         "--batch-size", "2", "--lr", "1e-3"]
WORDS = ["a", "one", "two", "the", "cat", "dog", "cow", "what", "color", "is", "it", "how", "many", "left", "bright"]
DARK, MID, BRIGHT = 0, 128, 255  # uniform images: their normalized mean is -1, 0 or +1


def vocab(tmp_path):
    """A vocab.txt in BERT's layout: [PAD], placeholders, the special tokens, then words."""
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return str(path)


def jpeg(path, value, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value,) * 3).save(path, quality=95)
    return path


def brightness(images):
    """-1 / 0 / +1 for DARK / MID / BRIGHT images, from the normalized batch (B,)."""
    return images.mean((1, 2, 3)).round().long()


def fix_outputs(monkeypatch, outputs):
    """The model's task outputs become outputs(batch), whatever its weights; training still runs (the real
    forward is kept, times zero, so every route gets a gradient)."""
    real = model.VLTransformer.forward

    def forward(self, batch):
        return real(self, batch) * 0 + outputs(batch)
    monkeypatch.setattr(model.VLTransformer, "forward", forward)


def metrics_of(out):
    with open(os.path.join(out, "metrics.json")) as f:
        return json.load(f)


# --- image-text JSON-lines pre-training, scored on a Karpathy test split ----------------------------------

def karpathy(tmp_path):
    """Three test images (dark, mid, bright), two captions each; two more images for training."""
    images = [("a.jpg", DARK, "test", ["a cat", "one cat"]), ("b.jpg", MID, "test", ["a dog", "two cow"]),
              ("c.jpg", BRIGHT, "test", ["the cow", "the cat"]), ("d.jpg", MID, "train", ["a dog", "one dog"]),
              ("e.jpg", DARK, "restval", ["a cat", "two cat"])]
    for name, value, _, _ in images:
        jpeg(tmp_path / "coco" / "val2014" / name, value)
    spec = {"images": [{"filepath": "val2014", "filename": name, "split": split,
                        "sentences": [{"raw": c} for c in captions]} for name, _, split, captions in images]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(spec))
    return str(tmp_path / "dataset_coco.json")


def fix_retrieval_embeddings(monkeypatch, tokenizer):
    """Image k (dark / mid / bright) embeds as e_k; a caption as e_(its animal: cat 0, dog 1, cow 2) plus
    0.1·rank(first word)·e_3, so that a caption's similarity to its image falls with that rank (no ties)."""
    animal = {tokenizer.vocab[w]: k for k, w in enumerate(("cat", "dog", "cow"))}
    rank = {tokenizer.vocab[w]: r for r, w in enumerate(("a", "one", "two", "the"), 1)}

    def identity_projections(self):
        dim = self.cfg.dim
        self.itc_image_proj.weight.data = torch.eye(dim)
        self.itc_text_proj.weight.data = torch.eye(dim)
        return dim

    def encode_image(self, images):
        feats = torch.zeros(len(images), 1, identity_projections(self))
        feats[torch.arange(len(images)), 0, brightness(images) + 1] = 1.0
        return feats

    def encode_text(self, input_ids, attention_mask):
        feats = torch.zeros(len(input_ids), 1, identity_projections(self))
        for i, ids in enumerate(input_ids.tolist()):
            feats[i, 0, next(animal[t] for t in ids if t in animal)] = 1.0
            feats[i, 0, 3] = 0.1 * rank[ids[1]]  # ids[0] is [CLS]
        return feats
    monkeypatch.setattr(model.VLTransformer, "encode_image", encode_image)
    monkeypatch.setattr(model.VLTransformer, "encode_text", encode_text)


def test_jsonl_pretraining_scored_by_recall_on_a_karpathy_test_split(tmp_path, monkeypatch):
    vocab_path, coco = vocab(tmp_path), karpathy(tmp_path)
    for name, value in (("x.jpg", DARK), ("y.jpg", BRIGHT)):
        jpeg(tmp_path / "cc" / name, value)
    pairs = [{"image": "x.jpg", "caption": "a cat"}, {"image": "y.jpg", "caption": "the cow"}]
    (tmp_path / "cc.jsonl").write_text("\n".join(json.dumps(p) for p in pairs))
    fix_retrieval_embeddings(monkeypatch, data.Tokenizer.from_vocab_file(vocab_path))
    out = str(tmp_path / "pt")
    train.run(FLAGS + ["--data", str(tmp_path / "cc.jsonl"), "--image-root", str(tmp_path / "cc"), "--vocab", vocab_path,
                       "--eval-data", coco, "--eval-image-root", str(tmp_path / "coco"), "--eval-split", "test",
                       "--out", out])
    metrics = metrics_of(out)
    # by hand: image a's best caption is "a cat" (its own), b's "a dog" (own), c's "two cow" (b's: "two"
    # ranks above "the") -> TR@1 2/3; captions "two cow" and "the cat" point to other images -> IR@1 4/6
    assert metrics["tr_r1"] == pytest.approx(200 / 3) and metrics["ir_r1"] == pytest.approx(400 / 6)
    assert metrics["tr_r5"] == 100.0 and train.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 2


def test_karpathy_retrieval_finetuning_scores_the_eval_split_of_its_own_file(tmp_path, monkeypatch):
    vocab_path, coco = vocab(tmp_path), karpathy(tmp_path)
    fix_retrieval_embeddings(monkeypatch, data.Tokenizer.from_vocab_file(vocab_path))
    out = str(tmp_path / "ret")
    train.run(FLAGS + ["--task", "retrieval", "--data", coco, "--image-root", str(tmp_path / "coco"),
                       "--vocab", vocab_path, "--eval-split", "test", "--out", out])
    assert metrics_of(out)["tr_r1"] == pytest.approx(200 / 3)  # the same test split as above, by hand


# --- VQA v2: official accuracy on every question, and the test-dev submission ------------------------------

def vqa_files(tmp_path):
    for image_id, value in ((1, DARK), (2, BRIGHT)):
        jpeg(tmp_path / "train2014" / f"COCO_train2014_{image_id:012d}.jpg", value)
        jpeg(tmp_path / "val2014" / f"COCO_val2014_{image_id:012d}.jpg", value)

    def questions(subtype, ids):
        return {"data_subtype": subtype, "questions": [{"question_id": q, "image_id": 1 + q % 2,
                                                        "question": "what color is it"} for q in ids]}

    def annotations(rows):
        return {"annotations": [{"question_id": q, "multiple_choice_answer": humans[0],
                                 "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(humans)]}
                                for q, humans in rows]}
    train_rows = [(1, ["yes"] * 10), (2, ["2"] * 10), (3, ["red"] * 6 + ["blue"] * 4), (4, ["blue"] * 10)]
    # the hand computation of the official accuracy, for the answers fix_vqa predicts
    val_rows = [(100, ["yes"] * 10),               # predicted "yes": 10 matches -> 1
                (101, ["2"] * 2 + ["3"] * 8),      # "2": 2 matches -> 0.6
                (102, ["red"] + ["blue"] * 9),     # "red": 1 match -> 0.3
                (103, ["zebra"] * 10)]             # outside the training answers; "yes" -> 0, and it still counts
    files = {"q_train": questions("train2014", [1, 2, 3, 4]), "a_train": annotations(train_rows),
             "q_val": questions("val2014", [100, 101, 102, 103]), "a_val": annotations(val_rows),
             "q_test": questions("val2014", [7, 8, 9])}
    for name, content in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
    return {name: str(tmp_path / f"{name}.json") for name in files}


PREDICTED = {100: "yes", 101: "2", 102: "red", 103: "yes", 7: "blue", 8: "2", 9: "yes"}


def fix_vqa(monkeypatch, answers):
    def outputs(batch):
        picks = torch.tensor([answers.index(PREDICTED.get(q, "yes")) for q in batch["question_id"].tolist()])
        return torch.nn.functional.one_hot(picks, len(answers)).float()
    fix_outputs(monkeypatch, outputs)


def test_vqa_scores_every_question_with_the_official_accuracy_and_writes_the_submission(tmp_path, monkeypatch):
    files, vocab_path = vqa_files(tmp_path), vocab(tmp_path)
    answers = data.load_vqa(files["q_train"], files["a_train"], tmp_path / "train2014").answers
    assert answers == ["2", "blue", "red", "yes"]  # one multiple-choice answer each: ties go alphabetical
    fix_vqa(monkeypatch, answers)
    out = str(tmp_path / "vqa")
    common = FLAGS + ["--task", "vqa", "--vocab", vocab_path, "--eval-image-root", str(tmp_path / "val2014")]
    train.run(common + ["--data", files["q_train"], "--annotations", files["a_train"],
                        "--image-root", str(tmp_path / "train2014"), "--eval-data", files["q_val"],
                        "--eval-annotations", files["a_val"], "--out", out])
    metrics = metrics_of(out)
    assert metrics["vqa_score"] == pytest.approx(100 * (1 + 0.6 + 0.3 + 0) / 4) and metrics["questions"] == 4
    assert train.load_checkpoint(os.path.join(out, "ckpt.pt"))["answers"] == answers

    # test-dev: no answers; the checkpoint's own answer vocabulary, the official submission format
    submission = str(tmp_path / "submission.json")
    train.run(common + ["--eval-only", "--init", os.path.join(out, "ckpt.pt"), "--eval-data", files["q_test"],
                        "--predictions", submission, "--out", str(tmp_path / "testdev")])
    rows = json.load(open(submission))
    assert sorted(r["question_id"] for r in rows) == [7, 8, 9]  # every question once
    assert all(set(r) == {"question_id", "answer"} and type(r["question_id"]) is int and type(r["answer"]) is str
               for r in rows)
    assert {r["question_id"]: r["answer"] for r in rows} == {7: "blue", 8: "2", 9: "yes"}
    assert "vqa_score" not in metrics_of(str(tmp_path / "testdev"))


def test_eval_without_the_tasks_head_is_exit_2_naming_it(tmp_path, capsys):
    pretrained = str(tmp_path / "pt")
    train.run(FLAGS + ["--out", pretrained, "--steps", "1"])  # a pre-training checkpoint: no VQA or cls head
    ckpt = os.path.join(pretrained, "ckpt.pt")
    with pytest.raises(SystemExit) as exit_info:
        vlmerge.main(["eval", ckpt, "--task", "vqa", "--out", str(tmp_path / "e")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith(f"error: checkpoint {ckpt} has no vqa head (vqa_head missing)")
    assert not os.path.exists(tmp_path / "e" / "metrics.json")
    with pytest.raises(SystemExit) as exit_info:
        train.main(FLAGS + ["--task", "cls", "--eval-only", "--init", ckpt, "--out", str(tmp_path / "c")])
    assert exit_info.value.code == 2 and "has no cls head (cls_norm, cls_head missing)" in capsys.readouterr().err


def test_a_checkpoint_without_cls_token_is_not_missing_a_head():
    # heads are matched by whole module names: "cls_token" (backbone) is no "cls_head", and its absence is an error
    with pytest.raises(KeyError, match="'cls_token'"):
        m = model.build_model("vit_tiny", "maa", "cls", vocab_size=20, image_size=32, patch_size=8, depth=1,
                              fusion_layers=1)
        train.transfer_weights(m, {k: v for k, v in m.state_dict().items() if k != "cls_token"})
    assert set(train.EVAL_HEADS["vqa"]) <= set(model.HEADS["vqa"])  # evaluation reads heads the task builds


# --- NLVR2 ----------------------------------------------------------------------------------------------

def test_nlvr2_accuracy_on_a_dev_file(tmp_path, monkeypatch):
    vocab_path = vocab(tmp_path)
    # dev pairs: (left image brightness, label); the fixed model says True when the left image is bright
    dev = [(BRIGHT, True), (DARK, False), (BRIGHT, False), (DARK, True), (BRIGHT, True)]  # right: 1, 2, 5 -> 3/5
    for split, pairs in (("train", [(BRIGHT, True), (DARK, False)]), ("dev", dev)):
        lines = []
        for k, (value, label) in enumerate(pairs):
            jpeg(tmp_path / "nlvr2" / f"{split}-{k}-0-img0.png", value)
            jpeg(tmp_path / "nlvr2" / f"{split}-{k}-0-img1.png", MID)
            lines.append({"identifier": f"{split}-{k}-0-0", "sentence": "the left cat is bright", "label": str(label)})
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    fix_outputs(monkeypatch, lambda batch: torch.stack([torch.zeros(len(batch["images"])),
                                                        (brightness(batch["images"]) > 0).float()], 1))
    out = str(tmp_path / "nlvr2_run")
    train.run(FLAGS + ["--task", "nlvr2", "--data", str(tmp_path / "train.jsonl"), "--image-root",
                       str(tmp_path / "nlvr2"), "--eval-data", str(tmp_path / "dev.jsonl"), "--vocab", vocab_path,
                       "--out", out])
    assert metrics_of(out)["accuracy"] == pytest.approx(60.0)


# --- ImageFolder classification ---------------------------------------------------------------------------

def test_imagefolder_top1_matches_a_hand_count(tmp_path, monkeypatch):
    root = tmp_path / "imagenet"
    layout = {"train": {"cat": [DARK, DARK], "dog": [BRIGHT, BRIGHT]},
              "val": {"cat": [DARK, BRIGHT], "dog": [BRIGHT, BRIGHT, DARK]}}
    for split, classes in layout.items():
        for name, values in classes.items():
            for k, value in enumerate(values):
                jpeg(root / split / name / f"{k}.JPEG", value, size=(50, 37))
    # the fixed model says "dog" (class 1, folders sorted) for bright images: right on cat/0, dog/0, dog/1 -> 3/5
    fix_outputs(monkeypatch, lambda batch: torch.stack([(brightness(batch["images"]) <= 0).float(),
                                                        (brightness(batch["images"]) > 0).float()], 1))
    out = str(tmp_path / "cls")
    train.run(FLAGS + ["--task", "cls", "--data", str(root), "--out", out])  # no --vocab: image-only
    assert metrics_of(out)["accuracy"] == pytest.approx(60.0)
    assert train.load_checkpoint(os.path.join(out, "ckpt.pt"))["classes"] == ["cat", "dog"]


# --- ADE20k segmentation ----------------------------------------------------------------------------------

def ade_label_map(path):
    """ADE20k labels (0 = other, k = class k - 1) on a 32x32 image:
    left half: rows 0-15 label 1, rows 16-31 label 0 (other); right half: rows 0-7 label 1, rows 8-31 label 2."""
    labels = torch.zeros(32, 32, dtype=torch.uint8)
    labels[:16, :16] = 1
    labels[:8, 16:] = 1
    labels[8:, 16:] = 2
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.numpy()).save(path)  # uint8 (H, W): mode L


def test_ade20k_miou_ignores_label_0(tmp_path, monkeypatch):
    root = tmp_path / "ADEChallengeData2016"
    for split, names in (("training", ["ADE_train_1", "ADE_train_2"]), ("validation", ["ADE_val_1"])):
        for name in names:
            jpeg(root / "images" / split / f"{name}.jpg", MID, size=(32, 32))
            ade_label_map(root / "annotations" / split / f"{name}.png")

    def outputs(batch):  # class 0 on the left half, class 1 on the right half
        logits = torch.zeros(len(batch["images"]), data.ADE20K_CLASSES, 32, 32)
        logits[:, 0, :, :16] = 1.0
        logits[:, 1, :, 16:] = 1.0
        return logits
    fix_outputs(monkeypatch, outputs)
    out = str(tmp_path / "seg")
    train.run(FLAGS + ["--task", "seg", "--data", str(root), "--out", out])
    metrics = metrics_of(out)
    # by hand, over labelled pixels only: class 0 has TP 256 (left top) and FN 128 (right top, said class 1):
    # IoU 256/384; class 1 has TP 384 and FP 128: IoU 384/512. The 256 "other" pixels count nowhere.
    assert metrics["miou"] == pytest.approx(100 * (256 / 384 + 384 / 512) / 2)
    assert metrics["pixel_acc"] == pytest.approx(100 * 640 / 768)
    sample = data.load_ade20k(root, "validation")[0]
    assert sample["mask"][20, 3] == data.SEG_IGNORE and sample["mask"][0, 0] == 0 and sample["mask"][20, 20] == 1


def test_seg_loss_ignores_other_pixels():
    logits = torch.randn(1, 3, 2, 2)
    mask = torch.tensor([[[0, data.SEG_IGNORE], [2, data.SEG_IGNORE]]])
    by_hand = -(logits.log_softmax(1)[0, 0, 0, 0] + logits.log_softmax(1)[0, 2, 1, 0]) / 2
    assert train.seg_loss(logits, mask).item() == pytest.approx(by_hand.item(), rel=1e-6)


# --- RegMean's Gram matrices come from the checkpoint's own data and tokenizer -----------------------------

def test_regmean_grams_feed_the_real_tokenizers_ids_of_the_checkpoints_own_data(tmp_path, monkeypatch):
    vocab_path = vocab(tmp_path)
    captions = ["a cat", "one dog", "two cow", "the cat"]
    for k, caption in enumerate(captions):
        jpeg(tmp_path / "cc" / f"{k}.jpg", (DARK, MID, BRIGHT, MID)[k])
    (tmp_path / "cc.jsonl").write_text("\n".join(json.dumps({"image": f"{k}.jpg", "caption": c})
                                                 for k, c in enumerate(captions)))
    flags = ["--data", str(tmp_path / "cc.jsonl"), "--image-root", str(tmp_path / "cc"), "--vocab", vocab_path]
    out = str(tmp_path / "msa")
    train.run(FLAGS + flags + ["--variant", "msa", "--out", out])  # no --eval-data: no score (a warning)
    ckpt = os.path.join(out, "ckpt.pt")
    checkpoint = train.load_checkpoint(ckpt)
    assert checkpoint["config"]["vocab_size"] == 6 + len(WORDS)  # BERT's layout, this vocab.txt

    fed = []
    real_collect = vlmerge.merge.collect_grams

    def collect(model, batches, **kwargs):  # what the hooked forwards are fed
        batches = list(batches)
        fed.extend(ids for batch in batches for ids in batch["input_ids"].tolist())
        return real_collect(model, batches, **kwargs)
    monkeypatch.setattr(vlmerge.merge, "collect_grams", collect)
    tokenizer = data.Tokenizer.from_vocab_file(vocab_path)
    expected = sorted(tokenizer.encode(c, checkpoint["config"]["max_text_len"])[0].tolist() for c in captions)
    # the merge command with the data flags, and without: the checkpoint's own (its saved args) -- the same ids
    for extra in (flags, []):
        fed.clear()
        vlmerge.main(["merge", ckpt, "--method", "regmean", "--gamma", "0.5", "--gram-samples", "4", *extra,
                      "-o", str(tmp_path / "merged.pt")])
        assert sorted(fed) == expected
    assert train.load_checkpoint(str(tmp_path / "merged.pt"))["merge"] == {"method": "regmean", "gamma": 0.5}
    # the synthetic world's tokenizer cannot feed this checkpoint: one clear error, no silent wrong ids
    with pytest.raises(ValueError, match=r"synthetic world's tokenizer has \d+ tokens, the checkpoint's word "
                                         rf"embedding {6 + len(WORDS)}"):
        vlmerge.gram_batches(checkpoint, 4, 4, ["--data", "synthetic"])


# --- the recipe on real files: --data-config -------------------------------------------------------------

def real_world(tmp_path, n=16):
    """Fixture files for every task of the recipe, n training samples each (the smoke preset's batch), and the
    data.json that names them (the README's format)."""
    vocab_path, coco = vocab(tmp_path), karpathy(tmp_path)
    values = (DARK, MID, BRIGHT)
    lines = []
    for k in range(n):
        jpeg(tmp_path / "cc" / f"{k}.jpg", values[k % 3], size=(16, 16))
        lines.append({"image": f"{k}.jpg", "caption": ["a cat", "one dog", "the cow"][k % 3]})
    (tmp_path / "cc.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    spec = json.loads(open(coco).read())  # more Karpathy training images, so that retrieval has n captions
    spec["images"] += [{"filepath": "val2014", "filename": "d.jpg", "split": "train",
                        "sentences": [{"raw": "two dog"}]} for _ in range(n)]
    open(coco, "w").write(json.dumps(spec))
    files = vqa_files(tmp_path)
    questions, annotations = json.load(open(files["q_train"])), json.load(open(files["a_train"]))
    questions["questions"] *= n // 4
    annotations["annotations"] *= n // 4
    json.dump(questions, open(files["q_train"], "w"))
    json.dump(annotations, open(files["a_train"], "w"))
    for split, count in (("train", n), ("dev", 4)):
        rows = []
        for k in range(count):
            for side in (0, 1):
                jpeg(tmp_path / "nlvr2" / f"{split}-{k}-0-img{side}.png", values[(k + side) % 3], size=(16, 16))
            rows.append({"identifier": f"{split}-{k}-0-0", "sentence": "the left cat", "label": str(k % 2 == 0)})
        (tmp_path / f"nlvr2_{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for split, count in (("train", n // 2), ("val", 2)):
        for name, value in (("cat", DARK), ("dog", BRIGHT)):
            for k in range(count):
                jpeg(tmp_path / "imagenet" / split / name / f"{k}.JPEG", value, size=(16, 16))
    for split, count in (("training", n), ("validation", 2)):
        for k in range(count):
            jpeg(tmp_path / "ade" / "images" / split / f"ADE_{k}.jpg", MID, size=(32, 32))
            ade_label_map(tmp_path / "ade" / "annotations" / split / f"ADE_{k}.png")
    v = ["--vocab", vocab_path]
    config = {
        "pretrain": ["--data", str(tmp_path / "cc.jsonl"), "--image-root", str(tmp_path / "cc"), *v,
                     "--eval-data", coco, "--eval-image-root", str(tmp_path / "coco")],
        "retrieval": ["--data", coco, "--image-root", str(tmp_path / "coco"), *v],
        "vqa": ["--data", files["q_train"], "--annotations", files["a_train"], "--image-root",
                str(tmp_path / "train2014"), "--eval-data", files["q_val"], "--eval-annotations", files["a_val"],
                "--eval-image-root", str(tmp_path / "val2014"), *v],
        "nlvr2": ["--data", str(tmp_path / "nlvr2_train.jsonl"), "--eval-data", str(tmp_path / "nlvr2_dev.jsonl"),
                  "--image-root", str(tmp_path / "nlvr2"), *v],
        "cls": ["--data", str(tmp_path / "imagenet")],
        "seg": ["--data", str(tmp_path / "ade")],
    }
    (tmp_path / "data.json").write_text(json.dumps(config, indent=1))
    return str(tmp_path / "data.json"), config


def test_data_config_reaches_every_stage_and_a_scoreless_entry_is_refused(tmp_path):
    path, config = real_world(tmp_path)
    plan = vlmerge.main(["recipe", "--preset", "smoke", "--data-config", path, "--dry-run",
                         "--out", str(tmp_path / "r")])["plan"]
    trains = [line for line in plan if line.startswith("python train.py")]
    for task, flags in config.items():
        stages = [line for line in trains if (f"--task {task} " in line) or (task == "pretrain" and "--task" not in line)]
        assert stages and all(" ".join(flags) in line for line in stages), task
    # the paper preset fine-tunes with train.py --paper (Table 6 per task), at the profile's image size
    paper = vlmerge.main(["recipe", "--preset", "paper", "--init", "beit.pt", "--data-config", path, "--dry-run",
                          "--out", str(tmp_path / "p")])["plan"]
    finetunes = [line for line in paper if "--task vqa" in line]
    assert finetunes and all("--paper" in line and "--steps" not in line and "--image-size" not in line
                             for line in finetunes)
    at = config["nlvr2"].index("--eval-data")
    del config["nlvr2"][at:at + 2]
    (tmp_path / "bad.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bad.json: 'nlvr2' names no evaluation data \(--eval-data\)"):
        vlmerge.read_data_config(str(tmp_path / "bad.json"), vlmerge.PRESETS["smoke"])
    config = json.load(open(path))
    del config["seg"]
    (tmp_path / "bad.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"bad.json: 'seg' needs a list of train.py flags"):
        vlmerge.read_data_config(str(tmp_path / "bad.json"), vlmerge.PRESETS["smoke"])


def test_finetuning_at_another_image_size_resamples_the_position_embedding(tmp_path):
    pretrained = str(tmp_path / "pt")
    train.run(FLAGS + ["--out", pretrained, "--steps", "1"])
    out = str(tmp_path / "big")
    train.run(FLAGS + ["--task", "cls", "--image-size", "48", "--init", os.path.join(pretrained, "ckpt.pt"),
                       "--out", out])
    assert train.load_checkpoint(os.path.join(out, "ckpt.pt"))["model"]["pos_embed"].shape[1] == 1 + 6 * 6


@pytest.mark.slow
def test_smoke_recipe_on_real_files_scores_every_table_cell(tmp_path):
    path, _ = real_world(tmp_path)
    out = str(tmp_path / "recipe")
    vlmerge.main(["recipe", "--preset", "smoke", "--data-config", path, "--out", out])
    report = open(os.path.join(out, "REPORT.md")).read()

    def our_cells(title, columns):
        section = report.split(title)[1].split("\n## ")[0]
        rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")][1:]
        return [row[c].strip() for row in rows for c in columns]
    table1 = our_cells("## Table 1", range(1, 5))   # VQA, TR avg, IR avg, zero-shot R avg
    table3 = our_cells("## Table 3", range(1, 4))   # NLVR2 acc, cls top-1, seg mIoU
    assert len(table1) == 16 and len(table3) == 12
    for cell in table1 + table3:
        assert float(cell) >= 0, (cell, report)


def test_bad_imagefolder_and_ade20k_input_is_one_error_naming_the_place(tmp_path):
    for name in ("cat", "cow"):
        jpeg(tmp_path / "val" / name / "0.jpg", MID)
    with pytest.raises(ValueError, match=r"val: 2 class folders vs training's 2; 'cow' is in one only"):
        data.load_image_folder(tmp_path / "val", ["cat", "dog"])
    jpeg(tmp_path / "ade" / "images" / "validation" / "a.jpg", MID, size=(32, 32))
    (tmp_path / "ade" / "annotations" / "validation").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"a.jpg: no label map .*a.png"):
        data.load_ade20k(tmp_path / "ade", "validation")
    Image.new("L", (32, 32), 151).save(tmp_path / "ade" / "annotations" / "validation" / "a.png")
    with pytest.raises(ValueError, match=r"a.png: label 151 > 150"):
        data.load_ade20k(tmp_path / "ade", "validation")[0]
