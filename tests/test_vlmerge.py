"""vlmerge.py: the recipe end to end (smoke preset), the report's numbers traceable to results.json,
the merge / distance / eval commands, the paper preset's dry run, and `bench --quick`."""
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest
import torch

import merge
import train
import vlmerge
from conftest import ROOT, fresh_python
from model import build_model, shared_key



def cli(*argv, timeout=300):
    return subprocess.run([sys.executable, "vlmerge.py", *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def msa_checkpoint(path, seed=0, variant="msa"):
    torch.manual_seed(seed)
    model = build_model("vit_tiny", variant, vocab_size=60, image_size=32, patch_size=8, depth=2, fusion_layers=1)
    with torch.no_grad():  # experts that differ, as after VL pre-training
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    checkpoint = {"model": model.state_dict(), "config": dataclasses.asdict(model.cfg), "arch": "vit_tiny",
                  "variant": variant, "task": "pretrain", "step": 1}
    train.save_checkpoint(path, checkpoint)
    return checkpoint


# --- the recipe ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("recipe") / "smoke")
    vlmerge.main(["recipe", "--preset", "smoke", "--out", out])
    return out


def numbers_in(obj):
    """Every number in a JSON value, as the report may print it."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from numbers_in(k)
            yield from numbers_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from numbers_in(v)
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield float(obj)
    elif isinstance(obj, str):
        for token in re.findall(r"-?\d+(?:\.\d+)?", obj):
            yield float(token)


def test_smoke_recipe_writes_report_and_results(smoke):
    report = open(os.path.join(smoke, "REPORT.md")).read()
    results = json.load(open(os.path.join(smoke, "results.json")))
    for heading in ("## Findings", "## Table 1", "## Fig. 3", "## Table 2", "## Table 3", "## Fig. 4", "## Table 5",
                    "## Seed-to-seed spread"):
        assert heading in report, heading
    # every stage left its output: the init ViT, pre-training, merges, zero-shot, fine-tuning, ablation
    for path in ("init_vit/vit.pt", "maa/ckpt.pt", "msa/ckpt.pt", "maa/ckpt_step3.pt", "msa_seed0.5/ckpt.pt",
                 "merged/msa~interpolation0.5.pt", "merged/msa_seed0.5~regmean1.0.pt",
                 "zero_shot/msa_seed0.5~modality_arithmetic1.0/metrics.json",
                 "finetune/vqa/maa/metrics.json", "finetune/seg/msa/metrics.json",
                 "custom_ln_seed0.5/ckpt.pt", "zero_shot_val/msa_seed0.5~regmean0.5/metrics.json",
                 f"finetune/vqa/custom_ffn_seed0.5~interpolation{results['selection']['interpolation']['value']}"
                 "/metrics.json"):
        assert os.path.exists(os.path.join(smoke, path)), path
    assert len(results["findings"]) >= 6
    assert set(results["table5"]["rows"]) == {"msa", "msa_seed0.5"}
    assert {task: s["n"] for task, s in results["spread"].items()} == {"vqa": 2, "retrieval": 2}
    assert os.path.exists(os.path.join(smoke, f"finetune/retrieval/{results['table']['ours']}_s1/metrics.json"))
    # ours is the merge chosen on val, and the report says which
    best = results["selection"]["best"]
    assert results["table"]["ours"] == best["name"] == f"msa_seed0.5~{best['method']}{best['value']}"
    assert best["val"] == max(results["models"][f"msa_seed0.5~{m}{v}"]["zero_shot_val"]["avg"]
                              for m, v in (("interpolation", 0.0), ("interpolation", 0.5), ("interpolation", 1.0),
                                           ("modality_arithmetic", 0.5), ("modality_arithmetic", 1.0),
                                           ("regmean", 0.5), ("regmean", 1.0)))
    assert f"{best['method']} {vlmerge.SWEEPS[best['method']][2]} = {best['value']}" in report
    # Table 5 on the weights and on the modality vectors τ, one point per K_seed of the one seed
    assert results["table5"]["points"] == 2 and set(results["table5"]["correlation"]) == set(vlmerge.TABLE5_METRICS)
    # the seed is the maa run's step-K_seed snapshot, and the seeded msa ran the rest: K_VL = K - K_seed
    # the records say what each model is: W⁰ of every msa, and the source, method and value of every merge
    models = results["models"]
    assert (models["msa"]["w0"], models["msa_seed0.5"]["w0"]) == ("init_vit", "seed0.5")
    assert models["seed0.5"]["ckpt"] == os.path.join(smoke, "maa/ckpt_step3.pt")
    merges = {(m["source"], m["method"], m["value"]) for m in models.values() if m["method"]}
    assert {("msa_seed0.5", "regmean", g) for g in (0.5, 1.0)} | {("msa", "interpolation", 0.5)} <= merges
    assert all(os.path.exists(m["ckpt"]) for m in models.values())
    seed = torch.load(os.path.join(smoke, "maa/ckpt_step3.pt"), weights_only=True)
    seeded = torch.load(os.path.join(smoke, "msa_seed0.5/ckpt.pt"), weights_only=True)
    assert (seed["step"], seeded["step"], seeded["args"]["init"]) == (3, 3, os.path.join(smoke, "maa/ckpt_step3.pt"))


def report_tables(report) -> dict:
    """REPORT.md's tables: {heading: [{column: cell}]}, the heading the nearest '## ' or '### ' line above."""
    tables, heading, header = {}, None, None
    for line in report.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            else:
                tables.setdefault(heading, []).append(dict(zip(header, cells)))
    return tables


def section(tables, prefix):
    return next(rows for heading, rows in tables.items() if heading.startswith(prefix))


def test_every_report_cell_equals_the_value_at_its_own_key_in_results_json(smoke):
    """Each cell is recomputed from the results.json key it stands for (one seed: no ± in the cells), so a
    cell showing another model's or another column's number fails."""
    report = open(os.path.join(smoke, "REPORT.md")).read()
    r = json.load(open(os.path.join(smoke, "results.json")))
    tables, models, f2 = report_tables(report), r["models"], lambda x: f"{x:.2f}"
    finetuned = lambda name, task, key: models[name]["finetune"][task][0][key]  # noqa: E731
    rows = {row["model"]: row for row in section(tables, "Table 1")}
    assert set(rows) == set(r["table"])
    for label, name in r["table"].items():
        assert rows[label]["VQA"] == f2(finetuned(name, "vqa", "vqa_score"))
        assert rows[label]["TR avg"] == f2(finetuned(name, "retrieval", "tr_avg"))
        assert rows[label]["IR avg"] == f2(finetuned(name, "retrieval", "ir_avg"))
        assert rows[label]["zero-shot R avg"] == f2(models[name]["zero_shot"]["avg"])
    rows = section(tables, "Fig. 3")
    assert len(rows) == len(r["sweeps"][0])
    for row, point in zip(rows, r["sweeps"][0]):
        before, after = models[point["before"]]["zero_shot"]["avg"], models[point["after"]]["zero_shot"]["avg"]
        assert (row["msa before merging"], row["after merging"], row["drop"]) == (f2(before), f2(after),
                                                                                  f2(before - after))
        assert row["K_seed steps"] == str(point["steps"])
    for method, (_, field, symbol) in vlmerge.SWEEPS.items():
        rows = section(tables, f"{method} ({symbol})")
        merges = {(m["source"], m["value"]): m for m in models.values() if m["method"] == method}
        assert [float(row[symbol]) for row in rows] == list(r["preset"][field])
        for row in rows:
            m = merges[r["selection"]["source"], float(row[symbol])]
            assert row["zero-shot TR avg"] == f2(m["zero_shot"]["tr_avg"])
            assert row["zero-shot IR avg"] == f2(m["zero_shot"]["ir_avg"])
            assert row["val R avg"] == f2(m["zero_shot_val"]["avg"])
            assert (row["chosen on val"] == "✓") == (m["name"] == r["selection"][method]["name"])
    rows = {row["model"]: row for row in section(tables, "Table 3")}
    for label, name in r["table"].items():
        assert rows[label]["NLVR2 acc"] == f2(finetuned(name, "nlvr2", "accuracy"))
        assert rows[label]["seg mIoU"] == f2(finetuned(name, "seg", "miou"))
    rows = {row["variant"]: row for row in section(tables, "Fig. 4")}
    for variant, names in r["ablation"].items():
        assert rows[variant]["VQA before"] == f2(finetuned(names["before"], "vqa", "vqa_score"))
        assert rows[variant]["zero-shot after"] == f2(models[names["after"]]["zero_shot"]["avg"])
    rows = {row["metric"]: row for row in section(tables, "Table 5")}
    for metric, value in r["table5"]["correlation"].items():
        label = f"{metric[4:]} of τ" if metric.startswith("tau_") else metric
        cell = rows[label][next(c for c in rows[label] if c.startswith("Pearson r"))]
        assert cell.split(" ")[0] == ("–" if value is None else f"{value:.3f}")
    spread = {row["metric"]: row for row in section(tables, "Seed-to-seed spread")}
    assert spread["VQA score"]["mean"] == f2(r["spread"]["vqa"]["mean"])
    for cell in (c for rows in tables.values() for row in rows for c in row.values()):
        for token in re.findall(r"-?\d+\.\d+(?:e[-+]\d+)?", cell):
            assert math.isfinite(float(token)), cell


def test_recipe_remakes_what_a_changed_input_feeds_and_nothing_else(smoke, tmp_path, capsys):
    """The stage cache compares what each output was made from: a parent checkpoint whose content changed
    re-runs its children (here maa's fine-tunings), leaves unrelated stages alone, and says so."""
    import shutil
    out = str(tmp_path / "copy")
    shutil.copytree(smoke, out)  # a moved run directory is still a valid cache
    mtime = lambda path: os.path.getmtime(os.path.join(out, path))  # noqa: E731
    kept = {path: mtime(path) for path in ("finetune/vqa/msa/metrics.json", "maa/metrics.json",
                                           "merged/msa~interpolation0.5.pt")}
    checkpoint = torch.load(os.path.join(out, "maa", "ckpt.pt"), weights_only=True)
    checkpoint["model"]["norm.weight"] += 1  # maa's weights are not what its fine-tunings started from
    torch.save(checkpoint, os.path.join(out, "maa", "ckpt.pt"))
    before = mtime("finetune/vqa/maa/metrics.json")
    vlmerge.main(["recipe", "--preset", "smoke", "--out", out])
    assert {path: mtime(path) for path in kept} == kept
    assert mtime("finetune/vqa/maa/metrics.json") > before
    made_from = json.load(open(os.path.join(out, "finetune/vqa/maa/made_from.json")))
    assert made_from["inputs"] == {"OUT/maa/ckpt.pt": vlmerge.fingerprint(os.path.join(out, "maa", "ckpt.pt"))}
    assert "re-making" in capsys.readouterr().err


def test_recipe_rerun_reuses_finished_stages(smoke):
    mtime = os.path.getmtime(os.path.join(smoke, "msa", "ckpt.pt"))
    before = json.load(open(os.path.join(smoke, "results.json")))
    vlmerge.main(["recipe", "--preset", "smoke", "--out", smoke])
    assert os.path.getmtime(os.path.join(smoke, "msa", "ckpt.pt")) == mtime
    after = json.load(open(os.path.join(smoke, "results.json")))
    assert after["models"]["msa"]["zero_shot"] == before["models"]["msa"]["zero_shot"]


def test_paper_preset_dry_run_builds_every_stage(tmp_path):
    result = vlmerge.main(["recipe", "--preset", "paper", "--init", "beit_base.pt", "--dry-run",
                           "--out", str(tmp_path / "paper")])
    plan = result["plan"]
    assert any("--arch vit_base" in line and "--steps 200000" in line and "--variant msa" in line for line in plan)
    assert any("--steps 100000" in line and "seed0.5" in line for line in plan)  # K_seed = K_VL = 100k
    assert any("--variant maa" in line and "--keep-at 50000 100000 150000" in line for line in plan)  # the seeds
    assert any("--task nlvr2" in line for line in plan) and any("custom_attn" in line for line in plan)
    assert not os.path.exists(tmp_path / "paper" / "maa" / "ckpt.pt")  # nothing was trained


def test_tiny_preset_fine_tunes_vqa_with_its_own_lr_and_a_10x_head(tmp_path):
    """tiny's VQA stages run 300 steps at lr 2e-4 with the answer head at 10x (150 steps at 5e-4 collapsed
    to one answer); retrieval keeps the preset's 5e-4 and has no fresh head to speed up."""
    plan = vlmerge.main(["recipe", "--preset", "tiny", "--dry-run", "--out", str(tmp_path / "t")])["plan"]
    vqa = [line for line in plan if "--task vqa" in line]
    retrieval = [line for line in plan if "--task retrieval" in line]
    assert vqa and retrieval
    assert all("--steps 300 " in line and "--lr 0.0002 " in line and "--warmup 30 " in line
               and "--head-lr-mult 10.0" in line for line in vqa)
    assert all("--lr 0.0005 " in line for line in retrieval)


def test_paper_preset_without_init_is_one_clear_error(tmp_path):
    proc = cli("recipe", "--preset", "paper", "--dry-run", "--out", str(tmp_path / "p"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: preset needs --init PATH")


# --- merge / distance / eval commands ------------------------------------------------------------

def test_merge_command_writes_a_maa_checkpoint_equal_to_merge_modalities(tmp_path):
    src = msa_checkpoint(str(tmp_path / "msa.pt"))
    proc = cli("merge", str(tmp_path / "msa.pt"), "--method", "interpolation", "--alpha", "0.75",
               "-o", str(tmp_path / "maa.pt"))
    assert proc.returncode == 0, proc.stderr
    out = train.load_checkpoint(str(tmp_path / "maa.pt"))
    expected = merge.merge_modalities(src["model"], "interpolation", alpha=0.75)
    assert out["variant"] == "maa" and out["config"]["variant"] == "maa"
    assert set(out["model"]) == set(expected) and all(torch.equal(out["model"][k], expected[k]) for k in expected)
    model = train.model_from_checkpoint(out)
    model.load_state_dict(out["model"], strict=True)


def test_merge_command_errors_are_one_line(tmp_path):
    msa_checkpoint(str(tmp_path / "msa.pt"))
    proc = cli("merge", str(tmp_path / "msa.pt"), "--method", "modality_arithmetic", "-o", str(tmp_path / "o.pt"))
    assert proc.returncode == 2 and "needs --init-state" in proc.stderr
    assert not os.path.exists(tmp_path / "o.pt")
    proc = cli("merge", str(tmp_path / "missing.pt"), "--method", "interpolation", "-o", str(tmp_path / "o.pt"))
    assert proc.returncode == 2 and "missing.pt does not exist" in proc.stderr


def experts_by_hand(state_dict, modality):
    """{maa key: tensor} of one modality's experts, the segment deleted by string surgery."""
    return {k.replace(f".{modality}.", "."): t for k, t in state_dict.items() if f".{modality}." in k}


def metrics_by_hand(a, b):
    """Sec. 7's L2, cosine dissimilarity and SSD (Eq. 1) of two state dicts, over one flat float64 vector;
    TSSD from merge, on the given dicts."""
    x = torch.cat([a[k].double().flatten() for k in sorted(a)])
    y = torch.cat([b[k].double().flatten() for k in sorted(a)])
    assert ((x == 0) & (y == 0)).sum() == 0  # SSD's 0/0 convention never needed here
    return {"l2": (x - y).norm().item(), "cosine": 1 - (x @ y / (x.norm() * y.norm())).item(),
            "ssd": 1 - ((x + y).abs() / (x.abs() + y.abs())).mean().item(), "tssd": merge.tssd(a, b)}


def assert_metrics(got, expected, prefix=""):
    for name, value in expected.items():
        assert got[prefix + name] == pytest.approx(value, rel=1e-7, abs=1e-12), (prefix + name, got, expected)


def test_distance_command_matches_merge_metrics(tmp_path):
    src = msa_checkpoint(str(tmp_path / "msa.pt"))["model"]
    other = msa_checkpoint(str(tmp_path / "msa2.pt"), seed=1)["model"]
    w0 = msa_checkpoint(str(tmp_path / "w0.pt"), seed=2, variant="maa")["model"]
    proc = cli("distance", str(tmp_path / "msa.pt"), "--init-state", str(tmp_path / "w0.pt"),
               "--json", str(tmp_path / "d.json"))
    assert proc.returncode == 0, proc.stderr
    got = json.load(open(tmp_path / "d.json"))
    assert "| tssd |" in proc.stdout and "| tau_tssd |" in proc.stdout
    # the v and l experts, paired by their maa key; the modality vectors τ_m = W_m − W⁰ (Sec. 4.1)
    v, l = experts_by_hand(src, "v"), experts_by_hand(src, "l")
    assert v.keys() == l.keys() and len(v) > 0
    tau_v = {k: v[k] - w0[k] for k in v}
    tau_l = {k: l[k] - w0[k] for k in l}
    assert set(got) == {"layers", *(p + m for p in ("", "tau_") for m in ("l2", "cosine", "ssd", "tssd"))}
    assert_metrics(got, metrics_by_hand(v, l))
    assert_metrics(got, metrics_by_hand(tau_v, tau_l), prefix="tau_")
    # the per-layer table: each metric on that layer's keys alone
    assert set(got["layers"]) == {"blocks.0", "blocks.1", "norm"}
    for layer in ("blocks.1", "norm"):
        keys = [k for k in v if k.startswith(layer + ".")]
        assert_metrics(got["layers"][layer], metrics_by_hand({k: v[k] for k in keys}, {k: l[k] for k in keys}))
        assert_metrics(got["layers"][layer], metrics_by_hand({k: tau_v[k] for k in keys},
                                                             {k: tau_l[k] for k in keys}), prefix="tau_")
    # two checkpoints: the metrics of their whole state dicts
    proc = cli("distance", str(tmp_path / "msa.pt"), str(tmp_path / "msa2.pt"), "--json", str(tmp_path / "d2.json"))
    assert proc.returncode == 0, proc.stderr
    got = json.load(open(tmp_path / "d2.json"))
    assert got["l2"] == pytest.approx(math.sqrt(sum(((src[k].double() - other[k].double()) ** 2).sum().item()
                                                    for k in src)), rel=1e-7)
    assert_metrics(got, metrics_by_hand(src, other))


def test_pearson_by_hand():
    assert vlmerge.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert vlmerge.pearson([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)
    assert vlmerge.pearson([1, 1, 1], [1, 2, 3]) is None


def test_pretrain_flops_match_the_flop_counter():
    """The analytic FLOP count of a training step agrees with torch's FlopCounterMode (matmuls only)."""
    from torch.utils.flop_counter import FlopCounterMode
    model = build_model("vit_tiny", "msa", vocab_size=100, image_size=32, patch_size=8, depth=4)
    batch = vlmerge.random_pretrain_batch(model.cfg, 4, 12, torch.device("cpu"), torch.Generator().manual_seed(0))
    objective = train.Objective(model)
    with FlopCounterMode(display=False) as counter:
        objective(batch)[0].backward()
    analytic = vlmerge.pretrain_flops(model.cfg, 4, 12)
    assert abs(counter.get_total_flops() - analytic) / analytic < 0.05


def test_bench_quick_prints_a_table_with_finite_ratios(tmp_path):
    proc = cli("bench", "--quick", "--device", "cpu", "--json", str(tmp_path / "bench.json"), timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| benchmark | setting | ours | reference | ratio | range | target |" in proc.stdout
    rows = json.load(open(tmp_path / "bench.json"))["rows"]
    names = {r["benchmark"] for r in rows}
    assert {"vision route fwd+bwd", "attention kernel, pre-training step", "merge_modalities interpolation",
            "collect_grams", "distance tssd",
            "synthetic world", "loader (RandAugment + MLM)"} <= names
    no_reference = ("synthetic world", "state-dict copy (reference)")
    for r in rows:
        if r["benchmark"] not in no_reference and not r["benchmark"].startswith("pre-training"):
            lo, hi = r["range"]
            assert math.isfinite(r["ratio"]) and 0 < lo <= r["ratio"] <= hi, r
        else:  # no reference to divide by (MFU needs a GPU's peak): left empty, never NaN
            assert r["ratio"] is None and r["range"] is None, r


def test_bench_ratio_is_the_median_of_interleaved_pairs(monkeypatch):
    # durations: one probe of each side (ref 1 s, ours 0.005 s), then (ref, ours) × 3 pairs in turn
    calls, timings = [], []
    durations = iter([1.0, 0.005, 1.0, 2.0, 10.0, 30.0, 2.0, 3.0])

    def fake_timed(fn, device, calls=1):
        fn()
        timings.append(calls)
        return next(durations)
    monkeypatch.setattr(vlmerge, "timed", fake_timed)
    t = vlmerge.paired_seconds(lambda: calls.append("ref"), lambda: calls.append("ours"), torch.device("cpu"),
                               pairs=3, warmup=1)
    assert calls == ["ref", "ours"] * 5  # one warm-up pair, one probe pair, then strictly alternating
    # a side faster than MIN_SAMPLE_S is repeated within its sample: 0.025 s / 0.005 s = 5 calls
    assert timings == [1, 1] + [1, 5] * 3
    # pair ratios 2, 3, 1.5: median 2, range 1.5-3; a slow pair (10 s / 30 s) moves both sides together
    assert (t.ratio, t.lo, t.hi, t.ref, t.ours) == (2.0, 1.5, 3.0, 2.0, 3.0)


def test_timed_is_seconds_per_call():
    n = []
    assert vlmerge.timed(lambda: (n.append(1), time.sleep(0.01)), torch.device("cpu"), calls=3) >= 0.01
    assert len(n) == 3


def test_timing_mode_keeps_freed_tensors_in_the_heap_for_reuse():
    # In malloc_mode("reuse") a freed tensor's pages stay resident, so the next step or timed call reuses touched memory
    # instead of paying first-touch page faults (whose cost differs from process to process). A trim threshold
    # handed to mallopt as 1 << 62 wraps to 0 in its C int and returned them at once. A fresh process: in this
    # one, whatever pytest allocated above the tensors would pin the heap's top and hide a trim.
    script = ("import torch, train, vlmerge\n"
              "train.malloc_mode('reuse')\n"
              "held = [torch.ones(1 << 20) for _ in range(16)]\n"   # 16 × 4 MiB, all touched
              "before = vlmerge.PeakMemory.rss()\n"
              "del held\n"
              "print((before - vlmerge.PeakMemory.rss()) / 2**20)\n")
    assert float(fresh_python(script)) < 8  # MiB given back on free


def test_peak_memory_sees_an_allocation_that_reuses_pages_freed_by_timed_calls(monkeypatch):
    # bench times in malloc_mode("reuse"): freed tensors stay in glibc's heap, and a later allocation reuses
    # them without growing the resident set. PeakMemory must still see it (before it trimmed the heap, the
    # quick bench's 90 MiB state-dict copy read "peak +0.00× ckpt"). The result is held until the end.
    state = {i: torch.randn(1 << 20) for i in range(16)}                      # 16 × 4 MiB
    size = 16 * (1 << 20) * 4
    copy = lambda: {k: v.clone() for k, v in state.items()}  # noqa: E731
    train.malloc_mode("reuse")
    for _ in range(3):
        copy()                                                                 # pages now in the free lists
    assert 0.95 * size <= vlmerge.peak_bytes(copy, torch.device("cpu")) <= 1.5 * size
    assert vlmerge.peak_bytes(lambda: None, torch.device("cpu")) < 0.05 * size
    # with the sampler silenced only the reading at the block's end is left: it must see the result, held (one
    # 64 MiB tensor: mapped on its own, it would leave the resident set the moment it were dropped)
    monkeypatch.setattr(vlmerge.PeakMemory, "sample", lambda self: None)
    assert vlmerge.peak_bytes(lambda: torch.ones(size // 4), torch.device("cpu")) >= 0.95 * size


def test_random_w0_is_one_timm_format_vit_that_every_model_loads(tmp_path):
    preset = dataclasses.replace(vlmerge.PRESETS["smoke"], init_steps=0)
    path = vlmerge.Recipe(preset, str(tmp_path)).initialization()
    vit = torch.load(path, weights_only=True)
    assert all(not k.startswith(("word_embed", "text_pos_embed", "itc", "itm", "mlm")) for k in vit)
    model = build_model("vit_tiny", "msa", vocab_size=69, image_size=32, patch_size=8, depth=2, fusion_layers=1,
                        max_text_len=24)
    train.transfer_weights(model, vit)  # the --init path of every recipe stage
    for key, value in model.state_dict().items():
        if shared_key(key) in vit:
            assert torch.equal(value, vit[shared_key(key)]), key
    again = vlmerge.Recipe(preset, str(tmp_path / "again")).initialization()
    assert all(torch.equal(vit[k], v) for k, v in torch.load(again, weights_only=True).items())  # deterministic
    with pytest.raises(ValueError, match="--init PATH"):
        vlmerge.Recipe(dataclasses.replace(preset, init_steps=None), str(tmp_path / "none")).initialization()


# --- model selection on val, Table 5's statistics and τ distances -----------------------------------

def fabricated_models(val, test):
    """A recipe's model records with only what selection reads, from {(method, value): avg}; named in reverse so
    that nothing can be found by building a name."""
    models = {f"model{i}": {"name": f"model{i}", "source": "src", "method": m, "value": v,
                            "zero_shot_val": {"avg": val[m, v]}, "zero_shot": {"avg": test[m, v]}}
              for i, (m, v) in enumerate(reversed(list(val)))}
    return models | {"other": {"name": "other", "source": "another", "method": "interpolation", "value": 0.5,
                               "zero_shot_val": {"avg": 99}, "zero_shot": {"avg": 99}}}


def test_sweeps_choose_alpha_gamma_and_the_method_on_val_never_on_test():
    preset = {"alphas": (0.0, 0.5, 0.75, 1.0), "lams": (0.5, 1.0), "gammas": (0.5, 1.0)}
    val = {("interpolation", 0.0): 10, ("interpolation", 0.5): 30, ("interpolation", 0.75): 20,
           ("interpolation", 1.0): 5, ("modality_arithmetic", 0.5): 25, ("modality_arithmetic", 1.0): 31,
           ("regmean", 0.5): 12, ("regmean", 1.0): 28}
    # test ranks every sweep the other way: α = 0.75, λ = 0.5, γ = 0.5 and interpolation would win there
    test = {("interpolation", 0.0): 10, ("interpolation", 0.5): 20, ("interpolation", 0.75): 40,
            ("interpolation", 1.0): 5, ("modality_arithmetic", 0.5): 35, ("modality_arithmetic", 1.0): 15,
            ("regmean", 0.5): 33, ("regmean", 1.0): 11}
    chosen = vlmerge.select_on_val(fabricated_models(val, test), "src", preset)
    assert {m: chosen[m]["value"] for m in vlmerge.SWEEPS} == {"interpolation": 0.5, "modality_arithmetic": 1.0,
                                                               "regmean": 1.0}
    assert chosen["best"] == {"method": "modality_arithmetic", "value": 1.0, "name": "model2", "val": 31, "test": 15}
    assert chosen["interpolation"]["test"] == 20 and chosen["source"] == "src"


def test_pearson_interval_is_fishers_z_by_hand():
    r, n = 0.5, 12
    z = 0.5 * math.log((1 + r) / (1 - r))       # atanh written out
    half = 1.959964 / math.sqrt(n - 3)          # the normal's 97.5% quantile over the standard error
    tanh = lambda x: (math.exp(2 * x) - 1) / (math.exp(2 * x) + 1)  # noqa: E731
    low, high = vlmerge.pearson_interval(r, n)
    assert low == pytest.approx(tanh(z - half), abs=1e-6) and high == pytest.approx(tanh(z + half), abs=1e-6)
    assert low == pytest.approx(-0.1036, abs=1e-4) and high == pytest.approx(0.8345, abs=1e-4)
    assert vlmerge.pearson_interval(r, 3) is None and vlmerge.pearson_interval(None, 10) is None
    assert vlmerge.pearson_interval(1.0, 5) == [1.0, 1.0]
    assert vlmerge.pearson([1, None, 3], [1, 2, 3]) is None


def test_over_seeds_gives_mean_and_sample_std_per_k_seed():
    assert vlmerge.stats([1.0, 2.0, 6.0]) == {"mean": 3.0, "std": math.sqrt(7.0), "n": 3}  # ((4 + 1 + 9) / 2) ** .5
    assert vlmerge.stats([4.0, None]) == {"mean": 4.0, "std": None, "n": 1} and vlmerge.stats([None]) is None
    assert vlmerge.pm({"mean": 3.0, "std": 1.5, "n": 2}) == "3.00 ± 1.50" and vlmerge.pm(None) == "–"


def hand_msa():
    """Experts of two layers and their W⁰; by position: W⁰ = 1, W_v = [2, 0 | 1.5, 1], W_l = [0, 2 | 1.5, 3]."""
    state = {"blocks.0.fc.v.weight": torch.tensor([2.0, 0.0]), "blocks.0.fc.l.weight": torch.tensor([0.0, 2.0]),
             "norm.v.weight": torch.tensor([1.5, 1.0]), "norm.l.weight": torch.tensor([1.5, 3.0]),
             "patch_embed.weight": torch.ones(3)}
    w0 = {"blocks.0.fc.weight": torch.ones(2), "norm.weight": torch.ones(2), "patch_embed.weight": torch.ones(3)}
    return state, w0


def test_distances_on_modality_vectors_by_hand():
    state, w0 = hand_msa()
    d = vlmerge.distances(state, init_state=w0)
    # τ_v = [1, -1, 0.5, 0], τ_l = [-1, 1, 0.5, 2]
    assert d["tau_l2"] == pytest.approx(d["l2"]) == pytest.approx(math.sqrt(4 + 4 + 0 + 4))  # W⁰ cancels in L2
    assert d["tau_cosine"] == pytest.approx(1 - (-1.75) / (1.5 * 2.5))
    assert d["cosine"] == pytest.approx(1 - 5.25 / math.sqrt(7.25 * 15.25))
    assert d["tau_ssd"] == pytest.approx(1 - (0 + 0 + 1 + 1) / 4) and d["ssd"] == pytest.approx(0.0)
    # TSSD zeroes the 2 smallest |τ| of each: τ_v → [1, -1, 0, 0], τ_l → [0, 0, 0, 2]; the both-zero 3rd is out
    assert d["tau_tssd"] == pytest.approx(1 - (1 + 1 + 1) / 3)
    layers = vlmerge.distances(state, init_state=w0, by_layer=True)
    assert list(layers) == ["blocks.0", "norm"]
    assert layers["blocks.0"]["tau_cosine"] == pytest.approx(2.0)
    assert layers["blocks.0"]["tau_ssd"] == pytest.approx(1.0)
    assert layers["norm"]["tau_cosine"] == pytest.approx(1 - 0.25 / (0.5 * math.sqrt(4.25)))
    assert layers["norm"]["tau_ssd"] == pytest.approx(0.0) and layers["norm"]["l2"] == pytest.approx(2.0)


def test_modality_vectors_subtract_the_shared_start_and_name_a_missing_key():
    state, w0 = hand_msa()
    tau_v, tau_l = merge.modality_vectors(state, w0)
    assert list(tau_v) == ["blocks.0.fc.weight", "norm.weight"]  # experts only: embeddings are not merged
    assert tau_v["norm.weight"].tolist() == [0.5, 0.0] and tau_l["blocks.0.fc.weight"].tolist() == [-1.0, 1.0]
    with pytest.raises(KeyError, match="'norm.weight': missing from init_state"):
        merge.modality_vectors(state, {"blocks.0.fc.weight": torch.ones(2)})


def test_distance_command_prints_a_per_layer_table_and_takes_init_state(tmp_path):
    state, w0 = hand_msa()
    torch.save(state, tmp_path / "msa.pt")
    torch.save(w0, tmp_path / "w0.pt")
    proc = cli("distance", str(tmp_path / "msa.pt"), "--init-state", str(tmp_path / "w0.pt"),
               "--json", str(tmp_path / "d.json"))
    assert proc.returncode == 0, proc.stderr
    got = json.load(open(tmp_path / "d.json"))
    assert got["tau_ssd"] == pytest.approx(0.5) and got["layers"]["blocks.0"]["tau_cosine"] == pytest.approx(2.0)
    assert "| layer | l2 | cosine | ssd | tssd | tau_l2 |" in proc.stdout and "| norm | 2 |" in proc.stdout
    proc = cli("distance", str(tmp_path / "msa.pt"), str(tmp_path / "msa.pt"), "--init-state", str(tmp_path / "w0.pt"))
    assert proc.returncode == 2 and "give one CKPT" in proc.stderr


@pytest.mark.slow
def test_smoke_recipe_over_two_pretraining_seeds(tmp_path):
    out = str(tmp_path / "seeds")
    results = vlmerge.main(["recipe", "--preset", "smoke", "--seeds", "2", "--out", out])
    assert os.path.exists(os.path.join(out, "s1", "msa_seed0.5", "ckpt.pt"))
    assert results["table5"]["points"] == 4 and results["table5"]["rows"]["s1/msa_seed0.5"]["seed"] == 1
    # Table 1 over the seeds: the mean and sample std of the two seeds' own numbers
    ours = [results["models"][t["ours"]]["zero_shot"]["avg"] for t in results["tables"]]
    cell = results["over_seeds"]["table1"]["ours"]["zero_shot"]
    assert cell["n"] == 2 and cell["mean"] == pytest.approx(sum(ours) / 2)
    assert cell["std"] == pytest.approx(abs(ours[0] - ours[1]) / math.sqrt(2))
    assert results["tables"][1]["ours"].startswith("s1/msa_seed0.5~" + results["selection"]["best"]["method"])
    report = open(os.path.join(out, "REPORT.md")).read()
    assert "Mean ± std over 2 pre-training seeds." in report and " ± " in report


def test_leave_one_out_range_shows_a_point_that_decides_r():
    import statistics
    xs, ys = [1, 2, 3, 4, 5], [1, -1, 1, -1, 10]  # r is carried by the last point
    subsets = [statistics.correlation(xs[:i] + xs[i + 1:], ys[:i] + ys[i + 1:]) for i in range(5)]
    low, high = vlmerge.pearson_range(xs, ys)
    assert (low, high) == (pytest.approx(min(subsets)), pytest.approx(max(subsets)))
    assert low < 0 < 0.6 < vlmerge.pearson(xs, ys) < high  # without the last point, r changes sign
    assert vlmerge.pearson_range(xs[:3], ys[:3]) is None
