"""The evaluation app end to end on a tiny run, prompt loaders, the comparison."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from memfilter.evaluation.prompts import load_prompt_file, training_prompts
from tests.conftest import REPO, run_cmd, train_in_process

SHARED_PROMPTS = REPO.parent / "shared" / "data" / "prompts"


def test_prompt_files_in_the_literature_formats(tmp_path):
    (tmp_path / "a.txt").write_text("a photo of a cat\n\n  a red car  \n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"caption": "the starry night", "index": 3}) + "\n"
                                      + json.dumps({"caption": "mona lisa", "index": 4}) + "\n")
    (tmp_path / "c.csv").write_text(";Caption;URL;type\n0;Donald Trump portrait;http://x;VM\n1;a mug;http://y;TM\n")
    assert [r["prompt"] for r in load_prompt_file(tmp_path / "a.txt")] == ["a photo of a cat", "a red car"]
    b = load_prompt_file(tmp_path / "b.jsonl")
    assert [r["prompt"] for r in b] == ["the starry night", "mona lisa"] and b[1]["meta"]["index"] == 4
    c = load_prompt_file(tmp_path / "c.csv")
    assert [r["prompt"] for r in c] == ["Donald Trump portrait", "a mug"] and c[0]["meta"]["type"] == "VM"
    with pytest.raises(ValueError, match="no prompt column"):
        load_prompt_file(tmp_path / "c.csv", column="Prompt")
    with pytest.raises(FileNotFoundError, match="prompt_files"):
        load_prompt_file(tmp_path / "missing.txt")


@pytest.mark.skipif(not SHARED_PROMPTS.exists(), reason="../shared/data/prompts not beside this checkout")
def test_reads_the_shared_prompt_sets_as_they_are():
    expected = {"sdv1_500_memorized.jsonl": 500, "nemo_memorized_laion_prompts.csv": 500,
                "sd1_nonmemorized_500.txt": 500, "sd2_memorized_219.jsonl": 219, "coco2014_val_10000.csv": 10000}
    for name, n in expected.items():
        rows = load_prompt_file(SHARED_PROMPTS / name)
        assert len(rows) == n and all(r["prompt"] for r in rows), name
    vm = [r for r in load_prompt_file(SHARED_PROMPTS / "nemo_memorized_laion_prompts.csv") if r["meta"]["type"] == "VM"]
    assert 0 < len(vm) < 500


def test_training_prompts_split_by_ground_truth():
    samples = [{"key": f"k{i}", "caption": f"c{i % 3 if i < 6 else i}", "meta": {"dup_group": i % 3 if i < 6 else -1}}
               for i in range(10)]
    sets = training_prompts(samples)
    assert len(sets["duplicated"]) == 3 and len(sets["unique"]) == 4
    assert sorted(sets["duplicated"][0]["meta"]["keys"]) == ["k0", "k3"]
    assert len(training_prompts(samples, max_duplicated=2, max_unique=1)["unique"]) == 1


@pytest.mark.slow
def test_evaluate_a_run_and_compare(tmp_path):
    run_dir, _ = train_in_process(tmp_path / "a", ["max_train_steps=3"])
    cmd = [sys.executable, str(REPO / "launch" / "evaluate.py"), f"run_dir={run_dir}", "evaluation.num_images_per_prompt=2",
           "evaluation.num_inference_steps=2", "evaluation.max_duplicated=2", "evaluation.max_unique=3",
           "evaluation.grid_rows=4", "evaluation.background_sample=50"]
    proc = run_cmd(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = run_dir / "eval"
    report = json.loads((out / "report.json").read_text())
    assert report["descriptor"]["name"].startswith("pixels") and "fallback" in report["descriptor"]["name"]
    assert set(report["replication"]) == {"duplicated", "unique"}
    assert report["replication"]["duplicated"]["n"] == 2 * 2 and report["replication"]["unique"]["n"] == 3 * 2
    for q in report["quality"].values():                   # no weights configured: skipped, not faked
        assert "skipped" in q
    gens = pd.read_parquet(out / "generations.parquet")
    assert len(gens) == 10 and gens.similarity.between(-1, 1.0001).all()
    assert all(Path(p).exists() for p in gens.path)
    for f in ("report.md", "similarity_hist.png", "top_matches.png"):
        assert (out / f).stat().st_size > 0
    md = (out / "report.md").read_text()
    assert "pixels" in md and "sscd" in md.lower()         # the report names descriptor and preprocessing

    # the same seed gives the same generations (compared on equal noise)
    again = run_cmd(cmd + [f"output_dir={tmp_path / 'again'}"])
    assert again.returncode == 0, again.stderr[-2000:]
    g2 = pd.read_parquet(tmp_path / "again" / "generations.parquet")
    assert (g2.seed.values == gens.seed.values).all() and (g2.similarity.values == gens.similarity.values).all()

    # detection CLI on labelled prompt files: scores for every prompt, AUC and TPR@1%FPR from them
    (tmp_path / "mem.txt").write_text("a red circle on the left, blue background\na red square on the top, white background\n")
    (tmp_path / "non.txt").write_text("a photo of a dog\na bowl of fruit\nan old car\n")
    proc = run_cmd([sys.executable, str(REPO / "launch" / "detect.py"), f"pipeline={run_dir}",
                    f"memorized={tmp_path / 'mem.txt'}", f"nonmemorized={tmp_path / 'non.txt'}",
                    "num_generations=2", "num_inference_steps=5", f"output={tmp_path / 'det'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    scores = pd.read_parquet(tmp_path / "det" / "scores.parquet")
    assert len(scores) == 5 and (scores.score > 0).all() and scores.label.tolist() == [1, 1, 0, 0, 0]
    (cell,) = json.loads((tmp_path / "det" / "metrics.json").read_text())["grid"]     # magnitude, k=1, n=2
    from memfilter.evaluation.detection import auc
    assert (cell["detector"], cell["steps"], cell["generations"]) == ("magnitude", 1, 2)
    assert cell["auc"] == pytest.approx(auc(scores.score.values, scores.label.values))

    # mitigated generations (memfilter-mitigate's layout) measured by the same evaluation, without sampling again
    from memfilter.launch.evaluate import run as evaluate_app
    from memfilter.launch.mitigate import run as mitigate_app
    from tests.conftest import compose
    mitigate_app(compose([f"pipeline={run_dir}", f"prompts={tmp_path / 'mem.txt'}", "method=embedding", "target=0.01",
                          "max_iterations=2", "num_generations=2", "num_inference_steps=2", "device=cpu",
                          f"output={tmp_path / 'mit'}"], "mitigate"))
    mit = evaluate_app(compose([f"run_dir={run_dir}", f"evaluation.generations={tmp_path / 'mit'}",
                                "evaluation.background_sample=50", "evaluation.grid_rows=2",
                                f"output_dir={tmp_path / 'mit-eval'}"], "evaluate"))
    assert set(mit["replication"]) == {"mem"} and mit["replication"]["mem"]["prompts"] == 2
    assert mit["evaluated"]["generations"] == str(tmp_path / "mit")
    index = pd.read_parquet(tmp_path / "mit" / "mem" / "index.parquet")
    assert len(pd.read_parquet(tmp_path / "mit-eval" / "generations.parquet")) == len(index) == 4

    proc = run_cmd([sys.executable, str(REPO / "launch" / "evaluate.py"), f"compare=[{run_dir},{run_dir}]",
                    f"output_dir={tmp_path / 'cmp'}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "cmp" / "tradeoff.png").exists() and "memfilter comparison" in (tmp_path / "cmp" / "compare.md").read_text()


def test_evaluate_errors_name_the_field(tmp_path):
    proc = run_cmd([sys.executable, str(REPO / "launch" / "evaluate.py"), f"run_dir={tmp_path}"])
    assert proc.returncode == 2 and "run_dir" in proc.stderr
    proc = run_cmd([sys.executable, str(REPO / "launch" / "evaluate.py"), f"compare=[{tmp_path}]"])
    assert proc.returncode == 2 and "evaluate.py run_dir=" in proc.stderr


def test_a_toy_world_run_is_measured_with_the_worlds_readers(tmp_path):
    """toy_world=true: detection, detail-descriptor replication and prompt fidelity of a world run, once only."""
    run_dir, _ = train_in_process(tmp_path / "w", ["max_train_steps=2"])
    cmd = [sys.executable, str(REPO / "launch" / "evaluate.py"), f"run_dir={run_dir}", "toy_world=true",
           "world_evaluation.num_images_per_prompt=1", "world_evaluation.num_unique_prompts=2",
           "world_evaluation.unique_images=1", "world_evaluation.num_inference_steps=2",
           "world_evaluation.fresh_items=20", "world_evaluation.detection_generations=1"]
    proc = run_cmd(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["replication"]["duplicated"]["generations"] == 2          # the world's 2 duplicated items x 1
    assert 0 <= report["fidelity"]["duplicated"]["all"] <= 1 and "auc" in report["detection"]
    assert report["filter"] and "world detail" in report["descriptor"]
    again = run_cmd(cmd)                                                        # never overwritten
    assert again.returncode != 0 and "already holds an evaluation" in again.stderr + again.stdout
