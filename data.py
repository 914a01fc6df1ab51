"""Data for vlmerge: a BERT tokenizer, a synthetic vision-language world, real-format loaders, and collate.

Everything the experiments feed a model starts here as a *sample*: a dict with an `"image"` (uint8 (3,H,W))
and task fields. `Collator` turns a list of samples into a batch of tensors (train.py's `batch_stream` puts
both in a DataLoader). This file knows nothing of models.

**Tokenizer.** Sec. 5 encodes text with the bert-base-uncased tokenizer, 40 tokens long. `Tokenizer` is
that tokenizer written out: BERT's basic tokenization (text cleanup, lowercasing, accent stripping,
punctuation and CJK splitting) followed by greedy longest-match-first WordPiece. `Tokenizer.from_vocab_file`
reads BERT's vocab.txt; `Tokenizer.build` makes the small vocabulary of the synthetic world (BERT's special
tokens first, then its words sorted).

**The synthetic world** (the default data of every command) is the thing to understand first. A scene is
a 2×2 grid of cells (quadrants) holding 1–3 objects, at most one per cell, drawn on a dark, slightly noisy
background. An object is

    shape  circle | square | triangle | diamond | cross                    (5)
    color  red | orange | yellow | green | blue | purple | white            (7)
    size   small | large   (radius 0.12 or 0.21 of the image side)         (2)
    cell   top left | top right | bottom left | bottom right                (4)

jittered inside its cell. `render` draws a batch of scenes with tensor ops at any image size (a pixel-centre
grid, one inside-test per shape, objects composited by index), giving the image and the exact per-pixel
class map (0 background, 1 + shape index). The text about scenes comes from templates:

    caption    [there is | an image of] a [small|large] red circle at|in the top left, … and a blue square …
               or "a red circle left of|right of|above|below a blue square [and … at the …]"
    vqa        color:    what color is the object at the top left? | what color is the circle?
               shape:    what shape is the object in the top right? | what shape is the red object?
               size:     what size is the object at the …? | what size is the red circle?
               count:    how many objects are there? | how many red objects are there? | how many circles are there?
               exist:    is there a red circle?
               relation: is the red circle left of the blue square?
    nlvr2      the left image has more circles|red objects than the right image;
               both images contain a red object|a circle; exactly one image contains a red circle;
               both images have the same number of objects; the left image has a red circle above a blue square

The six tasks, each with train / val / test splits (sizes `train_size`, `val_size`, `test_size` of
`SyntheticWorld`, default 20 000 / 1 000 / 1 000 scenes, questions or pairs):

    pretrain   2–3 objects, `captions_per_image` (5) captions each; sample i = scene i // 5 with its caption
               i % 5, so one epoch sees every caption once (as COCO pre-training sees every sentence).
    retrieval  the same, as a COCO-like split: `dataset.images` (every scene's image, uint8, by index or
               slice), `dataset.captions` (every caption, in sample order) and `dataset.caption_image`
               (for caption k, the index of its image in `dataset.images`; also the sample's "image_id").
               Val and test are *unambiguous* (below): a caption is true of its own image only.
    vqa        1–3 objects; the question type (6 kinds) and then the answer are drawn uniformly *first* and
               the scene is built to fit, so the question alone does not tell the answer. Ten annotators
               answer, each correctly with p = 0.9, else with another answer of the same type; the target is
               ViLT / VLMo's soft score (0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / ≥4 annotators who gave a), scored
               by the official VQA accuracy (`vqa_accuracy`). `world.answers`: 20 answers (7 colors,
               5 shapes, small/large, 0–3, yes/no).
    nlvr2      two scenes and a statement of one of 5 kinds; the label (balanced) and the kind are drawn first,
               then scenes are drawn until the statement has that truth value.
    cls        the shape of the one large object (the others are small): 5 classes, `world.class_names`.
    seg        the class map of the drawn scene: `world.seg_classes` = 6 (background + 5 shapes).

Splits are disjoint twice over. Each (seed, task, split, index) has its own random stream, so a sample is
made on demand from its index alone (datasets are lazy, indexable, deterministic per index — what a
DistributedSampler needs). And a scene's *layout* — the set of (cell, shape, color, size) — belongs to one
split by a hash (crc32 mod 10: 0 → val, 1 → test, else train); samples are redrawn until the layout of every
scene they show (both scenes of an nlvr2 pair, each on its own) hashes to their split. So no val/test layout
is ever seen in training, by any task.

**Unambiguous retrieval.** Random scenes repeat, and a caption that leaves out sizes or positions is often
true of other scenes too: in a 1 000-image test split drawn scene by scene, 78 images shared their layout
with another, and of its 5 000 captions 965 were true of another image (516 even as a complete description of
it), so R@1 had a ceiling below 100 and the same noise for every model. We chose to fix the data, not the
metric (which stays one right image per caption, as COCO's): each caption comes with a `Claim` — the
(shape, color, size or None, cell or None) it mentions and the relations it states — and a val / test split
of pretrain / retrieval is built in order (`_unambiguous`), redrawing scene j until its layout is new, none of
its captions holds on an earlier scene and no earlier caption holds on it (`_claim_holds`: literal truth,
extra objects allowed). So every retrieval hit and miss is a real one. The train split stays lazy and per
index: ITC may still meet a false negative there.

**Text length.** With [CLS] and [SEP], a caption is 9–31 tokens (median 20; a quarter of the captions are over
24: three objects, each with its size and position, take 26 words, "an image of" 3 more), a VQA question
8–12, an NLVR2 statement 7–14. The synthetic presets use max_len 32, so nothing is ever cut. We chose the
longer text over shorter templates because what would have to go (sizes and positions of 3-object scenes) is
what retrieval must tell apart; the cost, measured on the tiny preset's pre-training step (batch 64, 1
thread, bf16): 0.69 s at 32 tokens vs 0.62 s at 24 (+11%). Real text longer than max_len is cut at the end;
the Collator then warns once, with the count so far, and keeps counting in `Collator.truncated`.

**The task stream** (merging over time, Dziadzio et al. 2025; `TaskStream`). A class is a (colour, shape)
*concept*. The base world (`SyntheticWorld(colors=...)`) shows only red and blue; the stream's concepts — the
other five colours × five shapes — are cut into T tasks of disjoint classes (`random` or `domain` order), each
a `ConceptScenes` of single-object images named "a [size] <colour> <shape>". Scored by zero-shot
classification over every stream concept; the retention set is the base concepts. `Mixture` /
`replay_mixture` interleave base data, the current task and the previous tasks in equal shares (replay).

**Real-format loaders** (`load_karpathy`, `load_image_text_jsonl`, `load_vqa`, `load_nlvr2`, `load_image_folder`,
`load_ade20k`) return Datasets of the same sample dicts, reading images lazily as RGB uint8. `vqa_accuracy`
is VQA v2's official metric (answer normalization, leave-one-out over the ten annotators). Whatever can be checked when loading is
(JSON, fields, empty text, image files exist): a bad record raises one ValueError naming the file and the
line or identifier, or with `skip_bad=True` is dropped and counted in one warning. A file whose bytes
cannot be decoded raises when it is read, naming the file.

**Collate.** `Collator` resizes (if `image_size`), applies RandAugment on training images (Sec. 5),
normalizes, tokenizes to `max_len` (fixed, so shapes are static) and makes BERT's MLM inputs; see its
docstring for how its randomness stays reproducible across workers and ranks.
"""

import functools
import itertools
import json
import random
import re
import unicodedata
import warnings
import zlib
from collections import Counter, defaultdict, namedtuple
from dataclasses import dataclass
from pathlib import Path

import torch
from einops import rearrange, repeat
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# ----------------------------------------------------------------------------------------------------------
# Tokenizer: bert-base-uncased, i.e. BasicTokenizer(do_lower_case=True) then WordPiece

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
MAX_WORD_CHARS = 100  # BERT: a longer word becomes [UNK] without trying WordPiece

# the CJK Unified Ideographs blocks BERT splits into single characters (not Hiragana, Katakana or Hangul)
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F),
               (0x2B740, 0x2B81F), (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))
# BERT counts every non-alphanumeric ASCII character as punctuation ("$", "^", "`" are not Unicode P*)
_ASCII_PUNCTUATION = ((33, 47), (58, 64), (91, 96), (123, 126))
_SPECIAL_PATTERN = re.compile("(" + "|".join(map(re.escape, SPECIAL_TOKENS)) + ")")


def _is_whitespace(char):
    return char in " \t\n\r" or unicodedata.category(char) == "Zs"


def _is_control(char):
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def _is_punctuation(char):
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _ASCII_PUNCTUATION) or unicodedata.category(char).startswith("P")


def _is_cjk(char):
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def _split_punctuation(word):
    pieces, current = [], ""
    for char in word:
        if _is_punctuation(char):
            pieces += [current, char] if current else [char]
            current = ""
        else:
            current += char
    return pieces + [current] if current else pieces


# Printable ASCII (letters, digits, the space and ASCII punctuation: most captions and every synthetic one) has no
# control, CJK or accented character, so BasicTokenizer reduces to lower-casing and cutting at spaces and at each
# punctuation mark; a test checks this fast path against the general one. Evaluation tokenizes every caption of a
# split for every model, so this is most of a zero-shot evaluation's time on a CPU.
_ASCII_WORDS = re.compile(r"[a-z0-9]+|[^a-z0-9 ]")


def basic_tokenize(text):
    """BERT's BasicTokenizer (uncased): the words WordPiece then segments."""
    if text.isascii() and text.isprintable():
        return _ASCII_WORDS.findall(text.lower())
    return _basic_tokenize(text)


def _basic_tokenize(text):
    # NUL, U+FFFD and control/format characters go; every kind of whitespace becomes a space
    text = "".join(" " if _is_whitespace(c) else c for c in text if not (c in "\x00\ufffd" or _is_control(c)))
    text = "".join(f" {c} " if _is_cjk(c) else c for c in text)
    words = []
    for word in unicodedata.normalize("NFC", text).split():
        # accents are stripped by decomposing (NFD) and dropping the combining marks (category Mn)
        word = "".join(c for c in unicodedata.normalize("NFD", word.lower()) if unicodedata.category(c) != "Mn")
        words += _split_punctuation(word)
    return words


class Tokenizer:
    """bert-base-uncased tokenization over a vocabulary `vocab` (token → id)."""

    def __init__(self, vocab):
        missing = [t for t in SPECIAL_TOKENS if t not in vocab]
        if missing:
            raise ValueError(f"vocabulary lacks the special tokens {missing}")
        self.vocab = dict(vocab)
        self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id = (self.vocab[t] for t in SPECIAL_TOKENS)
        self.special_ids = {self.vocab[t] for t in SPECIAL_TOKENS}
        self._memo = {}  # text -> its tokens (tokenize)

    @classmethod
    def from_vocab_file(cls, path):
        """Read a BERT vocab.txt: one token a line, the id is the line number (from 0)."""
        vocab = {}
        for number, token in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
            if token in vocab:
                raise ValueError(f"{path} line {number + 1}: token {token!r} already on line {vocab[token] + 1}")
            vocab[token] = number
        return cls(vocab)

    @classmethod
    def build(cls, texts):
        """A whole-word vocabulary: BERT's special tokens ([PAD] = 0), then every word of `texts`, sorted."""
        words = sorted({w for text in texts for w in basic_tokenize(text)} - set(SPECIAL_TOKENS))
        return cls({token: i for i, token in enumerate([*SPECIAL_TOKENS, *words])})

    def save(self, path):
        """Write vocab.txt, readable by `from_vocab_file` and by HF's BertTokenizer."""
        tokens = sorted(self.vocab, key=self.vocab.get)
        Path(path).write_text("".join(t + "\n" for t in tokens), encoding="utf-8")

    def __len__(self):
        return len(self.vocab)

    def tokenize(self, text):
        """WordPiece tokens of `text`, exactly as bert-base-uncased gives them (a list the caller may keep).

        Memoized per tokenizer: a recipe scores every model on the same captions and trains every stage on the
        same sample order, so most texts come back many times (the memo is emptied at 2^17 texts)."""
        tokens = self._memo.get(text)
        if tokens is None:
            if len(self._memo) >= 1 << 17:
                self._memo.clear()
            tokens = self._memo[text] = tuple(self._tokenize(text))
        return list(tokens)

    def _tokenize(self, text):
        tokens = []
        # a special token typed in the text stays whole (case-sensitive), as in HF
        for i, chunk in enumerate(_SPECIAL_PATTERN.split(text)):
            if i % 2:
                tokens.append(chunk)
            else:
                tokens += [piece for word in basic_tokenize(chunk) for piece in self._wordpiece(word)]
        return tokens

    def _wordpiece(self, word):
        """Greedy longest-match-first; a word with any unmatchable rest is a single [UNK]."""
        if len(word) > MAX_WORD_CHARS:
            return ["[UNK]"]
        pieces, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in self.vocab:
                    break
            else:
                return ["[UNK]"]
            pieces.append(piece)
            start = end
        return pieces

    def encode(self, text, max_len=40):
        """`[CLS] tokens [SEP] [PAD]…` as (ids, attention mask), both LongTensor (max_len,).

        Text of more than max_len − 2 tokens is truncated at the end; [SEP] always closes the sequence.
        """
        return self.encode_tokens(self.tokenize(text), max_len)

    def encode_tokens(self, tokens, max_len=40):
        """`encode` of already tokenized text (the Collator tokenizes once to count what is cut)."""
        if max_len < 2:
            raise ValueError(f"max_len {max_len}: needs room for [CLS] and [SEP]")
        tokens = tokens[: max_len - 2]
        ids = [self.cls_id, *(self.vocab.get(t, self.unk_id) for t in tokens), self.sep_id]
        padding = max_len - len(ids)
        return torch.tensor(ids + [self.pad_id] * padding), torch.tensor([1] * len(ids) + [0] * padding)


# ----------------------------------------------------------------------------------------------------------
# The synthetic world: scenes

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "white")
PALETTE = torch.tensor([(220, 40, 40), (245, 140, 30), (240, 220, 50), (50, 180, 70),
                        (50, 90, 230), (150, 70, 200), (235, 235, 235)], dtype=torch.uint8)
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
PLURALS = ("circles", "squares", "triangles", "diamonds", "crosses")
SIZES = ("small", "large")
RADII = (0.12, 0.21)  # fraction of the image side; a cell is half of it, so objects never leave their cell
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # cell = 2 * row + column
RELATIONS = ("left of", "right of", "above", "below")
MAX_OBJECTS = 3
BACKGROUND_LEVELS = (20, 70)  # a dark gray per scene ...
BACKGROUND_NOISE = 10  # ... plus uniform per-pixel, per-channel noise in ±10

ANSWER_POOLS = {"color": COLORS, "shape": SHAPES, "size": SIZES, "count": ("0", "1", "2", "3"),
                "exist": ("yes", "no"), "relation": ("yes", "no")}
ANSWERS = tuple(dict.fromkeys(a for pool in ANSWER_POOLS.values() for a in pool))
ANNOTATORS, ANNOTATOR_ACCURACY = 10, 0.9
STATEMENT_KINDS = ("more", "both", "exactly_one", "same_number", "relation")
TASKS = ("pretrain", "vqa", "retrieval", "nlvr2", "cls", "seg")
SPLITS = ("train", "val", "test")
# every word the templates below use besides the attribute names (the world's tokenizer is built from it)
_TEMPLATE_WORDS = ("a an the there is are image images of at in and , ? what color shape size object objects "
                   "how many both contain contains exactly one has have more than same number top bottom")

Obj = namedtuple("Obj", "shape color size cell dx dy")  # attribute indices, cell 0–3, jitter (image fractions)
Scene = namedtuple("Scene", "objects background noise_seed")
# what a caption states: mentions ((shape, color, size or None, cell or None), ...), relations ((i, rel, k), ...)
Claim = namedtuple("Claim", "mentions relations")

# inside-tests in units of the radius: (u, v) is a pixel's offset from the centre, v pointing down
_INSIDE = (
    lambda u, v: u * u + v * v <= 1,                                        # circle
    lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.85,                   # square
    lambda u, v: (v <= 0.8) & (2 * u.abs() <= v + 1),                       # triangle, apex up
    lambda u, v: u.abs() + v.abs() <= 1,                                    # diamond
    lambda u, v: (torch.minimum(u.abs(), v.abs()) <= 0.3) & (torch.maximum(u.abs(), v.abs()) <= 1),  # cross
)


def _place(rng, cell, shape=None, color=None, size=None, palette=None):
    """An object in `cell`; attributes not given are drawn uniformly (a colour from `palette`, if given)."""
    shape = rng.randrange(len(SHAPES)) if shape is None else shape
    if color is None:
        color = rng.randrange(len(COLORS)) if palette is None else rng.choice(palette)
    size = rng.randrange(len(SIZES)) if size is None else size
    slack = 0.25 - RADII[size] - 0.01  # how far the centre may move and keep the object inside its cell
    return Obj(shape, color, size, cell, rng.uniform(-slack, slack), rng.uniform(-slack, slack))


def _place_avoiding(rng, cell, avoid):
    """A random object for which avoid(obj) is false (used to keep a referring expression unique)."""
    while True:
        obj = _place(rng, cell)
        if not avoid(obj):
            return obj


def _random_objects(rng, n, palette=None):
    return [_place(rng, cell, palette=palette) for cell in rng.sample(range(4), n)]


def _scene(rng, objects):
    return Scene(tuple(objects), rng.randint(*BACKGROUND_LEVELS), rng.randrange(2**31))


def _other(rng, count, exclude):
    """A random index in range(count) other than `exclude`."""
    return rng.choice([i for i in range(count) if i != exclude])


def _layout(objects):
    """What a scene shows, up to jitter and background: one code per cell (0 = empty)."""
    codes = [0] * 4
    for o in objects:
        codes[o.cell] = 1 + (o.shape * len(COLORS) + o.color) * len(SIZES) + o.size
    return bytes(codes)


def _split_of(objects):
    """The split a scene's layout belongs to: crc32 mod 10, 0 → val, 1 → test, else train."""
    bucket = zlib.crc32(_layout(objects)) % 10
    return SPLITS[{0: 1, 1: 2}.get(bucket, 0)]


def _redraw(split, draw):
    """Call draw() → (list of object lists, text) until it succeeds (not None) with every layout in `split`
    (each scene of an NLVR2 pair on its own: a pair is in a split only if both its scenes are)."""
    for _ in range(100_000):
        drawn = draw()
        if drawn is not None and all(_split_of(objects) == split for objects in drawn[0]):
            return drawn
    raise RuntimeError(f"no draw landed in split {split!r}: the draw function cannot succeed")


def _hash31(x):
    """A cheap integer hash on int64 tensors; values stay below 2**31 so products cannot overflow."""
    x = x & 0x7FFFFFFF
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & 0x7FFFFFFF
    return (x >> 16) ^ x


def _background(scenes, size):
    """Dark gray plus noise hashed from the scene's noise_seed, so a scene has the same pixels in any batch."""
    seeds = torch.tensor([s.noise_seed for s in scenes])[:, None]
    levels = torch.tensor([s.background for s in scenes])[:, None, None]
    bits = _hash31(seeds * 1_000_003 + torch.arange(size * size))[..., None]  # (N, S*S, 1): one hash per pixel
    # three channels from one hash by shifting it: a third of the hashing work
    noise = (bits >> torch.tensor([0, 10, 20])) % (2 * BACKGROUND_NOISE + 1) - BACKGROUND_NOISE  # (N, S*S, 3)
    return rearrange((levels + noise).clamp(0, 255).to(torch.uint8), "n (h w) c -> n c h w", h=size)


def _object_table(scenes):
    """(N, MAX_OBJECTS, 6): present, shape, color, centre x, centre y, radius; absent objects have radius 1."""
    def row(o):
        row_index, column = divmod(o.cell, 2)
        return [1, o.shape, o.color, (column + 0.5) / 2 + o.dx, (row_index + 0.5) / 2 + o.dy, RADII[o.size]]
    empty = [0, 0, 0, 0, 0, 1]
    return torch.tensor([[row(o) for o in s.objects] + [empty] * (MAX_OBJECTS - len(s.objects)) for s in scenes])


def render(scenes, size):
    """Draw scenes: images (N,3,S,S) uint8 and class maps (N,S,S) long (0 background, 1 + shape index)."""
    n, k = len(scenes), MAX_OBJECTS
    present, shape, color, cx, cy, radius = _object_table(scenes).unbind(-1)  # each (N, K)
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) / size  # pixel centres in [0, 1]
    u = (rearrange(grid, "w -> 1 1 1 w") - cx[..., None, None]) / radius[..., None, None]  # (N, K, 1, S)
    v = (rearrange(grid, "h -> 1 1 h 1") - cy[..., None, None]) / radius[..., None, None]  # (N, K, S, 1)
    inside = torch.zeros(n, k, size, size, dtype=torch.bool)
    for index, test in enumerate(_INSIDE):
        which = (shape == index) & present.bool()  # test each object against its own shape only
        inside[which] = test(u[which], v[which])
    # objects sit in different cells and never overlap, so a sum of disjoint masks numbers them 1..K
    object_map = (inside * rearrange(torch.arange(1, k + 1), "k -> 1 k 1 1")).sum(1)  # (N, S, S)

    colors = torch.cat([torch.zeros(n, 1, 3, dtype=torch.uint8), PALETTE[color.long()]], 1)  # (N, 1+K, 3)
    pixels = torch.gather(colors, 1, repeat(object_map, "n h w -> n (h w) c", c=3))  # (N, S*S, 3)
    pixels = rearrange(pixels, "n (h w) c -> n c h w", h=size)
    images = torch.where(object_map[:, None] > 0, pixels, _background(scenes, size))
    classes = torch.cat([torch.zeros(n, 1, dtype=torch.long), shape.long() + 1], 1)  # (N, 1+K)
    class_map = rearrange(torch.gather(classes, 1, object_map.flatten(1)), "n (h w) -> n h w", h=size)
    return images, class_map


# ----------------------------------------------------------------------------------------------------------
# The synthetic world: text about scenes

def _relations(a, b):
    """The relations that hold for "a <relation> b"."""
    (row_a, col_a), (row_b, col_b) = divmod(a.cell, 2), divmod(b.cell, 2)
    holds = (col_a < col_b, col_a > col_b, row_a < row_b, row_a > row_b)
    return [r for r, h in zip(RELATIONS, holds) if h]


def _where(rng, obj):
    return f"{rng.choice(('at', 'in'))} the {POSITIONS[obj.cell]}"


def _name(obj):
    return f"{COLORS[obj.color]} {SHAPES[obj.shape]}"


def _a(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _describe(rng, obj, cell=None):
    """The phrase naming obj (its size half of the time) and the mention it makes: (shape, color, size or
    None, cell or None), the attributes a reader can check."""
    size = obj.size if rng.random() < 0.5 else None
    phrase = _a(("" if size is None else f"{SIZES[size]} ") + _name(obj))
    return phrase, (obj.shape, obj.color, size, cell)


def _join(parts):
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _caption(rng, objects):
    """One caption and its Claim: every object with its position, or a relation between two and positions for
    the rest."""
    objects = rng.sample(objects, len(objects))  # the order of mention is free
    parts, mentions, relations = [], [], []
    if len(objects) >= 2 and rng.random() < 0.5:
        a, b, *objects = objects
        (phrase_a, mention_a), relation = _describe(rng, a), rng.choice(_relations(a, b))
        phrase_b, mention_b = _describe(rng, b)
        parts.append(f"{phrase_a} {relation} {phrase_b}")
        mentions += [mention_a, mention_b]
        relations.append((0, relation, 1))
    for o in objects:
        phrase, mention = _describe(rng, o, o.cell)
        parts.append(f"{phrase} {_where(rng, o)}")
        mentions.append(mention)
    return rng.choice(("", "there is ", "an image of ")) + _join(parts), Claim(tuple(mentions), tuple(relations))


def _fits(mention, obj):
    shape, color, size, cell = mention
    return (shape, color) == (obj.shape, obj.color) and size in (None, obj.size) and cell in (None, obj.cell)


def _claim_holds(claim, objects):
    """Whether a caption is literally true of a scene: its mentions go to distinct objects with every stated
    attribute and every stated relation holds between them. Objects it does not mention are allowed (a
    reader of "a red circle and a blue square" does not know there is nothing else)."""
    return any(all(map(_fits, claim.mentions, assigned))
               and all(relation in _relations(assigned[i], assigned[k]) for i, relation, k in claim.relations)
               for assigned in itertools.permutations(objects, len(claim.mentions)))


# VQA: given the answer, build a scene and a question that has it; objects[0] is the one asked about.

def _ask_color(rng, answer):
    objects = _random_objects(rng, rng.randint(1, 3))
    target = objects[0] = _place(rng, objects[0].cell, color=COLORS.index(answer))
    if rng.random() < 0.5:
        return [objects], f"what color is the object {_where(rng, target)}?"
    objects[1:] = [_place(rng, o.cell, shape=_other(rng, len(SHAPES), target.shape)) for o in objects[1:]]
    return [objects], f"what color is the {SHAPES[target.shape]}?"


def _ask_shape(rng, answer):
    objects = _random_objects(rng, rng.randint(1, 3))
    target = objects[0] = _place(rng, objects[0].cell, shape=SHAPES.index(answer))
    if rng.random() < 0.5:
        return [objects], f"what shape is the object {_where(rng, target)}?"
    objects[1:] = [_place(rng, o.cell, color=_other(rng, len(COLORS), target.color)) for o in objects[1:]]
    return [objects], f"what shape is the {COLORS[target.color]} object?"


def _ask_size(rng, answer):
    objects = _random_objects(rng, rng.randint(1, 3))
    target = objects[0] = _place(rng, objects[0].cell, size=SIZES.index(answer))
    if rng.random() < 0.5:
        return [objects], f"what size is the object {_where(rng, target)}?"
    objects[1:] = [_place_avoiding(rng, o.cell, lambda x: _name(x) == _name(target)) for o in objects[1:]]
    return [objects], f"what size is the {_name(target)}?"


def _ask_count(rng, answer):
    count = int(answer)
    if count > 0 and rng.random() < 1 / 3:
        return [_random_objects(rng, count)], "how many objects are there?"
    cells = rng.sample(range(4), rng.randint(max(count, 1), 3))
    if rng.random() < 0.5:
        color = rng.randrange(len(COLORS))
        objects = [_place(rng, c, color=color if i < count else _other(rng, len(COLORS), color))
                   for i, c in enumerate(cells)]
        return [objects], f"how many {COLORS[color]} objects are there?"
    shape = rng.randrange(len(SHAPES))
    objects = [_place(rng, c, shape=shape if i < count else _other(rng, len(SHAPES), shape))
               for i, c in enumerate(cells)]
    return [objects], f"how many {PLURALS[shape]} are there?"


def _ask_exist(rng, answer):
    shape, color = rng.randrange(len(SHAPES)), rng.randrange(len(COLORS))
    is_it = lambda o: (o.shape, o.color) == (shape, color)  # noqa: E731
    objects = [_place_avoiding(rng, c, is_it) for c in rng.sample(range(4), rng.randint(1, 3))]
    if answer == "yes":
        objects[0] = _place(rng, objects[0].cell, shape=shape, color=color)
    elif rng.random() < 0.5:  # a near miss (same color or same shape) so that "no" needs a careful look
        if rng.random() < 0.5:
            objects[0] = _place(rng, objects[0].cell, shape=shape, color=_other(rng, len(COLORS), color))
        else:
            objects[0] = _place(rng, objects[0].cell, shape=_other(rng, len(SHAPES), shape), color=color)
    return [objects], f"is there {_a(COLORS[color])} {SHAPES[shape]}?"


def _ask_relation(rng, answer):
    cells = rng.sample(range(4), rng.randint(2, 3))
    a = _place(rng, cells[0])
    b = _place_avoiding(rng, cells[1], lambda o: _name(o) == _name(a))
    rest = [_place_avoiding(rng, c, lambda o: _name(o) in (_name(a), _name(b))) for c in cells[2:]]
    true = _relations(a, b)
    relation = rng.choice(true if answer == "yes" else [r for r in RELATIONS if r not in true])
    return [[a, b, *rest]], f"is the {_name(a)} {relation} the {_name(b)}?"


_ASK = {"color": _ask_color, "shape": _ask_shape, "size": _ask_size, "count": _ask_count,
        "exist": _ask_exist, "relation": _ask_relation}


SOFT_SCORES = (0.0, 0.3, 0.6, 0.9, 1.0)  # by the number of annotators (4 or more: 1)


def vqa_scores(annotator_answers):
    """Training targets, ViLT / VLMo's soft scores: 0.3, 0.6, 0.9, 1.0 for an answer 1, 2, 3, ≥4 annotators gave.

    These are what `vqa_accuracy` gives that answer (its leave-one-out average), not min(1, n/3), which
    would credit 1 and 2 annotators with 0.33 and 0.67."""
    return {a: SOFT_SCORES[min(n, 4)] for a, n in Counter(annotator_answers).items()}


# NLVR2: a statement about two object lists and its truth; attributes are taken from objects in the scenes
# so that statements are often true and the truth is a question of looking, not of wording.

def _count(objects, attr, value):
    return sum(getattr(o, attr) == value for o in objects)


def _noun(obj, attr, plural):
    if attr == "shape":
        return PLURALS[obj.shape] if plural else _a(SHAPES[obj.shape])
    return f"{COLORS[obj.color]} objects" if plural else _a(f"{COLORS[obj.color]} object")


def _say_more(rng, left, right, side, attr):
    first, second = (left, right) if side == "left" else (right, left)
    obj, other_side = rng.choice(first), "right" if side == "left" else "left"
    value = getattr(obj, attr)
    truth = _count(first, attr, value) > _count(second, attr, value)
    return f"the {side} image has more {_noun(obj, attr, True)} than the {other_side} image", truth


def _say_both(rng, left, right, side, attr):
    obj = rng.choice(left + right)
    value = getattr(obj, attr)
    truth = _count(left, attr, value) > 0 and _count(right, attr, value) > 0
    return f"both images contain {_noun(obj, attr, False)}", truth


def _say_exactly_one(rng, left, right, side, attr):
    obj = rng.choice(left + right)
    truth = (_name(obj) in map(_name, left)) != (_name(obj) in map(_name, right))
    return f"exactly one image contains {_a(_name(obj))}", truth


def _say_same_number(rng, left, right, side, attr):
    return "both images have the same number of objects", len(left) == len(right)


def _say_relation(rng, left, right, side, attr):
    objects = left if side == "left" else right
    if len(objects) < 2:
        return None
    a, b = rng.sample(objects, 2)
    relation = rng.choice(RELATIONS)
    truth = any(relation in _relations(x, y) for x in objects for y in objects
                if x is not y and _name(x) == _name(a) and _name(y) == _name(b))
    return f"the {side} image has {_a(_name(a))} {relation} {_a(_name(b))}", truth


_SAY = {"more": _say_more, "both": _say_both, "exactly_one": _say_exactly_one,
        "same_number": _say_same_number, "relation": _say_relation}


# ----------------------------------------------------------------------------------------------------------
# The synthetic world: one spec maker per task. A spec is what a sample shows, without pixels:
# {"scenes": [Scene, ...], "text" or "captions", task fields}.

def _objects_in(rng, split, fewest, most, palette=None):
    """fewest–most random objects (colours from `palette`, if given) whose layout belongs to `split`."""
    (objects,), _ = _redraw(split, lambda: ([_random_objects(rng, rng.randint(fewest, most), palette)], None))
    return objects


def _make_captioned(rng, split, world):
    objects = _objects_in(rng, split, 2, 3, world.palette)
    captions, claims = zip(*(_caption(rng, objects) for _ in range(world.captions_per_image)))
    return {"scenes": [_scene(rng, objects)], "captions": list(captions), "claims": list(claims)}


def _names(items):
    """The sorted (shape, color) names of objects or of a caption's mentions."""
    return tuple(sorted(item[:2] for item in items))


def _unambiguous(draw, count):
    """count captioned scene specs, scene j from draw(j, attempt) for attempt 0, 1, … until it has a layout no
    earlier scene has, none of its captions is true of an earlier scene, and no earlier caption is true of it
    — so that a retrieval split has exactly one right image per caption. Names (shape, color) index both
    ways: a caption can only be true of a scene holding every name it mentions."""
    specs, layouts = [], set()
    scenes_with = defaultdict(set)  # (shape, color) → indices of the earlier scenes holding one
    claims_on = defaultdict(list)   # the names a caption mentions → the earlier captions' claims

    def clashes(objects, claims):
        if _layout(objects) in layouts:
            return True
        for claim in claims:  # a new caption true of an earlier scene
            candidates = set.intersection(*(scenes_with[n] for n in _names(claim.mentions)))
            if any(_claim_holds(claim, specs[k]["scenes"][0].objects) for k in candidates):
                return True
        # an earlier caption true of the new scene: it mentions 2 or 3 of the scene's objects by name
        subsets = (s for r in (2, 3) for s in itertools.combinations(objects, r))
        return any(_claim_holds(c, objects) for subset in subsets for c in claims_on[_names(subset)])

    def first_clear(j):
        for attempt in range(10_000):
            spec = draw(j, attempt)
            if not clashes(spec["scenes"][0].objects, spec["claims"]):
                return spec
        raise RuntimeError(f"scene {j}: no unambiguous draw in 10 000 attempts")

    for j in range(count):
        spec = first_clear(j)
        objects = spec["scenes"][0].objects
        layouts.add(_layout(objects))
        for o in objects:
            scenes_with[(o.shape, o.color)].add(j)
        for claim in spec["claims"]:
            claims_on[_names(claim.mentions)].append(claim)
        specs.append(spec)
    return specs


def _make_vqa(rng, split, world):
    # drawn before the scene, so that the question alone does not predict the answer
    question_type = rng.choice(tuple(ANSWER_POOLS))
    answer = rng.choice(ANSWER_POOLS[question_type])
    (objects,), question = _redraw(split, lambda: _ASK[question_type](rng, answer))
    wrong = [a for a in ANSWER_POOLS[question_type] if a != answer]
    annotators = [answer if rng.random() < ANNOTATOR_ACCURACY else rng.choice(wrong) for _ in range(ANNOTATORS)]
    return {"scenes": [_scene(rng, objects)], "text": question, "question_type": question_type,
            "answer": answer, "answers": annotators}


def _make_nlvr2(rng, split, world):
    # label and statement kind are drawn before the scenes, so that the wording does not predict the label
    label, kind = rng.random() < 0.5, rng.choice(STATEMENT_KINDS)
    side, attr = rng.choice(("left", "right")), rng.choice(("color", "shape"))

    def draw():  # each scene drawn in the split first: the same pairs as rejecting whole pairs, 10x fewer draws
        left, right = _objects_in(rng, split, 1, 3), _objects_in(rng, split, 1, 3)
        said = _SAY[kind](rng, left, right, side, attr)
        return None if said is None or said[1] != label else ([left, right], said[0])

    (left, right), statement = _redraw(split, draw)
    return {"scenes": [_scene(rng, left), _scene(rng, right)], "text": statement, "label": int(label), "kind": kind}


def _make_cls(rng, split, world):
    label = rng.randrange(len(SHAPES))

    def draw():
        cells = rng.sample(range(4), rng.randint(1, 3))
        large = _place(rng, cells[0], shape=label, size=SIZES.index("large"))
        return [[large, *(_place(rng, c, size=SIZES.index("small")) for c in cells[1:])]], None

    (objects,), _ = _redraw(split, draw)
    return {"scenes": [_scene(rng, objects)], "label": label}


def _make_seg(rng, split, world):
    return {"scenes": [_scene(rng, _objects_in(rng, split, 1, 3))]}


_MAKE = {"pretrain": _make_captioned, "retrieval": _make_captioned, "vqa": _make_vqa,
         "nlvr2": _make_nlvr2, "cls": _make_cls, "seg": _make_seg}
_ANSWER_INDEX = {a: i for i, a in enumerate(ANSWERS)}


def _dense_target(scores, num_answers):
    """(num_answers,) float target from {answer index: score}."""
    target = torch.zeros(num_answers)
    target[list(scores)] = torch.tensor(list(scores.values()), dtype=torch.float32)
    return target


def _vqa_sample(spec, images, maps):
    scores = {_ANSWER_INDEX[a]: s for a, s in vqa_scores(spec["answers"]).items()}
    return {"image": images[0], "text": spec["text"], "answers": spec["answers"],
            "target": _dense_target(scores, len(ANSWERS))}


_SAMPLE = {
    "pretrain": lambda spec, images, maps: {"image": images[0], "text": spec["text"]},
    "retrieval": lambda spec, images, maps: {"image": images[0], "text": spec["text"], "image_id": spec["image_id"]},
    "vqa": _vqa_sample,
    "nlvr2": lambda spec, images, maps: {"image": images[0], "image2": images[1], "text": spec["text"],
                                         "label": spec["label"]},
    "cls": lambda spec, images, maps: {"image": images[0], "label": spec["label"]},
    "seg": lambda spec, images, maps: {"image": images[0], "mask": maps[0]},
}


# A recipe draws the same samples again and again: maa, msa and every seeded msa train on one sample order, and
# every model is scored on the same splits. Drawing a captioned scene (~0.3 ms) and rendering it (~0.3 ms) cost
# as much as a tenth of a tiny pre-training step, so both are kept for reuse within the process, up to
# MEMO_BYTES of pixels (then nothing more is kept). The tensors handed out are shared: nothing may write into
# them in place (the Collator resizes, augments and normalizes into new tensors).
MEMO_BYTES = 1 << 30
_memo, _memo_bytes = {}, 0


def _memoized(key, make, nbytes=lambda value: 0):
    global _memo_bytes
    value = _memo.get(key)
    if value is None:
        value = make()
        if _memo_bytes < MEMO_BYTES:
            _memo[key] = value
            _memo_bytes += nbytes(value) + 200  # + the key and the spec, roughly
    return value


def _pixel_bytes(rendered):
    return sum(t.numel() * t.element_size() for t in rendered)


class SyntheticDataset(Dataset):
    """One task × split of a SyntheticWorld; sample i is made on demand from (seed, task, split, i)."""

    def __init__(self, world, task, split):
        self.world, self.task, self.split = world, task, split
        self.num_scenes = getattr(world, f"{split}_size")
        self.per_scene = world.captions_per_image if task in ("pretrain", "retrieval") else 1

    def __len__(self):
        return self.num_scenes * self.per_scene

    def scene_spec(self, j):
        """The spec of scene (or question, or pair) j; for captioned tasks it holds all its captions."""
        return self.draw(j)

    def draw(self, j, attempt=0):
        """Scene j's spec from its own random stream (str seeds: stable across runs); attempt > 0 are the
        redraws that make a val/test retrieval split unambiguous."""
        key = f"{self.world.seed}/{self.task}/{self.split}/{j}" + (f"/{attempt}" if attempt else "")
        return _memoized(("spec", repr(self.world), key),
                         lambda: _MAKE[self.task](random.Random(key), self.split, self.world))

    def spec(self, i):
        """What sample i shows, without pixels: {"scenes", "text", task fields}."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        j, k = divmod(i, self.per_scene)
        spec = self.scene_spec(j)
        return {**spec, "text": spec["captions"][k], "image_id": j} if "captions" in spec else spec

    def __getitem__(self, i):
        spec = self.spec(i)
        size = self.world.image_size
        images, maps = _memoized(("pixels", size, repr(spec["scenes"])), lambda: render(spec["scenes"], size),
                                 _pixel_bytes)
        return _SAMPLE[self.task](spec, images, maps)


class LazyImages:
    """The distinct images of a retrieval split as a sequence of uint8 (3,H,W) tensors, made when indexed.

    `images[j]` is one image, `images[a:b]` a list of them (what `Collator.images` takes).
    """

    def __init__(self, count, load_many):
        self.count, self.load_many = count, load_many  # load_many(list of indices) -> list of images

    def __len__(self):
        return self.count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.load_many(range(*index.indices(self.count)))
        if not 0 <= index < self.count:
            raise IndexError(f"image {index} of {self.count}")
        return self.load_many([index])[0]


@functools.cache
def _unambiguous_split(seed, task, split, count, captions_per_image):
    """The specs of a val / test split of a captioned task (cached: every evaluation of a recipe shares them)."""
    dataset = SyntheticDataset(SyntheticWorld(seed=seed, captions_per_image=captions_per_image), task, split)
    return _unambiguous(dataset.draw, count)


class SyntheticCaptions(SyntheticDataset):
    """pretrain / retrieval: sample i is scene i // C with its caption i % C (C = captions_per_image).

    For retrieval evaluation: `images` (one per scene, a LazyImages), `captions` (sample order) and
    `caption_image` (caption k → index of its image in `images`; also sample k's "image_id").
    A val / test split is drawn whole, once per process (`_unambiguous`), so that each caption has one image.
    """

    def scene_spec(self, j):
        if self.split == "train":
            return self.draw(j)
        return _unambiguous_split(self.world.seed, self.task, self.split, self.num_scenes,
                                  self.world.captions_per_image)[j]

    @property
    def images(self):
        return LazyImages(self.num_scenes, self._render_scenes)

    def _render_scenes(self, indices):
        scenes = [self.scene_spec(j)["scenes"][0] for j in indices]
        return list(render(scenes, self.world.image_size)[0]) if scenes else []

    @functools.cached_property
    def captions(self):
        return [c for j in range(self.num_scenes) for c in self.scene_spec(j)["captions"]]

    @functools.cached_property
    def caption_image(self):
        return [i // self.per_scene for i in range(len(self))]


@dataclass
class SyntheticWorld:
    """Scenes of colored shapes and the text about them; sizes are counts of scenes / questions / pairs."""

    seed: int = 0
    image_size: int = 32
    train_size: int = 20_000
    val_size: int = 1_000
    test_size: int = 1_000
    captions_per_image: int = 5
    # the colours pretrain / retrieval scenes draw from (None: all of COLORS); the base world of the task
    # stream leaves some out. The tokenizer still holds every colour word, so a later model can learn them.
    colors: tuple | None = None

    def __post_init__(self):
        unknown = [c for c in self.colors or () if c not in COLORS]
        if unknown or self.colors == ():
            raise ValueError(f"SyntheticWorld colors {self.colors!r}: choose a non-empty subset of {COLORS}")

    @property
    def palette(self):
        """Indices of `colors` (None: every colour)."""
        return None if self.colors is None else [COLORS.index(c) for c in self.colors]

    @property
    def answers(self):
        """The VQA answer vocabulary: target index i scores answers[i]."""
        return list(ANSWERS)

    @property
    def class_names(self):
        return list(SHAPES)

    @property
    def num_classes(self):
        return len(SHAPES)

    @property
    def seg_classes(self):
        return 1 + len(SHAPES)  # background + one class per shape

    def dataset(self, task, split):
        if task not in TASKS or split not in SPLITS:
            raise ValueError(f"task {task!r}, split {split!r}: choose a task of {TASKS} and a split of {SPLITS}")
        if self.colors is not None and task not in ("pretrain", "retrieval"):
            raise ValueError(f"task {task!r}: only pretrain / retrieval scenes honour SyntheticWorld.colors")
        return (SyntheticCaptions if task in ("pretrain", "retrieval") else SyntheticDataset)(self, task, split)

    def tokenizer(self):
        """A whole-word tokenizer covering every word the world's texts can contain."""
        words = [_TEMPLATE_WORDS, *COLORS, *SHAPES, *PLURALS, *SIZES, *POSITIONS, *RELATIONS, *ANSWERS]
        return Tokenizer.build(words)

    def generate(self, n, seed=0, image_size=None, chunk=256):
        """n random scenes (1–3 objects) drawn at once: (images (n,3,S,S) uint8, class maps (n,S,S)).

        For benchmarks and quick looks; these scenes belong to no split.
        """
        rng = random.Random(f"{self.seed}/generate/{seed}")
        scenes = [_scene(rng, _random_objects(rng, rng.randint(1, 3))) for _ in range(n)]
        drawn = [render(scenes[i:i + chunk], image_size or self.image_size) for i in range(0, n, chunk)]
        return torch.cat([d[0] for d in drawn]), torch.cat([d[1] for d in drawn])


# ----------------------------------------------------------------------------------------------------------
# The task stream: merging over time (Dziadzio et al. 2025), carved from the synthetic world

Concept = namedtuple("Concept", "color shape")  # a class of the stream: attribute indices
STREAM_BASE_COLORS = ("red", "blue")  # what the base world shows; the other five colours are the stream's


def concept_name(concept):
    return f"{COLORS[concept.color]} {SHAPES[concept.shape]}"


def concept_prompt(concept):
    """The class's zero-shot text prompt, as CLIP's "a photo of a {class}": "an orange circle"."""
    return _a(concept_name(concept))


def _stream_split(concept, obj, background):
    """"train" or "test" for a single-object scene, by a hash of what its image shows to within a pixel: the
    concept, cell, size, the object's offset in 1/64ths of the image side and the background level (crc32
    mod 5: 0 → test). So no test image is ever a training image, of any task, while every concept is tested
    in every cell and size. (Holding whole (cell, size) layouts out per concept, as the world's split does,
    backfires here: with 8 layouts a concept the model learns "at this cell and size, not that shape".)"""
    key = (f"{concept.color} {concept.shape} {obj.cell} {obj.size} {round(64 * obj.dx)} {round(64 * obj.dy)} "
           f"{background}")
    return "test" if zlib.crc32(key.encode()) % 5 == 0 else "train"


class ConceptScenes(Dataset):
    """Single-object scenes of `concepts` (balanced: sample i shows concepts[i % n]) of one split.

    Samples {"image", "text"}: the text names the object as the world's captions do, "a [small|large] orange
    circle" (FoMo-in-Flux trains its classification data on "a photo of a {class}" captions), through ITC. Zero-shot classification scores the dataset:
    `prompts` (one per class of `label_space`) and `labels` (sample i's index in label_space). A scene's
    randomness is seeded by its concept and index, so a concept shows the same scenes in whatever task or
    ordering it lands."""

    def __init__(self, seed, image_size, concepts, split, per_concept, label_space):
        self.seed, self.image_size, self.split = seed, image_size, split
        self.concepts, self.per_concept, self.label_space = list(concepts), per_concept, list(label_space)

    def __len__(self):
        return len(self.concepts) * self.per_concept

    def spec(self, i):
        """(concept, the one object, scene, caption) of sample i, without pixels."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} of {len(self)}")
        concept = self.concepts[i % len(self.concepts)]
        rng = random.Random(f"{self.seed}/stream/{concept_name(concept)}/{self.split}/{i // len(self.concepts)}")
        while True:  # redrawn until the scene hashes to this split (1.25 draws for train, 5 for test)
            obj = _place(rng, rng.randrange(4), shape=concept.shape, color=concept.color)
            scene = _scene(rng, [obj])
            if _stream_split(concept, obj, scene.background) == self.split:
                return concept, obj, scene, _describe(rng, obj)[0]

    def __getitem__(self, i):
        _, _, scene, caption = self.spec(i)
        return {"image": render([scene], self.image_size)[0][0], "text": caption}

    @property
    def prompts(self):
        return [concept_prompt(c) for c in self.label_space]

    @property
    def labels(self):
        return [self.label_space.index(self.concepts[i % len(self.concepts)]) for i in range(len(self))]


class Mixture(Dataset):
    """Equal shares of several datasets, interleaved by index: sample i is sources[i % k][(i // k) % len].

    So a shuffled batch holds 1/k of each source in expectation, and an epoch is k × the longest source
    (shorter sources repeat). This is the replay mixture of FoMo-in-Flux: base pre-training data, the current
    task and a buffer of every previous task, ⅓ each (0.33 / 0.34 / 0.33 there)."""

    def __init__(self, sources):
        self.sources = [s for s in sources if s is not None and len(s)]
        if not self.sources:
            raise ValueError("Mixture needs at least one non-empty dataset")

    def __len__(self):
        return len(self.sources) * max(len(s) for s in self.sources)

    def __getitem__(self, i):
        source = self.sources[i % len(self.sources)]
        return source[(i // len(self.sources)) % len(source)]


def replay_mixture(base, current, previous):
    """Base pre-training data, the current task, and every previous task (ConcatDataset) in equal shares.

    A missing part (no base data for real files, no previous task at t = 1) drops out of the mixture."""
    buffer = torch.utils.data.ConcatDataset(previous) if previous else None
    return Mixture([base, current, buffer])


def _order_random(concepts, rng):
    return rng.sample(concepts, len(concepts))


def _order_domain(concepts, rng):
    """Grouped by colour (a colour is a domain), colours in a seeded order: task k teaches mostly one colour."""
    colors = rng.sample(sorted({c.color for c in concepts}), len({c.color for c in concepts}))
    return sorted(concepts, key=lambda c: (colors.index(c.color), c.shape))


ORDERS = {"random": _order_random, "domain": _order_domain}


@dataclass
class TaskStream:
    """T tasks of concepts the base model lacks, and a retention set of concepts it knows.

    A class is a (colour, shape) concept: 7 × 5 = 35. The base world (`world`, pre-training data and replay)
    draws only `base_colors`; the stream's concepts are the other colours × every shape (5 × 5 = 25 with the
    defaults), cut in `order` into `num_tasks` tasks of disjoint classes. Each task's train / test scenes are
    single-object ConceptScenes; no test image is ever a training image (`_stream_split`).

    Scoring is zero-shot classification through ITC, as CLIP: a task's test scene is classified among the
    prompts of *every* stream concept (25-way), the retention set's among the base concepts (10-way). One
    label space for the whole stream, as FoMo-in-Flux scores a dataset over all its classes, whether streamed
    yet or not: with a task's own classes only, a base model could tell classes of different shapes apart
    without knowing their colour, and the task would not need the concept it is meant to teach.
    """

    seed: int = 0
    image_size: int = 32
    num_tasks: int = 5
    order: str = "random"
    base_colors: tuple = STREAM_BASE_COLORS
    test_per_concept: int = 20
    train_per_concept: int = 10_000  # drawn lazily: a bound on distinct scenes, not a cost
    base_train_size: int = 20_000

    def __post_init__(self):
        if self.order not in ORDERS:
            raise ValueError(f"stream order {self.order!r}: choose one of {tuple(ORDERS)}")
        self.world = SyntheticWorld(seed=self.seed, image_size=self.image_size, train_size=self.base_train_size,
                                    colors=tuple(self.base_colors))
        if not 1 <= self.num_tasks <= len(self.new_concepts):
            raise ValueError(f"num_tasks {self.num_tasks}: the stream has {len(self.new_concepts)} concepts")

    @property
    def known_concepts(self):
        return [Concept(c, s) for c in self.world.palette for s in range(len(SHAPES))]

    @property
    def new_concepts(self):
        return [Concept(c, s) for c in range(len(COLORS)) if c not in self.world.palette for s in range(len(SHAPES))]

    @functools.cached_property
    def tasks(self):
        """The concepts of each task, in stream order: T chunks (sizes differing by at most one)."""
        ordered = ORDERS[self.order](self.new_concepts, random.Random(f"{self.seed}/order/{self.order}"))
        n, t = len(ordered), self.num_tasks
        return [ordered[k * n // t:(k + 1) * n // t] for k in range(t)]

    def task(self, t, split):
        """Task t's (0-based) scenes."""
        per = self.train_per_concept if split == "train" else self.test_per_concept
        return ConceptScenes(self.seed, self.image_size, self.tasks[t], split, per, self.new_concepts)

    def retention(self):
        return ConceptScenes(self.seed, self.image_size, self.known_concepts, "test", self.test_per_concept,
                             self.known_concepts)

    def base_data(self):
        """Pre-training data of the base model, and the replay's base share: the base world's captions (2–3
        objects of the base colours) and, in equal parts, single-object scenes of the base concepts in their
        training split (the retention set's concepts, as web data holds pictures of ImageNet's classes)."""
        known = ConceptScenes(self.seed, self.image_size, self.known_concepts, "train", self.train_per_concept,
                              self.known_concepts)
        return Mixture([self.world.dataset("pretrain", "train"), known])

    def task_names(self):
        return [", ".join(concept_name(c) for c in concepts) for concepts in self.tasks]


def retrieval_jsonl(path, image_root):
    """An image–text JSON-lines file (load_image_text_jsonl) as a retrieval split: captions of the same image
    file share its image_id. Scored by recall, as the stream's real-file form is."""
    records = load_image_text_jsonl(path, image_root).records
    ids = {}
    return ImageTextDataset([{**r, "image_id": ids.setdefault(r["image"], len(ids))} for r in records])


# ----------------------------------------------------------------------------------------------------------
# Real-format loaders

IMAGE_KEYS = ("image", "image2")


def read_image(path):
    """An image file as uint8 (3,H,W) RGB (grayscale, palette and alpha are converted); errors name the file."""
    try:
        with Image.open(path) as image:
            return TF.pil_to_tensor(image.convert("RGB"))
    except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for missing or broken files
        raise ValueError(f"{path}: cannot read image ({error})") from error


class FileDataset(Dataset):
    """Sample records whose image fields hold paths; images are read when the sample is asked for."""

    def __init__(self, records):
        self.records = records

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        return {key: read_image(value) if key in IMAGE_KEYS else value for key, value in self.records[i].items()}


class ImageTextDataset(FileDataset):
    """One sample per caption; `image_id` is the index of the caption's image in `images`.

    Retrieval evaluation uses `images` (a LazyImages), `captions` and `caption_image`, as for the
    synthetic world's retrieval split.
    """

    def __init__(self, records):
        super().__init__(records)
        paths = {}
        for record in records:
            paths.setdefault(record["image_id"], record["image"])
        self.image_paths = [paths[j] for j in range(len(paths))]
        self.captions = [record["text"] for record in records]
        self.caption_image = [record["image_id"] for record in records]

    @property
    def images(self):
        return LazyImages(len(self.image_paths), lambda indices: [read_image(self.image_paths[j]) for j in indices])


class VQADataset(FileDataset):
    """VQA samples; the soft target over `answers` is kept sparse until a sample is read."""

    def __init__(self, records, answers):
        super().__init__(records)
        self.answers = answers

    def __getitem__(self, i):
        sample = super().__getitem__(i)
        if "scores" in sample:
            sample["target"] = _dense_target(sample.pop("scores"), len(self.answers))
        return sample


class _BadRecord(ValueError):
    """What is wrong with one record; the loader adds where it is."""


class _Reporter:
    """Raises on the first bad record, or with skip_bad counts them and warns once (`finish`)."""

    def __init__(self, source, skip_bad):
        self.source, self.skip_bad, self.skipped, self.first = source, skip_bad, 0, None

    def __call__(self, where, what):
        message = f"{where}: {what}"
        if not self.skip_bad:
            raise ValueError(message)
        self.skipped += 1
        self.first = self.first or message

    def finish(self, records):
        if self.skipped:
            warnings.warn(f"{self.source}: skipped {self.skipped} bad record(s); the first: {self.first}",
                          stacklevel=3)
        if not records:
            raise ValueError(f"{self.source}: no usable records")
        return records


def _get(record, name, kind=str):
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise _BadRecord(f"missing field {name!r}")
    if not isinstance(record[name], kind):
        raise _BadRecord(f"field {name!r} should be {kind.__name__}, got {type(record[name]).__name__}")
    return record[name]


def _text(record, name):
    text = _get(record, name)
    if not text.strip():
        raise _BadRecord(f"empty {name!r}")
    return text


def _image_path(root, name):
    path = Path(root) / name
    if not path.is_file():
        raise _BadRecord(f"image file {path} not found")
    return path


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as file:
            return json.load(file)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} line {error.lineno}: malformed JSON ({error.msg})") from error


def _top_list(data, name, path):
    if not isinstance(data, dict) or not isinstance(data.get(name), list):
        raise ValueError(f"{path}: expected a JSON object with a list {name!r}")
    return data[name]


def _jsonl_records(path, report):
    """(where, record) for each non-blank line of a JSON-lines file."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as error:
                report(where, f"malformed JSON ({error.msg})")


def load_image_text_jsonl(path, image_root, skip_bad=False):
    """Image–caption pairs, one JSON object a line: {"image": path under image_root, "caption": text}
    (CC, SBU, VG exports). Samples {"image", "text"}."""
    report, records = _Reporter(path, skip_bad), []
    for where, line in _jsonl_records(path, report):
        try:
            records.append({"image": _image_path(image_root, _get(line, "image")), "text": _text(line, "caption")})
        except _BadRecord as error:
            report(where, error)
    return FileDataset(report.finish(records))


def load_karpathy(json_path, image_root, split, skip_bad=False):
    """COCO / Flickr30k in Karpathy's JSON: images[] with filepath (optional), filename, split, sentences[].raw.

    One sample {"image", "text", "image_id"} per sentence of the images in `split` ("train" includes
    "restval", as usual); an ImageTextDataset, so also a retrieval split.
    """
    wanted = {"train", "restval"} if split == "train" else {split}
    report, records, image_ids = _Reporter(json_path, skip_bad), [], {}
    for i, entry in enumerate(_top_list(_read_json(json_path), "images", json_path)):
        where = f"{json_path} images[{i}]"
        try:
            if _get(entry, "split") not in wanted:
                continue
            where += f" ({_get(entry, 'filename')})"
            path = _image_path(image_root, Path(str(entry.get("filepath", ""))) / entry["filename"])
            sentences = _get(entry, "sentences", list)
            if not sentences:
                raise _BadRecord("no sentences")
        except _BadRecord as error:
            report(where, error)
            continue
        for k, sentence in enumerate(sentences):
            try:
                caption = _text(sentence, "raw")
            except _BadRecord as error:
                report(f"{where} sentences[{k}]", error)
                continue
            image_id = image_ids.setdefault(path, len(image_ids))
            records.append({"image": path, "text": caption, "image_id": image_id})
    return ImageTextDataset(report.finish(records))


def _top_answers(annotations, top_k):
    """The top_k most frequent multiple-choice answers (ties alphabetical, so the list is deterministic)."""
    counts = Counter(a["multiple_choice_answer"] for a in annotations
                     if isinstance(a, dict) and isinstance(a.get("multiple_choice_answer"), str))
    return sorted(counts, key=lambda a: (-counts[a], a))[:top_k]


def _vqa_annotations(path):
    """question_id → annotation (one without a question_id is reported by its question, as unannotated)."""
    listed = _top_list(_read_json(path), "annotations", path)
    return {a["question_id"]: a for a in listed if isinstance(a, dict) and "question_id" in a}


def _vqa_answers(annotation, index):
    given = [_get(a, "answer") for a in _get(annotation, "answers", list)]
    if not given:
        raise _BadRecord("no annotator answers")
    # targets count the annotators after the official normalization (as ViLT); answers outside the vocabulary
    # cannot be predicted and get no target, but the question stays: evaluation scores it on `answers`
    scores = vqa_scores(normalize_answer(a) for a in given)
    return {"answers": given, "scores": {index[a]: s for a, s in scores.items() if a in index}}


def load_vqa(questions_json, annotations_json, image_root, answers=None, top_k=3129,
             image_pattern="COCO_{subtype}_{image_id:012d}.jpg", skip_bad=False):
    """VQA v2: questions[] (question_id, image_id, question) and annotations[] (question_id, answers[].answer,
    multiple_choice_answer).

    Samples {"image", "text", "question_id", "answers" (the humans' answers as written), "target"}; target =
    soft scores (`vqa_scores`) over `answers`. `answers`: the answer vocabulary; None builds the top_k
    multiple-choice answers of these annotations (do that on train and pass `dataset.answers` to val). Every
    question is kept, also one whose human answers all lie outside the vocabulary: its target is zero and
    `vqa_accuracy` scores whatever is predicted for it, as the official evaluation does.
    `annotations_json=None` (test-dev) gives samples without answers. Image file names follow
    `image_pattern`, formatted with image_id and subtype (the questions file's "data_subtype", e.g. train2014).
    """
    questions_file = _read_json(questions_json)
    questions = _top_list(questions_file, "questions", questions_json)
    subtype = str(questions_file.get("data_subtype", ""))
    report = _Reporter(questions_json, skip_bad)
    annotations = None if annotations_json is None else _vqa_annotations(annotations_json)
    if answers is None and annotations is None:
        raise ValueError("load_vqa: pass `answers` when there are no annotations to build them from")
    answers = list(answers) if answers is not None else _top_answers(annotations.values(), top_k)
    index = {a: i for i, a in enumerate(answers)}
    exists = functools.cache(_image_path)  # many questions share an image
    records = []
    for k, question in enumerate(questions):
        where = f"{questions_json} questions[{k}]"
        try:
            question_id = _get(question, "question_id", int)
            where = f"{questions_json} question_id {question_id}"
            path = exists(image_root, image_pattern.format(subtype=subtype, image_id=_get(question, "image_id", int)))
            record = {"image": path, "text": _text(question, "question"), "question_id": question_id}
            if annotations is not None:
                where = f"{annotations_json} question_id {question_id}"
                if question_id not in annotations:
                    raise _BadRecord("no annotation for this question")
                record.update(_vqa_answers(annotations[question_id], index))
        except _BadRecord as error:
            report(where, error)
            continue
        records.append(record)
    return VQADataset(report.finish(records), answers)


def _nlvr2_images(line, identifier):
    """Explicit "left"/"right", or NLVR2's naming: <split>-<set>-<pair>-<sentence> → <split>-<set>-<pair>-img0.png
    and -img1.png."""
    if "left" in line or "right" in line:
        return _get(line, "left"), _get(line, "right")
    parts = identifier.split("-")
    if len(parts) != 4:
        raise _BadRecord(f"identifier {identifier!r} is not <split>-<set>-<pair>-<sentence>")
    stem = "-".join(parts[:3])
    return f"{stem}-img0.png", f"{stem}-img1.png"


def _nlvr2_label(line):
    label = line.get("label")
    if "label" not in line:
        raise _BadRecord("missing field 'label'")
    if isinstance(label, bool):
        return int(label)
    if isinstance(label, str) and label.lower() in ("true", "false"):
        return int(label.lower() == "true")
    raise _BadRecord(f"label {label!r} is not 'True' or 'False'")


def load_nlvr2(jsonl_path, image_root, skip_bad=False):
    """NLVR2 JSON lines (identifier, sentence, label "True"/"False", optional directory / left / right).

    Samples {"image" (left), "image2" (right), "text", "label" (1 = true)}; images live under
    image_root[/directory].
    """
    report, records = _Reporter(jsonl_path, skip_bad), []
    for where, line in _jsonl_records(jsonl_path, report):
        try:
            identifier = _get(line, "identifier")
            where = f"{where} ({identifier})"
            folder = Path(image_root) / str(line.get("directory", ""))
            left, right = _nlvr2_images(line, identifier)
            records.append({"image": _image_path(folder, left), "image2": _image_path(folder, right),
                            "text": _text(line, "sentence"), "label": _nlvr2_label(line)})
        except _BadRecord as error:
            report(where, error)
    return FileDataset(report.finish(records))


def load_image_folder(root, classes=None):
    """ImageNet-style folders, ROOT/<class>/<image>: torchvision's ImageFolder finds the classes (sorted
    folder names) and the image files; samples {"image", "label"}, images read lazily as for every loader.

    `classes`: the training split's class names, which a validation folder must have too (same indices)."""
    from torchvision.datasets import ImageFolder
    if not Path(root).is_dir():
        raise FileNotFoundError(f"{root}: no such folder (expected ROOT/train/<class>/* and ROOT/val/<class>/*)")
    try:
        folder = ImageFolder(root, loader=str)  # the loader is never called: read_image reads the files
    except FileNotFoundError as error:
        raise ValueError(f"{root}: {error}") from None
    if classes is not None and folder.classes != list(classes):  # both sorted: the sets differ
        differing = sorted(set(classes) ^ set(folder.classes))
        raise ValueError(f"{root}: {len(folder.classes)} class folders vs training's {len(classes)}; "
                         f"{differing[0]!r} is in one only")
    dataset = FileDataset([{"image": Path(path), "label": label} for path, label in folder.samples])
    dataset.classes = folder.classes
    return dataset


ADE20K_CLASSES = 150  # SceneParsing: labels 1..150 are classes, 0 is "other"
SEG_IGNORE = 255      # the target value that loss and mIoU skip (ADE20k's "other"; mmseg's reduce_zero_label)


class SegmentationDataset(FileDataset):
    """Image + label map pairs; a map reads as (H,W) long with label k -> class k - 1 and 0 -> SEG_IGNORE."""

    def __getitem__(self, i):
        record = self.records[i]
        image, labels = read_image(record["image"]), read_label_map(record["mask"])
        if tuple(labels.shape) != tuple(image.shape[1:]):
            raise ValueError(f"{record['mask']}: label map {tuple(labels.shape)} vs image {tuple(image.shape[1:])}")
        if labels.max() > ADE20K_CLASSES:
            raise ValueError(f"{record['mask']}: label {int(labels.max())} > {ADE20K_CLASSES}")
        return {"image": image, "mask": torch.where(labels == 0, SEG_IGNORE, labels - 1)}


def read_label_map(path):
    """A PNG of class indices (mode L or P: the index is the pixel value, not a colour) as (H,W) long."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P"):
                raise ValueError(f"mode {image.mode}, not an 8-bit index map")
            return TF.pil_to_tensor(image)[0].long()
    except (OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"{path}: cannot read label map ({error})") from error


def load_ade20k(root, split):
    """ADE20k SceneParsing: ROOT/images/<split>/*.jpg with ROOT/annotations/<split>/*.png of the same stem
    (split: "training" or "validation"). Samples {"image", "mask"}; 150 classes, "other" ignored."""
    images, labels = Path(root) / "images" / split, Path(root) / "annotations" / split
    for folder in (images, labels):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder (ADE20k layout: ROOT/images/{split}, "
                                    f"ROOT/annotations/{split})")
    report, records = _Reporter(images, False), []
    for path in sorted(images.glob("*.jpg")):
        if not (labels / f"{path.stem}.png").is_file():
            report(path, f"no label map {labels / (path.stem + '.png')}")
        records.append({"image": path, "mask": labels / f"{path.stem}.png"})
    return SegmentationDataset(report.finish(records))


# ----------------------------------------------------------------------------------------------------------
# VQA v2's official accuracy (the VQA API's evaluation script, re-implemented from its rules)

# Facts of the official script: the punctuation it strips, number words it maps to digits, the articles it
# drops, and its contraction table. Each contraction is listed once, written out; the script maps the forms
# with exactly one apostrophe left out to it ("dont" -> "don't", "couldnt've" and "couldn'tve" ->
# "couldn't've"). Its I-forms ("Im", "Ive", ...) are keyed in capitals and never match lowercased text, so
# they are not listed; "she's" and "let's" only map to themselves.
_VQA_PUNCTUATION = ';/[]"{}()=+\\_->@`,?!<'
_VQA_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_VQA_NUMBERS["none"] = "0"
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_CONTRACTED = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
    "isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't should've "
    "shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's there'd "
    "there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all "
    "you'd you'll you're you've couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've "
    "somebody'd've someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've y'all'll "
    "y'all'd've you'd've 'ow's'at").split()
_VQA_CONTRACTIONS = {form[:i] + form[i + 1:]: form for form in _VQA_CONTRACTED
                     for i, char in enumerate(form) if char == "'"}
_VQA_CONTRACTIONS["somebody'd"] = "somebodyd"  # the script's table has this one backwards; kept, to agree with it
_DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")


def _vqa_punctuation(text):
    """The script's processPunctuation: a mark next to a space (or any mark in a text with a digit,digit) is
    deleted, any other becomes a space; then every period not followed by a digit goes."""
    out = text  # the tests look at the text as given, the replacements at the text so far (as the script)
    for mark in _VQA_PUNCTUATION:
        gone = mark + " " in text or " " + mark in text or _DIGIT_COMMA_DIGIT.search(text) is not None
        out = out.replace(mark, "" if gone else " ")
    return _PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_answer(answer):
    """A predicted answer as the official script compares it: whitespace, punctuation, lowercase, number
    words -> digits, articles dropped, contractions restored ("Two dogs." -> "2 dogs", "dont" -> "don't")."""
    text = _vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_VQA_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_VQA_CONTRACTIONS.get(w, w) for w in words if w not in _VQA_ARTICLES)


def vqa_accuracy(prediction: str, human_answers: list) -> float:
    """VQA accuracy of one predicted answer against the (10) human answers, in [0, 1].

        acc = mean over annotators j of min(1, #{k ≠ j : answer_k = prediction} / 3)

    i.e. min(1, #matches / 3) averaged over the leave-one-out subsets: 0, 0.3, 0.6, 0.9, 1 for 0, 1, 2, 3, ≥4
    matching humans out of 10. As in the official script the prediction is fully normalized
    (`normalize_answer`) while the human answers only lose punctuation, and only when they are not all
    the same (the released answers are already normalized otherwise).
    """
    if not human_answers:
        raise ValueError("vqa_accuracy: no human answers to score against")
    prediction = normalize_answer(prediction)
    humans = [a.replace("\n", " ").replace("\t", " ").strip() for a in human_answers]
    if len(set(humans)) > 1:
        humans = [_vqa_punctuation(a) for a in humans]
    matches = sum(a == prediction for a in humans)
    # leaving out a matching annotator leaves matches - 1, any other leaves matches
    return sum(min(1.0, (matches - (a == prediction)) / 3) for a in humans) / len(humans)


# ----------------------------------------------------------------------------------------------------------
# Collate and load

_STACKED = {"target": torch.float32, "label": torch.long, "image_id": torch.long, "question_id": torch.long}


class Collator:
    """Samples → batch: images (resized, RandAugment on train, normalized), BERT ids and MLM inputs, task fields.

    Batch keys, each present when the samples carry what it comes from: `images` (B,3,H,W) float,
    `images2`, `input_ids` / `attention_mask` / `mlm_input_ids` / `mlm_labels` (B,max_len) long, `target`
    (B,A) float, `label` (B,), `image_id` (B,), `question_id` (B,), `mask` (B,H,W) long, and in evaluation
    batches (train=False) `answers`, a list of B lists of human answers (strings).

    Randomness. MLM masking keeps no state: each batch gets a fresh torch.Generator seeded from `seed`
    (None counts as 0) and a hash of the batch's token ids. So the masks are a function of the batch
    alone — the same whatever the DataLoader workers, the rank or a resume from a checkpoint — while a
    sample still gets new masks each epoch, as it lands in another batch. RandAugment (torchvision) draws
    from torch's global RNG, which DataLoader seeds per worker from the loader's generator (train.batch_stream
    seeds it per rank and epoch). Segmentation samples are not RandAugmented: its geometric ops would move the image away from
    the mask.
    """

    def __init__(self, tokenizer, max_len=40, mlm_prob=0.15, image_size=None, train=False, randaugment=True,
                 mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), seed=None):
        self.tokenizer, self.max_len, self.mlm_prob = tokenizer, max_len, mlm_prob
        self.image_size, self.seed, self.train = image_size, seed, train
        self.truncated = 0  # texts cut to max_len so far (see _count_truncated)
        self.augment = v2.RandAugment() if train and randaugment else None
        self.mean, self.std = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
        self.special_ids = torch.tensor(sorted(tokenizer.special_ids))
        # random replacements are ordinary tokens: not special, not BERT's [unused..] placeholders
        self.random_ids = torch.tensor(sorted(i for t, i in tokenizer.vocab.items()
                                              if not (t.startswith("[") and t.endswith("]"))))

    def __call__(self, samples):
        keys = set(samples[0])
        for i, sample in enumerate(samples):
            if set(sample) != keys:
                raise ValueError(f"batch sample {i} has fields {sorted(sample)}, sample 0 has {sorted(keys)}")
        batch = {}
        for key, name in (("image", "images"), ("image2", "images2")):
            if key in keys:
                batch[name] = self.images([s[key] for s in samples], augment="mask" not in keys)
        if "text" in keys:
            batch.update(self.text([s["text"] for s in samples]))
        for key, dtype in _STACKED.items():
            if key in keys:
                batch[key] = torch.stack([torch.as_tensor(s[key], dtype=dtype) for s in samples])
        if "mask" in keys:
            batch["mask"] = torch.stack([self._resize_mask(s["mask"]) for s in samples])
        if "answers" in keys and not self.train:  # the humans' answers, as written: what VQA accuracy scores
            batch["answers"] = [list(s["answers"]) for s in samples]
        return batch

    def images(self, images, augment=True):
        """(B,3,H,W) float: resize, RandAugment (train) on uint8, then (x − mean) / std."""
        out = []
        for image in images:
            if self.image_size and tuple(image.shape[-2:]) != (self.image_size, self.image_size):
                image = TF.resize(image, [self.image_size, self.image_size], antialias=True)
            if self.augment is not None and augment:
                image = self.augment(image)
            out.append(TF.to_dtype(image, torch.float32, scale=True))
        if len({tuple(i.shape) for i in out}) > 1:
            raise ValueError(f"images of sizes {sorted({tuple(i.shape) for i in out})} in one batch: "
                             "give Collator an image_size")
        return (torch.stack(out) - self.mean) / self.std

    def _resize_mask(self, mask):
        """Nearest-neighbour resize of a class map (pixel centres), so classes stay exact."""
        size = self.image_size
        if not size or tuple(mask.shape) == (size, size):
            return mask.long()
        rows = ((torch.arange(size) + 0.5) * mask.shape[0] / size).long()
        columns = ((torch.arange(size) + 0.5) * mask.shape[1] / size).long()
        return mask[rows][:, columns].long()

    def texts(self, texts):
        """Token ids and attention masks, (B, max_len) long each; counts the texts cut to fit (`truncated`)."""
        tokenized = [self.tokenizer.tokenize(t) for t in texts]
        self._count_truncated(tokenized)
        ids, attention = zip(*(self.tokenizer.encode_tokens(t, self.max_len) for t in tokenized))
        return torch.stack(ids), torch.stack(attention)

    def _count_truncated(self, tokenized):
        """Cutting text loses words silently (a caption loses an object): warn once per Collator (per DataLoader
        worker, each holding its own copy), with the count so far; `truncated` keeps counting."""
        longest = max(map(len, tokenized), default=0)
        cut = sum(len(t) > self.max_len - 2 for t in tokenized)
        if cut and not self.truncated:
            warnings.warn(f"Collator: {cut} text(s) cut to max_len {self.max_len} so far (one had {longest + 2} "
                          f"tokens with [CLS] and [SEP]); raise max_len to keep every word", stacklevel=3)
        self.truncated += cut

    def text(self, texts):
        """The batch's text fields: clean ids and mask, and their MLM-corrupted copy with labels."""
        input_ids, attention_mask = self.texts(texts)  # (B, L)
        mlm_input_ids, mlm_labels = self.mask_tokens(input_ids, attention_mask)
        return {"input_ids": input_ids, "attention_mask": attention_mask,
                "mlm_input_ids": mlm_input_ids, "mlm_labels": mlm_labels}

    def mask_tokens(self, input_ids, attention_mask):
        """BERT's MLM corruption: choose mlm_prob of the real, non-special tokens; of those 80% → [MASK],
        10% → a random ordinary token, 10% kept. Labels are the original ids there, −100 elsewhere."""
        generator = self._rng(input_ids)
        eligible = attention_mask.bool() & ~torch.isin(input_ids, self.special_ids)
        chosen = eligible & (torch.rand(input_ids.shape, generator=generator) < self.mlm_prob)
        labels = torch.where(chosen, input_ids, -100)
        roll = torch.rand(input_ids.shape, generator=generator)  # one draw splits chosen tokens 80 / 10 / 10
        random_tokens = self.random_ids[torch.randint(len(self.random_ids), input_ids.shape, generator=generator)]
        corrupted = torch.where(chosen & (roll < 0.8), self.tokenizer.mask_id, input_ids)
        corrupted = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_tokens, corrupted)
        return corrupted, labels

    def _rng(self, input_ids):
        """A generator seeded by the batch itself (token and position), so masking needs no state."""
        flat = input_ids.flatten()
        batch_hash = int(_hash31(flat * 1_000_003 + torch.arange(len(flat))).sum())
        return torch.Generator().manual_seed((batch_hash * 1_000_003 + (self.seed or 0)) % 2**63)
