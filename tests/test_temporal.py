"""Merging over time: the task stream (data.TaskStream), its metrics, and `vlmerge.py temporal` end to end.

The smoke grid runs once per module (a fixture); its cached base θ_0 (OUT/base/ckpt.pt) serves the t = 0 test.
"""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import merge
import train
import vlmerge
from conftest import ROOT
from model import build_model

T = vlmerge.TEMPORAL_PRESETS["smoke"].num_tasks


def cli(*argv, timeout=600):
    # one thread: the grid's models are tiny, and on a shared 2-core machine OpenMP threads mostly wait on each other
    return subprocess.run([sys.executable, "vlmerge.py", *map(str, argv)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.fixture(scope="module")
def smoke_grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("temporal") / "smoke"
    result = cli("temporal", "--preset", "smoke", "--grid", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# --- the stream ----------------------------------------------------------------------------------

@pytest.mark.parametrize("order", list(data.ORDERS))
def test_tasks_partition_the_held_out_concepts_into_disjoint_classes(order):
    stream = data.TaskStream(order=order)
    tasks = [set(concepts) for concepts in stream.tasks]
    assert len(tasks) == 5 and all(len(t) == 5 for t in tasks)
    assert sum(len(t) for t in tasks) == len(set().union(*tasks))  # pairwise disjoint
    held_out = {c for c in range(len(data.COLORS)) if data.COLORS[c] not in data.STREAM_BASE_COLORS}
    assert set().union(*tasks) == {data.Concept(c, s) for c in held_out for s in range(len(data.SHAPES))}
    assert not set().union(*tasks) & set(stream.known_concepts)


def test_orderings_are_seeded_and_domain_groups_by_colour():
    assert data.TaskStream(seed=3).tasks == data.TaskStream(seed=3).tasks
    assert data.TaskStream(seed=3).tasks != data.TaskStream(seed=4).tasks
    domain = data.TaskStream(order="domain").tasks
    assert all(len({c.color for c in task}) == 1 for task in domain)  # 5 colours, 5 tasks: one colour each
    with pytest.raises(ValueError, match="stream order 'sorted'"):
        data.TaskStream(order="sorted")


def scenes(dataset, n):
    """What the first n images show, to within a pixel (the identity _stream_split hashes)."""
    return {(concept, obj.cell, obj.size, round(64 * obj.dx), round(64 * obj.dy), scene.background)
            for concept, obj, scene, _ in map(dataset.spec, range(n))}


def test_no_test_scene_is_in_any_training_split():
    stream = data.TaskStream(test_per_concept=20)
    trained = set().union(*(scenes(stream.task(t, "train"), 2000) for t in range(stream.num_tasks)))
    tested = set().union(*(scenes(stream.task(t, "test"), 100) for t in range(stream.num_tasks)))
    assert len(trained) > 9000 and len(tested) > 450 and not trained & tested
    # every concept is tested, in every cell
    assert {(c, cell) for c, cell, *_ in tested} == {(c, cell) for c in stream.new_concepts for cell in range(4)}
    # the retention set's scenes are not in the base data's single-object scenes either
    base_scenes = stream.base_data().sources[1]
    assert not scenes(base_scenes, 2000) & scenes(stream.retention(), len(stream.retention()))


def test_base_world_draws_only_the_base_colours_but_knows_every_word():
    stream = data.TaskStream()
    world_captions = stream.world.dataset("pretrain", "train")
    colours = {data.COLORS[o.color] for j in range(200) for o in world_captions.scene_spec(j)["scenes"][0].objects}
    assert colours == set(data.STREAM_BASE_COLORS)
    assert all(c in stream.world.tokenizer().vocab for c in data.COLORS)
    with pytest.raises(ValueError, match="only pretrain / retrieval"):
        stream.world.dataset("vqa", "train")
    with pytest.raises(ValueError, match="'pink'"):
        data.SyntheticWorld(colors=("red", "pink"))


def test_concept_scenes_show_their_concept_and_prompt_it():
    stream = data.TaskStream()
    test = stream.task(2, "test")
    for i in (0, 7, 13):
        concept, obj, _, text = test.spec(i)
        assert (obj.color, obj.shape) == concept and data.concept_name(concept) in text
        assert test.prompts[test.labels[i]] == data.concept_prompt(concept)
    assert data.concept_prompt(data.Concept(data.COLORS.index("orange"), 0)) == "an orange circle"


def test_mixture_takes_equal_shares_by_index():
    a, b, c = list(range(3)), list(range(100, 110)), list(range(200, 205))
    mix = data.Mixture([a, b, c])
    assert len(mix) == 30
    samples = [mix[i] for i in range(len(mix))]
    assert samples[:6] == [0, 100, 200, 1, 101, 201]
    assert [sum(lo <= s < lo + 100 for s in samples) for lo in (0, 100, 200)] == [10, 10, 10]
    assert data.replay_mixture(a, b, []).sources == [a, b]  # t = 1: nothing to replay yet


# --- the numbers ---------------------------------------------------------------------------------

def test_step_metrics_follow_fomo_in_flux():
    rows = [{"tasks": [10.0, 20.0, 30.0], "retention": 40.0}, {"tasks": [70.0, 20.0, 0.0], "retention": 10.0}]
    m = vlmerge.step_metrics(rows)
    assert m["a_ka"] == [20.0, 30.0] and m["a_ka_seen"] == [None, 70.0] and m["a_zs"] == [40.0, 10.0]
    assert m["gm"] == [math.sqrt(20 * 40), math.sqrt(30 * 10)]
    assert m["matrix"] == [[10.0, 20.0, 30.0], [70.0, 20.0, 0.0]]


def test_zero_shot_accuracy_is_the_nearest_prompt():
    torch.manual_seed(0)
    model = build_model("vit_tiny", "maa", "retrieval", vocab_size=40, image_size=16, patch_size=8, depth=1,
                        fusion_layers=1, max_text_len=6)
    images, ids, mask = torch.randn(9, 3, 16, 16), torch.randint(5, 40, (4, 6)), torch.ones(4, 6, dtype=torch.long)
    with torch.no_grad():
        image = torch.nn.functional.normalize(model.itc_image_proj(model.encode_image(images)[:, 0]), dim=-1)
        text = torch.nn.functional.normalize(model.itc_text_proj(model.encode_text(ids, mask)[:, 0]), dim=-1)
    expected = (image @ text.T).argmax(1)
    assert torch.equal(train.zero_shot_predict(model, images, ids, mask, batch_size=4), expected)
    labels = expected.clone()
    labels[:3] = (labels[:3] + 1) % 4
    assert train.zero_shot_accuracy(model, images, labels, ids, mask) == pytest.approx(100 * 6 / 9)


def test_cells_that_start_experts_alike_share_one_chain():
    cells = vlmerge.grid_cells(vlmerge.TEMPORAL_PRESETS["smoke"])
    chains = {}
    for cell in cells:
        chains.setdefault(vlmerge.chain_key(cell), []).append(cell.name)
    assert sorted(chains.pop(None)) == ["base", "oracle", "oracle steps×0.5"]
    groups = sorted(sorted(names) for names in chains.values())
    assert groups == sorted(sorted(g) for g in [
        ["zs/ft", "zs/all", "zs/ema", "zs/all task_arithmetic", "zs/all ties", "zs/all dare", "zs/all magmax",
         "zs/all linear"],
        ["ft/ft", "ft/all", "ft/ema"], ["all/ft", "all/all", "all/ema"], ["ema/ft", "ema/all", "ema/ema"],
        ["ema/ema task_arithmetic"], ["ema/ema ties"], ["ema/ema dare"], ["ema/ema magmax"], ["paint"],
        ["zs/all no-replay"], ["ema/ema steps×0.5"]])


# --- the command ---------------------------------------------------------------------------------

GRID = ({f"{i}/{d}" for i in ("zs", "ft", "all", "ema") for d in ("ft", "all", "ema")}
        | {f"{cell} {t}" for cell in ("ema/ema", "zs/all") for t in ("task_arithmetic", "ties", "dare", "magmax")}
        | {"base", "paint", "oracle", "zs/all no-replay", "zs/all linear", "ema/ema steps×0.5", "oracle steps×0.5"})


def markdown_row(text, title, first):
    """The cells of the row starting with `first` in the table under heading `title`."""
    section = text.split(f"## {title}")[1].split("\n## ")[0]
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} under {title!r}")


def test_smoke_grid_writes_every_cell(smoke_grid):
    r = json.loads((smoke_grid / "temporal.json").read_text())
    md = (smoke_grid / "TEMPORAL.md").read_text()
    assert set(r["cells"]) == GRID
    for name in GRID:
        assert f"| {name} |" in md
        runs = r["cells"][name]["runs"]
        assert len(runs) == 1 and len(runs[0]["a_ka"]) == T + 1
    # a Markdown cell is the JSON's number at its key
    gm, std = r["cells"]["ema/ema"]["mean"]["gm"][-1], r["cells"]["ema/ema"]["std"]["gm"][-1]
    assert markdown_row(md, "Final step", "ema/ema")[4] == f"{gm:.1f} ± {std:.1f}"
    assert markdown_row(md, "Trajectories: A_ZS", "ft/ft")[2] == f"{r['cells']['ft/ft']['mean']['a_zs'][1]:.1f}"
    # every step's metrics follow from its scores: GM = √(A_KA·A_ZS), A_KA the mean of the matrix row
    run = r["cells"]["zs/all"]["runs"][0]
    for t in range(T + 1):
        assert run["a_ka"][t] == pytest.approx(sum(run["matrix"][t]) / T)
        assert run["gm"][t] == pytest.approx(math.sqrt(run["a_ka"][t] * run["a_zs"][t]))
    # the oracle is scored at the end only; every cell starts from the base model
    assert r["cells"]["oracle"]["runs"][0]["a_ka"][1:T] == [None] * (T - 1)
    assert {c["runs"][0]["a_ka"][0] for c in r["cells"].values()} == {r["cells"]["base"]["runs"][0]["a_ka"][0]}


def test_smoke_grid_findings_are_computed(smoke_grid):
    r = json.loads((smoke_grid / "temporal.json").read_text())
    findings = {f["id"]: f for f in r["findings"]}
    assert list(findings) == ["T1", "T2", "T3", "T4", "T5", "T6"]
    final = lambda name, metric: r["cells"][name]["mean"][metric][-1]  # noqa: E731
    assert findings["T1"]["same"] == (final("zs/all", "a_ka") < final("ft/ft", "a_ka"))
    assert findings["T2"]["same"] == (final("zs/all", "gm") > final("zs/all no-replay", "gm"))
    assert findings["T3"]["same"] == (final("zs/all linear", "a_ka") > final("zs/all", "a_ka"))
    assert f"{final('zs/all', 'a_ka'):.1f}" in findings["T1"]["ours"]
    assert "the paper's claims as summarized from its abstract" in (smoke_grid / "TEMPORAL.md").read_text()


def test_experts_are_trained_once_per_chain(smoke_grid):
    runs = [root for root, _, files in os.walk(smoke_grid / "seed0") if "log.jsonl" in files]
    assert len(runs) == 11 * T + 2  # 11 chains of T experts, and the two oracles
    assert not [root for root, _, files in os.walk(smoke_grid / "seed0") if "ckpt.pt" in files]


def test_base_scores_lower_on_the_stream_than_on_retention(smoke_grid):
    """The stream's concepts are new to θ_0: at t = 0 it knows the retention set's classes, not the tasks'."""
    preset = vlmerge.TEMPORAL_PRESETS["smoke"]
    args = vlmerge.build_parser().parse_args(["temporal", "--preset", "smoke", "--base",
                                              str(smoke_grid / "base" / "ckpt.pt")])
    stream = vlmerge.load_stream(args, preset)
    base = vlmerge.base_weights(args, preset, stream, str(smoke_grid))
    scores = vlmerge.TemporalRun(preset, stream, base, str(smoke_grid)).score(base["model"])
    a_ka, a_zs = sum(scores["tasks"]) / T, scores["retention"]
    assert a_zs >= 15 and a_zs >= a_ka + 10  # chance: 10% on retention (10 classes), 4% on the stream (25)
    r = json.loads((smoke_grid / "temporal.json").read_text())
    assert r["cells"]["base"]["runs"][0]["a_ka"][0] == pytest.approx(a_ka)
    assert r["cells"]["base"]["runs"][0]["a_zs"][0] == pytest.approx(a_zs)


# --- bad input -----------------------------------------------------------------------------------

def command(capsys, *argv):
    """vlmerge.py in this process: (exit status, stderr)."""
    try:
        vlmerge.main([*map(str, argv)])
        code = 0
    except SystemExit as exit:
        code = exit.code
    return code, capsys.readouterr().err


def maa_checkpoint(path, variant="maa"):
    torch.manual_seed(0)
    vocab = len(data.SyntheticWorld().tokenizer())
    model = build_model("vit_tiny", variant, "pretrain", vocab_size=vocab, image_size=32, patch_size=8, depth=2,
                        fusion_layers=1, max_text_len=24)
    train.save_checkpoint(path, {"model": model.state_dict(), "config": dataclasses.asdict(model.cfg),
                                 "arch": "vit_tiny", "variant": variant, "task": "pretrain", "step": 1})
    return path


def test_an_unknown_option_is_one_clear_error(capsys):
    code, err = command(capsys, "temporal", "--preset", "smoke", "--inti", "ema")
    assert code == 2 and "unrecognized arguments: --inti" in err
    code, err = command(capsys, "temporal", "--preset", "smoke", "--deploy", "zs")
    assert code == 2 and "--deploy: invalid choice: 'zs'" in err
    assert command(capsys, "temporal", "--preset", "smoke", "--seeds", "0") == (2, "error: --seeds 0: give at least 1\n")


def test_a_base_that_is_not_maa_is_refused(tmp_path, capsys):
    msa = maa_checkpoint(tmp_path / "msa.pt", variant="msa")
    code, err = command(capsys, "temporal", "--preset", "smoke", "--base", msa, "--out", tmp_path / "out")
    assert code == 2
    assert err.strip() == (f"error: --base {msa}: not a maa checkpoint (variant 'msa'); merging over time "
                           f"needs one set of weights: merge it first with `vlmerge.py merge`")


def stream_files(tmp_path, lines):
    """A stream of two tasks as JSON-lines (the first file's lines given), with images, tests and a vocab."""
    images = data.SyntheticWorld(image_size=32).generate(6)[0]
    for i, image in enumerate(images):
        data.Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
    good = [json.dumps({"image": f"{i % 6}.png", "caption": f"a {data.COLORS[i % 7]} circle"}) for i in range(40)]
    for name, content in (("t1.jsonl", lines or good), ("t2.jsonl", good), ("t1_test.jsonl", good),
                          ("t2_test.jsonl", good), ("r.jsonl", good)):
        (tmp_path / name).write_text("\n".join(content) + "\n")
    data.SyntheticWorld().tokenizer().save(tmp_path / "vocab.txt")
    return ["--stream", tmp_path / "t1.jsonl", tmp_path / "t2.jsonl", "--stream-test", tmp_path / "t1_test.jsonl",
            tmp_path / "t2_test.jsonl", "--retention", tmp_path / "r.jsonl", "--vocab", tmp_path / "vocab.txt",
            "--base", maa_checkpoint(tmp_path / "base.pt"), "--out", tmp_path / "out"]


def test_a_stream_file_that_does_not_exist_is_named(tmp_path, capsys):
    argv = stream_files(tmp_path, None)
    argv[2] = tmp_path / "missing.jsonl"
    code, err = command(capsys, "temporal", "--preset", "smoke", *argv)
    assert code == 2 and err.startswith("error:") and str(tmp_path / "missing.jsonl") in err


def test_a_bad_line_in_a_stream_file_is_named_by_file_and_line(tmp_path, capsys):
    argv = stream_files(tmp_path, ['{"image": "0.png", "caption": "a red circle"}', '{"image": "0.png"'])
    code, err = command(capsys, "temporal", "--preset", "smoke", *argv)
    assert code == 2
    assert err.strip() == f"error: {tmp_path / 't1.jsonl'} line 2: malformed JSON (Expecting ',' delimiter)"


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as cli(): tiny models, a shared machine
    yield
    torch.set_num_threads(threads)


def test_real_files_run_one_cell_scored_by_retrieval(tmp_path, capsys, one_thread):
    code, err = command(capsys, "temporal", "--preset", "smoke", "--init", "ft", "--deploy", "all",
                        *stream_files(tmp_path, None))
    assert code == 0, err[-2000:]
    r = json.loads((tmp_path / "out" / "temporal.json").read_text())
    assert set(r["cells"]) == {"base", "ft/all"} and r["stream"]["metric"] == "recall@5"
    assert r["stream"]["tasks"] == ["t1.jsonl", "t2.jsonl"]
    run = r["cells"]["ft/all"]["runs"][0]
    assert len(run["a_ka"]) == 3 and all(0 <= x <= 100 for x in run["a_ka"] + run["a_zs"])
