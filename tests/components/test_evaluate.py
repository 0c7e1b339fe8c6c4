"""Stage `evaluate`: the guidance sweep, the exact checker, prompt suites and the report."""

import dataclasses
import json

import pandas as pd
import pytest

from components import evaluate
from components.errors import BadInputError


def test_sweep_scales_keep_order_and_add_the_default():
    assert evaluate.sweep_scales((0.0, 1.0, 1.0, 3.0), 2.0) == [0.0, 1.0, 3.0, 2.0]
    assert evaluate.sweep_scales((0.0, 2.0), 2.0) == [0.0, 2.0]


def test_prompt_suites_read_txt_csv_tsv_and_refuse_bad_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("a red circle\n\n a blue square \n")
    assert evaluate.read_prompt_suite(txt).to_dict("list") == {"prompt": ["a red circle", "a blue square"],
                                                               "category": ["all", "all"]}
    csv = tmp_path / "b.csv"
    csv.write_text('prompt,category\n"a red circle, small",colour\na blue square,\n')
    frame = evaluate.read_prompt_suite(csv)
    assert frame["prompt"].tolist() == ["a red circle, small", "a blue square"]
    assert frame["category"].tolist() == ["colour", "uncategorised"]
    tsv = tmp_path / "c.tsv"
    tsv.write_text("prompt\tcategory\ntwo circles\tcount\n")
    assert evaluate.read_prompt_suite(tsv)["category"].tolist() == ["count"]

    bad = {"missing.csv": None, "no_prompt.csv": "text,category\nx,y\n", "blank.csv": "prompt\nok\n \n",
           "empty.txt": "\n", "suite.json": "[]"}
    messages = {}
    for name, body in bad.items():
        if body is not None:
            (tmp_path / name).write_text(body)
        with pytest.raises(BadInputError) as err:
            evaluate.read_prompt_suite(tmp_path / name)
        messages[name] = str(err.value)
        assert "\n" not in messages[name] and name in messages[name]
    assert "not found" in messages["missing.csv"]
    assert "no `prompt` column" in messages["no_prompt.csv"]
    assert "line 2" in messages["blank.csv"]


@pytest.fixture(scope="module")
def evaluated(smoke_cascade, smoke_evaluator, smoke_decoder, tmp_path_factory):
    art = smoke_cascade.art
    root = tmp_path_factory.mktemp("evaluate")
    suite = root / "suite.csv"
    suite.write_text("prompt,category\na red circle,colour\na green square,colour\ntwo blue triangles,count\n")
    cfg = dataclasses.replace(art.cfg, evaluate=dataclasses.replace(art.cfg.evaluate, prompt_suites=(str(suite),)))
    done = []
    result = evaluate.run(cfg, art.data, art.validate, art.features, art.tokenizer, smoke_cascade.base,
                          smoke_cascade.superres, smoke_decoder, smoke_evaluator, root / "out", done.append)
    return cfg, result, done


def test_evaluate_writes_the_curve_gate_metrics_and_a_self_contained_report(evaluated):
    cfg, result, done = evaluated
    m, out, ev = result.metrics, result.out_dir, cfg.evaluate
    default = cfg.base.sample.guidance
    scales = evaluate.sweep_scales(ev.guidance_scales, default)
    curve = pd.read_csv(out / "curve.csv")
    assert curve["guidance"].tolist() == scales
    for g, row in curve.set_index("guidance").iterrows():
        assert m[f"fid_g{g:g}"] == pytest.approx(row["fid"]) and m[f"clip_score_g{g:g}"] == pytest.approx(row["clip_score"])
        assert row["fid"] >= 0 and 0 <= row["clip_score"] <= 100
    assert m["fid"] == m[f"fid_g{default:g}"] and m["clip_score"] == m[f"clip_score_g{default:g}"]
    # the exact checker's headline figures under the names the gates read
    assert m["checker_single"] == m["checker_single_colour_shape"] and m["checker_pair"] == m["checker_pair_overall"]
    assert m["checker_prompts"] == ev.checker_prompts
    assert m["images_generated"] == ev.prompts * len(scales) + ev.checker_prompts * ev.checker_seed_sets + 3
    # further seed sets are reported beside the gated set-0 figure, and their mean is the mean of the sets
    assert ev.checker_seed_sets == 2
    assert m["checker_single_colour_shape_set0"] == m["checker_single"]
    assert m["checker_single_colour_shape_mean"] == pytest.approx(
        (m["checker_single_colour_shape_set0"] + m["checker_single_colour_shape_set1"]) / 2)
    assert m["checker_pair_overall_mean"] == pytest.approx(
        (m["checker_pair_overall_set0"] + m["checker_pair_overall_set1"]) / 2)
    assert "Seed sets at guidance" in (out / "checker.md").read_text()
    assert done[-1] == m["images_generated"]
    assert json.loads((out / "metrics.json").read_text()) == m
    # one fixed-seed grid per scale, shown inline in the HTML report
    for g in scales:
        assert (out / "grids" / f"guidance_{g:g}.png").is_file()
    page = (out / "report.html").read_text()
    assert "<p>Seed sets at guidance" in page and "<th>seed set</th>" in page  # the seed-set table keeps its head
    assert page.count("data:image/png;base64,") == len(scales) + 2  # curve + grids + suite grid
    assert "src='grids/" not in page and "FID vs CLIP" in page
    md = (out / "report.md").read_text()
    assert "| guidance | FID | CLIP score |" in md and "Exact checker" in md and "suite" in md
    assert (out / "curve.png").stat().st_size > 1000


def test_prompt_suites_are_scored_per_category(evaluated):
    _, result, _ = evaluated
    m = result.metrics
    assert {"suite_suite_colour_clip_score", "suite_suite_count_clip_score", "suite_suite_clip_score"} <= set(m)
    overall = (2 * m["suite_suite_colour_clip_score"] + m["suite_suite_count_clip_score"]) / 3
    assert m["suite_suite_clip_score"] == pytest.approx(overall)


def test_the_sweep_is_deterministic_for_its_seeds(evaluated, smoke_cascade, smoke_evaluator, smoke_decoder, tmp_path):
    cfg, first, _ = evaluated
    art = smoke_cascade.art
    cfg = dataclasses.replace(cfg, evaluate=dataclasses.replace(cfg.evaluate, prompt_suites=(), checker_prompts=0,
                                                               guidance_scales=(cfg.base.sample.guidance,)))
    again = evaluate.run(cfg, art.data, art.validate, art.features, art.tokenizer, smoke_cascade.base,
                         smoke_cascade.superres, smoke_decoder, smoke_evaluator, tmp_path)
    assert again.metrics["fid"] == pytest.approx(first.metrics["fid"], rel=1e-5)
    assert again.metrics["clip_score"] == pytest.approx(first.metrics["clip_score"], rel=1e-5)
    assert "checker_single" not in again.metrics  # checker_prompts: 0 turns the checker off
