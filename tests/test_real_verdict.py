"""The "real" verdict (no sign of generation): camera images are a manifest role, `calibrate` fits the rule
from them, and a calibrated store answers `real` for held-out photographs while still accepting held-out
generated images. The photographs are real ones shipped with scikit-learn and matplotlib."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import engine
from engine import Options
from engine.manifest import read_manifest, real_rows
from tests.helpers import dataset_subset, run_cli

ONE = Options(per_source=1, adaptive=False)


def photographs() -> dict[str, Path]:
    """Real camera photographs that ship inside installed packages (no download)."""
    import matplotlib
    import sklearn.datasets

    shipped = Path(sklearn.datasets.__file__).parent / "images"
    found = {"china": shipped / "china.jpg", "flower": shipped / "flower.jpg",
             "hopper": Path(matplotlib.__file__).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"}
    missing = [str(p) for p in found.values() if not p.is_file()]
    if missing:
        pytest.skip(f"sample photographs not installed: {', '.join(missing)}")
    return found


def crops(photo: Path, folder: Path, n: int, tag: str) -> list[Path]:
    """n square crops at several places and scales, saved as 64 px PNGs (the zoo's size)."""
    out = []
    with Image.open(photo) as im:
        im = im.convert("RGB")
        w, h = im.size
        for i in range(n):
            side = int(min(w, h) * (0.5 + 0.1 * (i % 4)))
            x, y = (w - side) * ((i * 37) % 11) // 10, (h - side) * ((i * 53) % 7) // 6
            path = folder / f"{tag}-{i}.png"
            im.crop((x, y, x + side, y + side)).resize((64, 64), Image.Resampling.LANCZOS).save(path)
            out.append(path)
    return out


@pytest.fixture(scope="module")
def labelled(zoo_dataset, tmp_path_factory) -> Path:
    """The zoo's labelled set (3 descriptions) plus 12 camera crops of role "real" (empty source column)."""
    root = tmp_path_factory.mktemp("real-set")
    manifest = dataset_subset(zoo_dataset, root, 3)
    photos = photographs()
    (root / "real").mkdir()
    real = crops(photos["china"], root / "real", 6, "china") + crops(photos["flower"], root / "real", 6, "flower")
    with open(manifest, "a") as handle:
        for path in real:
            handle.write(json.dumps({"image": path.relative_to(root).as_posix(), "source": "", "description": "",
                                     "role": "real"}) + "\n")
    return manifest


def test_a_store_calibrated_with_real_images_answers_real_for_held_out_photographs(
        labelled, store_dir, originals, tmp_path, capsys):
    # The manifest role: read only where asked, so ingest and the labelled sets never see a "real" source.
    assert len(real_rows(labelled)) == 12 and all(r.role != "real" for r in read_manifest(labelled))
    assert run_cli("ingest", labelled, "--store", store_dir, "--quiet") == 0
    capsys.readouterr()
    assert run_cli("calibrate", labelled, "--store", store_dir, "--quiet") == 0
    assert "real verdict: 12 real references" in capsys.readouterr().out
    with engine.open(store_dir) as ws:
        assert "real" not in {s.name for s in ws.sources()}
        rule = ws.calibration.real
        assert rule["references"] == 12 and rule["measured"]["generated_called_real"] <= 0.05
        assert (ws.store.root / rule["references_file"]).is_file()

        # Held-out photographs (another photograph entirely): answered real, the ranking kept beside it.
        held_out = crops(photographs()["hopper"], tmp_path, 4, "hopper")
        report = ws.attribute(held_out, "a photograph", ONE)
        for result in report.results:
            assert result.verdict == "real", result.evidence
            assert result.evidence["real"]["real"] and result.evidence["open_set_verdict"] in ("known", "unknown")
            assert result.predicted is not None and result.scores and result.unknown is None
            assert result.verdict_text.startswith("real: no sign of generation")

        # Held-out generated images (seeds no labelled image used): not called real.
        generated = [o for o in originals if o["prompt"] in {originals[0]["prompt"], originals[1]["prompt"]}]
        assert len({o["source"] for o in generated}) == 5  # every source, two descriptions
        results = ws.attribute([o["image"] for o in generated], [o["prompt"] for o in generated], ONE).results
        called_real = [r.query for r in results if r.verdict == "real"]
        assert not called_real, called_real
        assert all(r.evidence["real"]["real"] is False for r in results)

    capsys.readouterr()
    page = tmp_path / "case.html"
    assert run_cli("attribute", held_out[0], "--prompt", "a photograph", "--store", store_dir, "--quiet",
                   "--per-source", 1, "--report", page) == 0
    assert "real: no sign of generation" in capsys.readouterr().out
    assert "<span class='badge real'>real</span> <strong>real: no sign of generation" in page.read_text()


def test_a_real_row_needs_no_source_or_description_but_a_known_role(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"image": "a.png", "source": "", "description": "", "role": "real"}) + "\n")
    (row,) = real_rows(path)
    assert (row.role, row.source) == ("real", "real")
    path.write_text(json.dumps({"image": "a.png", "source": "x", "description": "d", "role": "camera"}) + "\n")
    with pytest.raises(engine.UserError, match="role must be original, resynthesis or real"):
        read_manifest(path)


def test_evaluate_reports_the_real_image_false_positive_rate(labelled, models, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run_cli("evaluate", labelled, "--clip-config", models["clip_config"], "--clip-checkpoint",
                   models["clip_checkpoint"], "--out", out, "--layers", "final", "--draws", "1", "--quiet") == 0
    real = json.loads((out / "report.json").read_text())["real_images"]
    assert real["real_images"] == 12 and real["generated_originals"] == 15 and real["folds"] == 2
    assert real["false_positive_rate"] + real["real_called_real"] == pytest.approx(1)
    assert "Real (camera) images" in (out / "report.md").read_text()
    assert "real images (12, 2-fold" in capsys.readouterr().out


def test_real_image_figures_by_hand():
    from engine.evaluation.realimages import real_image_figures

    rng = np.random.default_rng(0)
    gen_dir, real_dir = np.eye(8)[0], np.eye(8)[1]
    originals = gen_dir + 0.05 * rng.standard_normal((20, 8))
    resyntheses = gen_dir + 0.05 * rng.standard_normal((40, 8))
    real = real_dir + 0.05 * rng.standard_normal((10, 8))
    got = real_image_figures(originals, resyntheses, real, 0.05)
    assert got["false_positive_rate"] == 0 and got["auroc"] == 1 and got["generated_called_real"] <= 0.1
    # real photos that look like the generated ones: all mistaken
    got = real_image_figures(originals, resyntheses, gen_dir + 0.05 * rng.standard_normal((10, 8)), 0.05)
    assert got["false_positive_rate"] > 0.5
    assert "not_measured" in real_image_figures(originals, resyntheses, real[:1], 0.05)
