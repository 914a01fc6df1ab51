"""data.py: the tokenizer against hand-derived bert-base-uncased tokenizations, the synthetic world (determinism,
disjoint splits, text and labels that agree with the drawn scenes, answers the question alone cannot give),
BERT's MLM masking statistics, collate, loaders, and every real-format loader on fixtures written here."""
import collections
import itertools
import json
import pickle
import re
import warnings
import zlib

import pytest
import torch
from PIL import Image

import data

# a vocabulary in BERT's layout: [PAD] first, placeholders, then the special tokens by name
VOCAB = ["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "un", "##aff", "##able",
         "don", "'", "t", "!", ",", "中", "文", "cafe", "naive", "a", "##a", "b", "c", "d", "$", "^", "`",
         "—", "¿", "5", "##€", "の", "##の"]


@pytest.fixture
def tok(tmp_path):
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    return data.Tokenizer.from_vocab_file(path)


# --- tokenizer: expected tokens derived by hand from BERT's BasicTokenizer + WordPiece rules --------------

@pytest.mark.parametrize("text,expected", [
    ("Héllo, WORLD!", ["hello", ",", "world", "!"]),        # lowercase, accent stripped (NFD, drop Mn)
    ("CAFÉ naïve", ["cafe", "naive"]),
    ("don't!", ["don", "'", "t", "!"]),                      # punctuation splits words
    ("a$b^c`d", ["a", "$", "b", "^", "c", "`", "d"]),        # ASCII symbols count as punctuation too
    ("b—a¿", ["b", "—", "a", "¿"]),                          # Unicode P* (Pd, Po)
    ("5€", ["5", "##€"]),                                    # € is Sc, not punctuation: stays in the word
    ("中文", ["中", "文"]),                                    # CJK ideographs split one by one
    ("hello中world", ["hello", "中", "world"]),
    ("のの", ["の", "##の"]),                                  # Hiragana is not in BERT's CJK ranges
    ("hel\x00lo\ufffd wor\x07ld", ["hello", "world"]),       # NUL, U+FFFD and control chars removed
    ("hello\u200bworld", ["[UNK]"]),                         # U+200B (Cf) removed: "helloworld" has no ##world
    ("hello\u00a0world\tnaive\n", ["hello", "world", "naive"]),  # NBSP (Zs), tab, newline are whitespace
    ("unaffable", ["un", "##aff", "##able"]),                # greedy longest-match-first
    ("unaffablex", ["[UNK]"]),                               # an unsegmentable rest makes the word [UNK]
    ("a" * 100, ["a"] + ["##a"] * 99),                       # 100 characters: still segmented
    ("a" * 101, ["[UNK]"]),                                  # over 100 characters: [UNK]
    ("hello [MASK] world", ["hello", "[MASK]", "world"]),    # special tokens in text stay whole
    ("", []),
    (" \t\n ", []),
])
def test_tokenize_matches_bert_base_uncased(tok, text, expected):
    assert tok.tokenize(text) == expected


def test_ascii_fast_path_equals_the_general_basic_tokenizer():
    """basic_tokenize's printable-ASCII shortcut against the general character-by-character rules, on random
    strings over every printable ASCII character (punctuation runs, digits, capitals, repeated spaces)."""
    import random
    import string
    rng = random.Random(0)
    alphabet = string.printable[:95]  # the 95 printable ASCII characters, space included
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(2000)]
    texts += ["A small RED circle, at the top-left.", "x--y", "  a  b  ", "it's 3:45!", "~`^_|"]
    for text in texts:
        assert data.basic_tokenize(text) == data._basic_tokenize(text), text


def test_tokenize_memo_hands_out_fresh_lists(tok):
    first = tok.tokenize("hello world")
    first.append("x")  # a caller changing its list must not change the memo
    assert tok.tokenize("hello world") == ["hello", "world"]


def test_encode_wraps_in_cls_sep_pads_and_truncates_keeping_sep(tok):
    ids, mask = tok.encode("", max_len=5)
    assert ids.tolist() == [3, 4, 0, 0, 0] and mask.tolist() == [1, 1, 0, 0, 0]
    ids, mask = tok.encode("a b c d a b", max_len=5)
    assert ids.tolist() == [3, VOCAB.index("a"), VOCAB.index("b"), VOCAB.index("c"), 4] and mask.tolist() == [1] * 5
    ids, _ = tok.encode("hello zebra", max_len=6)
    assert ids.tolist() == [3, 6, 2, 4, 0, 0]  # an unknown word is [UNK] (id 2 in this vocabulary)
    assert ids.dtype == torch.long


def test_vocab_file_ids_are_line_numbers_and_round_trip(tok, tmp_path):
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 2, 3, 4, 5)
    assert tok.special_ids == {0, 2, 3, 4, 5} and len(tok) == len(VOCAB)
    tok.save(tmp_path / "again.txt")
    assert data.Tokenizer.from_vocab_file(tmp_path / "again.txt").vocab == tok.vocab
    (tmp_path / "dup.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nx\nx\n")
    with pytest.raises(ValueError, match=r"dup.txt line 7: token 'x' already on line 6"):
        data.Tokenizer.from_vocab_file(tmp_path / "dup.txt")


def test_build_puts_special_tokens_first_then_sorted_words():
    tok = data.Tokenizer.build(["Zebra, apple!", "apple mango"])
    assert list(tok.vocab) == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "!", ",", "apple", "mango", "zebra"]
    assert list(tok.vocab.values()) == list(range(10))


# --- the synthetic world ----------------------------------------------------------------------------------

WORLD = data.SyntheticWorld(train_size=1500, val_size=200, test_size=200)


def objects_of(scene):
    return [(data.COLORS[o.color], data.SHAPES[o.shape], data.SIZES[o.size], data.POSITIONS[o.cell])
            for o in scene.objects]


def test_world_tokenizer_covers_every_text_the_world_makes():
    tok = WORLD.tokenizer()
    assert list(tok.vocab)[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    for task in ("pretrain", "vqa", "nlvr2"):
        for split in data.SPLITS:
            ds = WORLD.dataset(task, split)
            texts = [ds.spec(i)["text"] for i in range(0, len(ds), max(1, len(ds) // 150))]
            assert all("[UNK]" not in tok.tokenize(t) for t in texts), task


@pytest.mark.parametrize("task", data.TASKS)
def test_same_seed_gives_identical_tensors_and_another_seed_differs(task):
    a, b = data.SyntheticWorld(seed=0).dataset(task, "val"), data.SyntheticWorld(seed=0).dataset(task, "val")
    c = data.SyntheticWorld(seed=1).dataset(task, "val")
    for i in range(3):
        x, y = a[i], b[i]
        assert x.keys() == y.keys()
        for key in x:
            assert torch.equal(x[key], y[key]) if torch.is_tensor(x[key]) else x[key] == y[key]
    assert not all(torch.equal(a[i]["image"], c[i]["image"]) for i in range(3))


def test_generate_is_deterministic_and_draws_the_requested_size():
    world = data.SyntheticWorld(image_size=48)
    images, classes = world.generate(300, seed=3)
    assert images.shape == (300, 3, 48, 48) and images.dtype == torch.uint8 and classes.shape == (300, 48, 48)
    assert torch.equal(images, world.generate(300, seed=3)[0])
    assert not torch.equal(images, world.generate(300, seed=4)[0])
    # a scene's pixels do not depend on the batch it was drawn in
    assert torch.equal(world.generate(300, seed=3, chunk=7)[0], images)


def layouts(ds):
    """The layout of every scene of every sample, computed here from the specs: frozensets of
    (color, shape, size, cell); both scenes of an nlvr2 pair count."""
    return {frozenset(objects_of(s)) for i in range(len(ds)) for s in ds.spec(i)["scenes"]}


def hashed_split(scene):
    """The split rule written out: one byte per cell, 0 if empty, else 1 + (shape·7 + color)·2 + size; crc32 of
    the 4 bytes mod 10 gives 0 → val, 1 → test, anything else → train."""
    codes = [0, 0, 0, 0]
    for o in scene.objects:
        codes[o.cell] = 1 + (o.shape * 7 + o.color) * 2 + o.size
    return {0: "val", 1: "test"}.get(zlib.crc32(bytes(codes)) % 10, "train")


@pytest.mark.parametrize("task", data.TASKS)
def test_every_scene_of_a_sample_hashes_to_its_split(task):
    world = data.SyntheticWorld(train_size=300, val_size=150, test_size=150)
    for split in data.SPLITS:
        ds = world.dataset(task, split)
        scenes = [s for i in range(0, len(ds), ds.per_scene) for s in ds.spec(i)["scenes"]]
        assert len(scenes) >= 150 and all(hashed_split(s) == split for s in scenes), (task, split)


def test_no_val_or_test_layout_of_any_task_is_in_any_train_split():
    world = data.SyntheticWorld(train_size=1500, val_size=100, test_size=100)
    trained = set().union(*(layouts(world.dataset(task, "train")) for task in data.TASKS))
    for task in data.TASKS:
        for split in ("val", "test"):
            held_out = layouts(world.dataset(task, split))
            assert len(held_out) > 50 and not held_out & trained, (task, split)


def test_vqa_target_is_vilt_soft_score_of_the_annotator_count():
    ds = WORLD.dataset("vqa", "train")
    soft = {1: 0.3, 2: 0.6, 3: 0.9}  # ViLT / VLMo; 4 or more annotators: 1
    for i in range(100):
        sample = ds[i]
        expected = torch.zeros(len(WORLD.answers))
        for answer in set(sample["answers"]):
            expected[WORLD.answers.index(answer)] = soft.get(sample["answers"].count(answer), 1.0)
        assert len(sample["answers"]) == 10 and torch.equal(sample["target"], expected)
    assert data.vqa_scores(["a"] * 2 + ["b"] * 4 + ["c"] + ["d"] * 3) == {"a": 0.6, "b": 1.0, "c": 0.3, "d": 0.9}


# --- the official VQA accuracy: min(1, matches / 3) over the 10 leave-one-out subsets of annotators ---------

def leave_one_out(prediction, humans):
    """The definition written out: for each annotator left out, min(1, matches among the other 9 / 3)."""
    return sum(min(1, sum(h == prediction for h in humans[:j] + humans[j + 1:]) / 3)
               for j in range(len(humans))) / len(humans)


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_of_1_2_3_4_and_10_matching_annotators(matches, expected):
    humans = ["cat"] * matches + ["dog", "bird"] * ((10 - matches) // 2) + ["dog"] * ((10 - matches) % 2)
    assert data.vqa_accuracy("cat", humans) == pytest.approx(expected)
    assert data.vqa_accuracy("cat", humans) == pytest.approx(leave_one_out("cat", humans))


@pytest.mark.parametrize("prediction,humans,expected", [
    ("Two", ["2"] * 3 + ["3"] * 7, 0.9),                          # number words -> digits, lowercase
    ("none", ["0"] * 2 + ["1"] * 8, 0.6),
    ("the red one.", ["red 1"] * 4 + ["red"] * 6, 1.0),           # articles dropped, period stripped
    ("a dog", ["dog"] * 1 + ["cat"] * 9, 0.3),
    ("dont", ["don't"] * 2 + ["no"] * 8, 0.6),                     # contractions restored
    ("couldnt've", ["couldn't've"] * 3 + ["no"] * 7, 0.9),
    ("yes!", ["yes"] * 5 + ["no"] * 5, 1.0),                      # punctuation
    ("  black/white\n", ["black white"] * 2 + ["black"] * 8, 0.6),  # a mark inside a word becomes a space
    ("1,000", ["1000"] * 4 + ["100"] * 6, 1.0),                   # digit,digit: marks are deleted, not spaced
    ("left", ["left,"] * 3 + ["right"] * 7, 0.0),                  # a human "left," keeps its comma's space
])
def test_vqa_accuracy_normalizes_answers_like_the_official_script(prediction, humans, expected):
    assert data.vqa_accuracy(prediction, humans) == pytest.approx(expected)


def test_vqa_accuracy_leaves_unanimous_human_answers_as_written():
    # the script normalizes human answers only when they disagree; all ten "two" never meet the prediction's "2"
    assert data.vqa_accuracy("two", ["two"] * 10) == 0.0
    assert data.vqa_accuracy("2", ["2"] * 10) == 1.0
    with pytest.raises(ValueError, match="no human answers"):
        data.vqa_accuracy("2", [])


def test_annotators_agree_with_the_true_answer_nine_times_in_ten():
    ds = WORLD.dataset("vqa", "train")
    specs = [ds.spec(i) for i in range(1000)]
    agree = sum(a == s["answer"] for s in specs for a in s["answers"]) / (10 * len(specs))
    assert agree == pytest.approx(0.9, abs=0.015)
    # a wrong annotator still answers within the question's type
    assert all(a in data.ANSWER_POOLS[s["question_type"]] for s in specs for a in s["answers"])


ROW_COL = {p: divmod(i, 2) for i, p in enumerate(data.POSITIONS)}


def relation_holds(a_pos, relation, b_pos):
    (ra, ca), (rb, cb) = ROW_COL[a_pos], ROW_COL[b_pos]
    return {"left of": ca < cb, "right of": ca > cb, "above": ra < rb, "below": ra > rb}[relation]


def the(objects, **attrs):
    """The one object with these attributes (the question must refer to exactly one)."""
    found = [o for o in objects if all(dict(zip(("color", "shape", "size", "pos"), o))[k] == v for k, v in attrs.items())]
    assert len(found) == 1, (attrs, objects)
    return dict(zip(("color", "shape", "size", "pos"), found[0]))


def answer_from_scene(question, objects):
    """Answer a VQA question by reading the scene spec, independently of data.py's generator."""
    if m := re.fullmatch(r"what (color|shape|size) is the object (?:at|in) the (.+)\?", question):
        return the(objects, pos=m[2])[m[1]]
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        return the(objects, shape=m[1])["color"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        return the(objects, color=m[1])["shape"]
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
        return the(objects, color=m[1], shape=m[2])["size"]
    if question == "how many objects are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
        return str(sum(o[0] == m[1] for o in objects))
    if m := re.fullmatch(r"how many (\w+) are there\?", question):
        return str(sum(o[1] + ("es" if o[1] == "cross" else "s") == m[1] for o in objects))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any(o[:2] == (m[1], m[2]) for o in objects) else "no"
    if m := re.fullmatch(r"is the (\w+) (\w+) (left of|right of|above|below) the (\w+) (\w+)\?", question):
        a, b = the(objects, color=m[1], shape=m[2]), the(objects, color=m[4], shape=m[5])
        return "yes" if relation_holds(a["pos"], m[3], b["pos"]) else "no"
    raise AssertionError(f"unknown question {question!r}")


def test_vqa_answers_agree_with_the_scene():
    ds = WORLD.dataset("vqa", "train")
    types = collections.Counter()
    for i in range(600):
        spec = ds.spec(i)
        assert answer_from_scene(spec["text"], objects_of(spec["scenes"][0])) == spec["answer"], spec["text"]
        types[spec["question_type"]] += 1
    assert set(types) == set(data.ANSWER_POOLS)


def test_vqa_answer_is_not_predictable_from_the_question():
    ds = data.SyntheticWorld(train_size=6000).dataset("vqa", "train")
    specs = [ds.spec(i) for i in range(len(ds))]
    by_type, by_question = collections.defaultdict(collections.Counter), collections.defaultdict(collections.Counter)
    for s in specs:
        by_type[s["question_type"]][s["answer"]] += 1
        by_question[s["text"]][s["answer"]] += 1
    for question_type, counts in by_type.items():
        assert counts.most_common(1)[0][1] / sum(counts.values()) < 0.6, question_type
    # a question-only oracle (the train majority answer of each question string) stays near the type prior
    majority = {q: c.most_common(1)[0][0] for q, c in by_question.items()}
    val = [WORLD.dataset("vqa", "val").spec(i) for i in range(200)]
    assert sum(majority.get(s["text"]) == s["answer"] for s in val) / len(val) < 0.45


def test_counting_a_color_or_shape_needs_the_question_not_just_the_object_count():
    ds = WORLD.dataset("vqa", "train")
    specs = [ds.spec(i) for i in range(1500)]
    specs = [s for s in specs if s["question_type"] == "count" and s["text"] != "how many objects are there?"]
    same = sum(s["answer"] == str(len(s["scenes"][0].objects)) for s in specs) / len(specs)
    assert len(specs) > 100 and same < 0.6  # an image-only "count everything" guess is often wrong


def statement_truth(text, left, right):
    """Evaluate an NLVR2 statement on the two scene specs, independently of data.py's generator."""
    sides = {"left": left, "right": right}

    def has(objects, noun):  # noun: "circle", "red object", "red circle" (plural-free)
        words = noun.split()
        if words[-1] == "object":
            return sum(o[0] == words[0] for o in objects)
        if len(words) == 2:
            return sum(o[:2] == tuple(words) for o in objects)
        return sum(o[1] == words[0] for o in objects)

    if m := re.fullmatch(r"the (left|right) image has more (.+) than the (left|right) image", text):
        singular = dict(zip(data.PLURALS, data.SHAPES))
        noun = m[2].replace("objects", "object") if m[2].endswith("objects") else singular[m[2]]
        return has(sides[m[1]], noun) > has(sides[m[3]], noun)
    if m := re.fullmatch(r"both images contain an? (.+)", text):
        return has(left, m[1]) > 0 and has(right, m[1]) > 0
    if m := re.fullmatch(r"exactly one image contains an? (.+)", text):
        return (has(left, m[1]) > 0) != (has(right, m[1]) > 0)
    if text == "both images have the same number of objects":
        return len(left) == len(right)
    if m := re.fullmatch(r"the (left|right) image has an? (\w+ \w+) (left of|right of|above|below) an? (\w+ \w+)", text):
        objects = sides[m[1]]
        return any(relation_holds(a[3], m[3], b[3]) for a in objects for b in objects
                   if a is not b and " ".join(a[:2]) == m[2] and " ".join(b[:2]) == m[4])
    raise AssertionError(f"unknown statement {text!r}")


def test_nlvr2_labels_are_true_to_the_scenes_and_balanced_per_kind():
    ds = WORLD.dataset("nlvr2", "train")
    labels = collections.defaultdict(list)
    for i in range(1500):
        spec = ds.spec(i)
        left, right = (objects_of(s) for s in spec["scenes"])
        assert statement_truth(spec["text"], left, right) == bool(spec["label"]), spec["text"]
        labels[spec["kind"]].append(spec["label"])
    assert set(labels) == set(data.STATEMENT_KINDS)
    for kind, values in labels.items():
        assert 0.4 < sum(values) / len(values) < 0.6, kind
    sample = ds[0]
    assert sample["image"].shape == sample["image2"].shape == (3, 32, 32) and sample["label"] in (0, 1)


def parse_caption(caption):
    """The (color, shape, size or None, position or None) mentions and the relations a caption states."""
    caption = re.sub(r"^(there is |an image of )", "", caption)
    thing = r"an? (?:(small|large) )?(\w+) (\w+)"
    mentions, relations = [], []
    for part in re.split(r", | and ", caption):
        if m := re.fullmatch(rf"{thing} (?:at|in) the (.+)", part):
            mentions.append((m[2], m[3], m[1], m[4]))
        elif m := re.fullmatch(rf"{thing} (left of|right of|above|below) {thing}", part):
            mentions += [(m[2], m[3], m[1], None), (m[6], m[7], m[5], None)]
            relations.append((len(mentions) - 2, m[4], len(mentions) - 1))
        else:
            raise AssertionError(f"unparsed caption part {part!r}")
    return mentions, relations


def test_captions_describe_the_scene_exactly():
    ds = WORLD.dataset("pretrain", "train")
    for j in range(300):
        spec = ds.scene_spec(j)
        objects = objects_of(spec["scenes"][0])
        assert len(spec["captions"]) == WORLD.captions_per_image and 2 <= len(objects) <= 3
        for caption in spec["captions"]:
            mentions, relations = parse_caption(caption)
            # every object is mentioned once, with its color and shape, and its size/position when stated
            assert sorted(m[:2] for m in mentions) == sorted(o[:2] for o in objects), caption
            # some assignment of mentions to objects agrees with every stated size, position and relation
            assert any(all(m[:2] == o[:2] and m[2] in (None, o[2]) and m[3] in (None, o[3])
                           for m, o in zip(mentions, assigned))
                       and all(relation_holds(assigned[a][3], relation, assigned[b][3]) for a, relation, b in relations)
                       for assigned in itertools.permutations(objects)), caption


def test_segmentation_mask_is_the_drawn_class_of_every_pixel():
    ds = WORLD.dataset("seg", "train")
    for i in range(40):
        sample, scene = ds[i], ds.spec(i)["scenes"][0]
        image, mask = sample["image"].long(), sample["mask"]
        assert mask.dtype == torch.long and mask.shape == (32, 32)
        assert set(mask.unique().tolist()) == {0} | {o.shape + 1 for o in scene.objects}
        for o in scene.objects:
            row, col = divmod(o.cell, 2)
            cell = torch.zeros(32, 32, dtype=torch.bool)
            cell[16 * row:16 * row + 16, 16 * col:16 * col + 16] = True
            pixels = image[:, cell & (mask == o.shape + 1)]  # (3, n): the object's pixels, all inside its cell
            assert pixels.shape[1] > 0 and (pixels == data.PALETTE[o.color].long()[:, None]).all()
            assert (mask[~cell] != o.shape + 1).all() or sum(p.shape == o.shape for p in scene.objects) > 1
        background = image[:, mask == 0]
        assert (background - scene.background).abs().max() <= data.BACKGROUND_NOISE


def test_classification_label_is_the_shape_of_the_one_large_object():
    ds = WORLD.dataset("cls", "train")
    labels = collections.Counter()
    for i in range(300):
        spec = ds.spec(i)
        large = [o for o in spec["scenes"][0].objects if data.SIZES[o.size] == "large"]
        assert len(large) == 1 and large[0].shape == spec["label"]
        labels[spec["label"]] += 1
    assert set(labels) == set(range(WORLD.num_classes)) and max(labels.values()) < 0.3 * 300


def test_retrieval_split_groups_five_captions_per_image():
    ds = WORLD.dataset("retrieval", "test")
    assert len(ds.images) == 200 and len(ds.captions) == len(ds) == 1000
    assert ds.caption_image[:10] == [0] * 5 + [1] * 5
    sample = ds[7]
    assert sample["text"] == ds.captions[7] and sample["image_id"] == 1
    assert torch.equal(sample["image"], ds.images[1])
    batch = ds.images[3:6]
    assert len(batch) == 3 and torch.equal(batch[0], ds.images[3])
    assert len(WORLD.dataset("pretrain", "train")) == 1500 * 5


# --- collate and load -------------------------------------------------------------------------------------

def test_mlm_masking_statistics_on_a_large_batch():
    tok = WORLD.tokenizer()
    collate = data.Collator(tok, max_len=32, seed=0)
    ds = WORLD.dataset("pretrain", "train")
    batch = collate.text([ds.spec(i)["text"] for i in range(3000)])
    ids, corrupted, labels = batch["input_ids"], batch["mlm_input_ids"], batch["mlm_labels"]
    eligible = batch["attention_mask"].bool() & ~torch.isin(ids, torch.tensor(sorted(tok.special_ids)))
    chosen = labels != -100
    assert not (chosen & ~eligible).any()  # never [CLS], [SEP] or [PAD]
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(corrupted[~chosen], ids[~chosen])
    assert chosen.sum() / eligible.sum() == pytest.approx(0.15, abs=0.01)
    masked = (corrupted[chosen] == tok.mask_id).float().mean()
    replaced = corrupted[chosen & (corrupted != tok.mask_id) & (corrupted != ids)]
    kept = (corrupted[chosen] == ids[chosen]).float().mean()
    assert masked == pytest.approx(0.8, abs=0.02)
    # a random replacement equals the original with probability 1 / (ordinary tokens)
    assert kept == pytest.approx(0.1 + 0.1 / (len(tok) - 5), abs=0.02)
    assert len(replaced) / chosen.sum() == pytest.approx(0.1 * (1 - 1 / (len(tok) - 5)), abs=0.02)
    assert not torch.isin(replaced, torch.tensor(sorted(tok.special_ids))).any()


def test_mlm_masks_are_a_function_of_the_batch_and_seed_only():
    tok = WORLD.tokenizer()
    texts = [WORLD.dataset("pretrain", "train").spec(i)["text"] for i in range(64)]
    collate = data.Collator(tok, seed=1)
    first = collate.text(texts)["mlm_input_ids"]
    # no state: a second call, a fresh or unpickled collator (a worker, a resumed run) mask the same way
    assert torch.equal(collate.text(texts)["mlm_input_ids"], first)
    assert torch.equal(pickle.loads(pickle.dumps(data.Collator(tok, seed=1))).text(texts)["mlm_input_ids"], first)
    assert not torch.equal(data.Collator(tok, seed=2).text(texts)["mlm_input_ids"], first)
    # the same sentence in another batch (another epoch's shuffle) gets other masks
    assert not torch.equal(collate.text(texts[::-1])["mlm_input_ids"].flip(0), first)


def test_collate_stacks_every_task_with_static_shapes():
    tok = WORLD.tokenizer()
    collate = data.Collator(tok, max_len=32)
    expect = {"pretrain": {"images", "input_ids", "attention_mask", "mlm_input_ids", "mlm_labels"},
              "retrieval": {"image_id"}, "vqa": {"target"}, "nlvr2": {"images2", "label"}, "cls": {"label"},
              "seg": {"mask"}}
    for task, keys in expect.items():
        batch = collate([WORLD.dataset(task, "train")[i] for i in range(4)])
        assert keys <= set(batch), task
        assert batch["images"].shape == (4, 3, 32, 32) and batch["images"].dtype == torch.float32
        if "input_ids" in batch:
            assert batch["input_ids"].shape == batch["mlm_labels"].shape == (4, 32)
    assert collate([WORLD.dataset("vqa", "train")[0]])["target"].shape == (1, len(WORLD.answers))
    assert "input_ids" not in collate([WORLD.dataset("cls", "train")[0]])


def test_collate_normalizes_and_resizes_masks_with_nearest():
    collate = data.Collator(WORLD.tokenizer(), image_size=64)
    samples = [WORLD.dataset("seg", "train")[i] for i in range(3)]
    batch = collate(samples)
    assert batch["images"].shape == (3, 3, 64, 64) and batch["mask"].shape == (3, 64, 64)
    for sample, mask in zip(samples, batch["mask"]):
        assert torch.equal(mask, sample["mask"].repeat_interleave(2, 0).repeat_interleave(2, 1))
    white = data.Collator(WORLD.tokenizer()).images([torch.full((3, 2, 2), 255, dtype=torch.uint8),
                                                      torch.zeros(3, 2, 2, dtype=torch.uint8)])
    assert white[0].eq(1).all() and white[1].eq(-1).all()  # (x/255 - 0.5) / 0.5


def test_randaugment_changes_training_images_but_never_segmentation_ones():
    tok = WORLD.tokenizer()
    train, plain = data.Collator(tok, train=True), data.Collator(tok)
    torch.manual_seed(0)
    samples = [WORLD.dataset("cls", "train")[i] for i in range(16)]
    assert not torch.equal(train(samples)["images"], plain(samples)["images"])
    samples = [WORLD.dataset("seg", "train")[i] for i in range(4)]
    assert torch.equal(train(samples)["images"], plain(samples)["images"])


# --- real-format loaders, on fixtures written here --------------------------------------------------------

def png(path, mode="RGB", value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (6, 4), value if mode in ("L", "P") else (value,) * len(mode)).save(path)
    return path


def test_read_image_gives_rgb_uint8_from_gray_rgba_and_palette(tmp_path):
    for mode in ("RGB", "L", "RGBA", "P"):
        image = data.read_image(png(tmp_path / f"{mode}.png", mode, 100 if mode != "P" else 0))
        assert image.shape == (3, 4, 6) and image.dtype == torch.uint8, mode
    assert data.read_image(tmp_path / "L.png").eq(100).all()


def test_image_text_jsonl_loader(tmp_path):
    png(tmp_path / "img" / "x.png")
    png(tmp_path / "img" / "y.png", "L")
    lines = [{"image": "img/x.png", "caption": "a thing"}, {"image": "img/y.png", "caption": "another"}]
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n\n")
    ds = data.load_image_text_jsonl(tmp_path / "pairs.jsonl", tmp_path)
    assert len(ds) == 2 and ds[1]["text"] == "another" and ds[1]["image"].shape == (3, 4, 6)


@pytest.mark.parametrize("third_line,message", [
    ('{"image": "x.png"}', "line 3: missing field 'caption'"),
    ('{"image": "x.png", "caption": oops}', "line 3: malformed JSON"),
    ('{"image": "x.png", "caption": "  "}', "line 3: empty 'caption'"),
    ('{"image": "nope.png", "caption": "c"}', "line 3: image file .*nope.png not found"),
    ('{"image": "x.png", "caption": 7}', "line 3: field 'caption' should be str"),
    ('["x.png", "c"]', "line 3: expected a JSON object"),
])
def test_a_bad_jsonl_line_is_one_error_naming_file_and_line(tmp_path, third_line, message):
    png(tmp_path / "x.png")
    good = json.dumps({"image": "x.png", "caption": "fine"})
    (tmp_path / "captions.jsonl").write_text(f"{good}\n{good}\n{third_line}\n")
    with pytest.raises(ValueError, match=rf"captions.jsonl {message}"):
        data.load_image_text_jsonl(tmp_path / "captions.jsonl", tmp_path)


def test_skip_bad_drops_bad_records_with_one_warning_and_a_count(tmp_path):
    png(tmp_path / "x.png")
    lines = ['{"image": "x.png", "caption": "fine"}', '{"image": "x.png"}', "{oops", '{"image": "y.png", "caption": "c"}',
             '{"image": "x.png", "caption": "also fine"}']
    (tmp_path / "captions.jsonl").write_text("\n".join(lines))
    with pytest.warns(UserWarning, match=r"captions.jsonl: skipped 3 bad record\(s\); the first: .*line 2") as record:
        ds = data.load_image_text_jsonl(tmp_path / "captions.jsonl", tmp_path, skip_bad=True)
    assert len(record) == 1 and [ds[i]["text"] for i in range(len(ds))] == ["fine", "also fine"]


def test_unreadable_image_bytes_raise_when_read_naming_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    (tmp_path / "p.jsonl").write_text(json.dumps({"image": "broken.png", "caption": "c"}))
    ds = data.load_image_text_jsonl(tmp_path / "p.jsonl", tmp_path)
    with pytest.raises(ValueError, match=r"broken.png: cannot read image"):
        ds[0]


def karpathy_fixture(tmp_path, third_caption="a cow"):
    for name in ("a.png", "b.png", "c.png"):
        png(tmp_path / "val2014" / name, value=ord(name[0]))
    spec = {"images": [
        {"filepath": "val2014", "filename": "a.png", "split": "train", "sentences": [{"raw": "a cat"}, {"raw": "cat"}]},
        {"filepath": "val2014", "filename": "b.png", "split": "restval", "sentences": [{"raw": "a dog"}]},
        {"filepath": "val2014", "filename": "c.png", "split": "test",
         "sentences": [{"raw": "a cow"}, {"raw": third_caption}]}]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(spec))
    return tmp_path / "dataset_coco.json"


def test_karpathy_loader_one_sample_per_sentence_grouped_by_image(tmp_path):
    path = karpathy_fixture(tmp_path)
    ds = data.load_karpathy(path, tmp_path, "train")  # train includes restval
    assert ds.captions == ["a cat", "cat", "a dog"] and ds.caption_image == [0, 0, 1]
    assert ds[2]["image_id"] == 1 and ds[2]["text"] == "a dog" and ds[2]["image"].eq(ord("b")).all()
    assert len(ds.images) == 2 and torch.equal(ds.images[0:2][1], ds[2]["image"])
    test = data.load_karpathy(path, tmp_path, "test")
    assert len(test) == 2 and test.caption_image == [0, 0]
    with pytest.raises(ValueError, match="no usable records"):
        data.load_karpathy(path, tmp_path, "tset")


def test_karpathy_loader_errors_name_the_image_and_sentence(tmp_path):
    path = karpathy_fixture(tmp_path, third_caption="")
    with pytest.raises(ValueError, match=r"dataset_coco.json images\[2\] \(c.png\) sentences\[1\]: empty 'raw'"):
        data.load_karpathy(path, tmp_path, "test")
    (tmp_path / "val2014" / "a.png").unlink()
    with pytest.raises(ValueError, match=r"dataset_coco.json images\[0\] \(a.png\): image file .*a.png not found"):
        data.load_karpathy(path, tmp_path, "train")
    (tmp_path / "broken.json").write_text('{"images": [\n{"filename": }]}')
    with pytest.raises(ValueError, match=r"broken.json line 2: malformed JSON"):
        data.load_karpathy(tmp_path / "broken.json", tmp_path, "train")


def vqa_fixture(tmp_path):
    for image_id in (1, 2):
        png(tmp_path / f"COCO_train2014_{image_id:012d}.png", value=image_id)
    questions = {"data_subtype": "train2014", "questions": [
        {"question_id": 10, "image_id": 1, "question": "what color?"},
        {"question_id": 11, "image_id": 2, "question": "how many?"},
        {"question_id": 12, "image_id": 2, "question": "is it?"}]}

    def answers(main, n_main, rest):
        return [{"answer": main}] * n_main + [{"answer": rest}] * (10 - n_main)
    annotations = {"annotations": [
        {"question_id": 10, "multiple_choice_answer": "red", "answers": answers("red", 8, "blue")},
        {"question_id": 11, "multiple_choice_answer": "2", "answers": answers("2", 9, "3")},
        {"question_id": 12, "multiple_choice_answer": "red", "answers": answers("red", 2, "maybe")}]}
    (tmp_path / "q.json").write_text(json.dumps(questions))
    (tmp_path / "a.json").write_text(json.dumps(annotations))
    return tmp_path / "q.json", tmp_path / "a.json"


def test_vqa_loader_builds_top_answers_and_soft_targets(tmp_path):
    questions, annotations = vqa_fixture(tmp_path)
    pattern = "COCO_{subtype}_{image_id:012d}.png"
    ds = data.load_vqa(questions, annotations, tmp_path, top_k=2, image_pattern=pattern)
    assert ds.answers == ["red", "2"]  # by frequency of the multiple-choice answer
    assert ds[0]["target"].tolist() == [1.0, 0.0]  # "blue" (2 of 10) is outside the top 2: it scores nothing
    assert ds[2]["target"].tolist() == pytest.approx([0.6, 0.0])  # 2 annotators said "red": ViLT's 0.6
    assert ds[1]["question_id"] == 11 and ds[1]["image"].eq(2).all() and len(ds[1]["answers"]) == 10
    # with a given vocabulary every question stays, also one whose answer lies outside it (target all zero)
    val = data.load_vqa(questions, annotations, tmp_path, answers=["red", "blue"], image_pattern=pattern)
    assert [val[i]["question_id"] for i in range(len(val))] == [10, 11, 12]
    assert val[1]["target"].tolist() == [0.0, 0.0] and val[1]["answers"] == ["2"] * 9 + ["3"]
    assert val[0]["target"].tolist() == pytest.approx([1.0, 0.6])
    test_dev = data.load_vqa(questions, None, tmp_path, answers=ds.answers, image_pattern=pattern)
    assert "target" not in test_dev[0] and test_dev[0]["text"] == "what color?"
    with pytest.raises(ValueError, match=r"q.json question_id 10: image file .*COCO_train2014_000000000001.jpg"):
        data.load_vqa(questions, annotations, tmp_path)  # the default pattern wants .jpg files


def test_nlvr2_loader_derives_image_names_from_the_identifier(tmp_path):
    png(tmp_path / "dev-850-0-img0.png", value=1)
    png(tmp_path / "dev-850-0-img1.png", value=2)
    png(tmp_path / "7" / "train-3-1-img0.png", value=3)
    png(tmp_path / "7" / "train-3-1-img1.png", value=4)
    lines = [{"identifier": "dev-850-0-0", "sentence": "one dog", "label": "True"},
             {"identifier": "dev-850-0-1", "sentence": "two dogs", "label": "False"},
             {"identifier": "train-3-1-0", "directory": "7", "sentence": "x", "label": "true"},
             {"identifier": "mine", "left": "dev-850-0-img1.png", "right": "dev-850-0-img0.png", "sentence": "y",
              "label": False}]
    (tmp_path / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
    ds = data.load_nlvr2(tmp_path / "dev.jsonl", tmp_path)
    assert [ds[i]["label"] for i in range(4)] == [1, 0, 1, 0]
    assert ds[0]["image"].eq(1).all() and ds[0]["image2"].eq(2).all() and ds[0]["text"] == "one dog"
    assert ds[2]["image"].eq(3).all() and ds[3]["image"].eq(2).all() and ds[3]["image2"].eq(1).all()


@pytest.mark.parametrize("line,message", [
    ({"identifier": "dev-850-0-0", "sentence": "x", "label": "maybe"}, r"\(dev-850-0-0\): label 'maybe' is not"),
    ({"identifier": "dev-850-0-0", "sentence": "x"}, r"\(dev-850-0-0\): missing field 'label'"),
    ({"identifier": "dev-9-0-0", "sentence": "x", "label": "True"}, r"\(dev-9-0-0\): image file .*dev-9-0-img0.png"),
    ({"identifier": "odd", "sentence": "x", "label": "True"}, r"\(odd\): identifier 'odd' is not"),
    ({"identifier": "dev-850-0-0", "sentence": "", "label": "True"}, r"\(dev-850-0-0\): empty 'sentence'"),
])
def test_a_bad_nlvr2_line_names_file_line_and_identifier(tmp_path, line, message):
    png(tmp_path / "dev-850-0-img0.png")
    png(tmp_path / "dev-850-0-img1.png")
    (tmp_path / "bad.jsonl").write_text(json.dumps(line))
    with pytest.raises(ValueError, match=rf"bad.jsonl line 1 {message}"):
        data.load_nlvr2(tmp_path / "bad.jsonl", tmp_path)


# --- text length, truncation, unambiguous retrieval ------------------------------------------------------

def preset_max_lens():
    import vlmerge  # the presets live with the recipe; data.py knows nothing of them
    return {name: preset.max_len for name, preset in vlmerge.PRESETS.items()}


def test_every_synthetic_text_fits_every_presets_max_len():
    tok, world = WORLD.tokenizer(), data.SyntheticWorld(train_size=3000)
    longest = {}
    for task in ("pretrain", "retrieval", "vqa", "nlvr2"):
        for split in data.SPLITS:  # val and test whole (1 000 scenes each), train's first 2 000
            ds = world.dataset(task, split)
            specs = [ds.scene_spec(j) for j in range(len(ds) // ds.per_scene)]
            texts = [t for spec in specs for t in spec.get("captions", [spec.get("text")])]
            assert len(texts) == len(ds)
            longest[task, split] = max(len(tok.tokenize(t)) + 2 for t in texts)
    # the longest caption the templates allow, by hand: 3 + 3 · 8 + 2 words, + [CLS] and [SEP]
    worst = "an image of a large yellow triangle at the top left, a large red circle at the top right and " \
            "a small white diamond at the bottom right"
    assert len(tok.tokenize(worst)) + 2 == 31 == max(longest.values())
    for name, max_len in preset_max_lens().items():
        assert max_len >= 31, name


def test_collator_warns_once_when_it_cuts_text_and_keeps_counting():
    tok = WORLD.tokenizer()
    collate = data.Collator(tok, max_len=8)
    short, long = "a red circle", "there is a small red circle at the top left and a blue square"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collate.texts([short, short])  # nothing cut: no warning
    with pytest.warns(UserWarning, match=r"2 text\(s\) cut to max_len 8 so far \(one had 16 tokens"):
        ids, _ = collate.texts([long, short, long])
    assert ids[0].tolist() == tok.encode(long, 8)[0].tolist() and ids[0, -1] == tok.sep_id
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per Collator: the second cut batch is only counted
        collate.text([long])
    assert collate.truncated == 3
    with pytest.warns(UserWarning, match=r"1 text\(s\) cut"):
        data.Collator(tok, max_len=8).texts([long])  # another Collator warns again


def true_of(caption, objects):
    """Is the caption literally true of the scene (extra objects allowed)? From the parsed words alone."""
    mentions, relations = parse_caption(caption)
    return any(all(m[:2] == o[:2] and m[2] in (None, o[2]) and m[3] in (None, o[3]) for m, o in zip(mentions, assigned))
               and all(relation_holds(assigned[a][3], relation, assigned[b][3]) for a, relation, b in relations)
               for assigned in itertools.permutations(objects, len(mentions)))


@pytest.mark.parametrize("split", ["val", "test"])
def test_retrieval_split_is_unambiguous(split):
    ds = data.SyntheticWorld().dataset("retrieval", split)
    scenes = [objects_of(ds.scene_spec(j)["scenes"][0]) for j in range(len(ds.images))]
    assert len(scenes) == 1000 and len({frozenset(s) for s in scenes}) == 1000  # no layout twice
    holding = collections.defaultdict(set)  # (color, shape) -> scenes holding it: a caption needs them all
    for j, objects in enumerate(scenes):
        for o in objects:
            holding[o[:2]].add(j)
    checked = 0
    for caption, j in zip(ds.captions, ds.caption_image):
        assert true_of(caption, scenes[j]), caption
        names = {m[:2] for m in parse_caption(caption)[0]}
        for k in set.intersection(*(holding[n] for n in names)) - {j}:
            assert not true_of(caption, scenes[k]), (caption, scenes[k])
            checked += 1
    assert checked > 1000  # many near misses were looked at, not only trivially different scenes
