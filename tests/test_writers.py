"""The inference writer: the registration written once by default, as an ITK transform that SimpleITK applies to the
moving file as the bundle does; the other layouts on request; warped images in the file's units (HU)."""

from __future__ import annotations

import gzip
import math

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

sitk = pytest.importorskip("SimpleITK")

from elastic_hypermorph_bundle.data.transforms import registration_transforms  # noqa: E402
from elastic_hypermorph_bundle.displacement import image_from_nifti, read_displacement_field, resample  # noqa: E402
from elastic_hypermorph_bundle.hyperparams import HyperSpace  # noqa: E402
from elastic_hypermorph_bundle.metrics import jacobian_determinant, warp_points  # noqa: E402
from elastic_hypermorph_bundle.networks import warp_image, warp_label  # noqa: E402
from elastic_hypermorph_bundle.workflow.writers import InferenceWriter, OutputFiles  # noqa: E402

SHAPE = (24, 20, 16)


def _affine() -> np.ndarray:
    angle = math.radians(10.0)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[math.cos(angle), 0, math.sin(angle)], [0, 1, 0], [-math.sin(angle), 0, math.cos(angle)]])
    affine[:3, :3] = affine[:3, :3] @ np.diag([-1.2, 1.0, 2.5])
    affine[:3, 3] = [40.0, -20.0, -100.0]
    return affine


@pytest.fixture
def pair(tmp_path) -> dict:
    """A registered pair as RegisterStep hands it over: files in int16 HU loaded by the bundle's transforms, a
    smooth field of a few voxels, the step's warped mask (the moving image is warped by the writer alone)."""
    generator = torch.Generator().manual_seed(0)
    smooth = lambda c, s: s * F.interpolate(torch.randn(1, c, 4, 4, 4, generator=generator), size=SHAPE,  # noqa: E731
                                            mode="trilinear", align_corners=True)[0]
    hu = (600.0 * smooth(2, 1.0) - 400.0).clamp(-1024, 1500).round().to(torch.int16).numpy()
    paths = {}
    for index, role in enumerate(("fixed", "moving")):
        paths[f"{role}_image"] = tmp_path / f"{role}.nii.gz"
        nib.save(nib.Nifti1Image(hu[index], _affine()), paths[f"{role}_image"])
        paths[f"{role}_mask"] = tmp_path / f"{role}_mask.nii.gz"
        nib.save(nib.Nifti1Image((hu[index] > -400).astype(np.uint8), _affine()), paths[f"{role}_mask"])
    data = registration_transforms(with_keypoints=False, with_landmarks=False)({k: str(v) for k, v in paths.items()})
    ddf = smooth(3, 0.8)
    return {
        **data,
        "pred": ddf,
        "warped_mask": warp_label(data["moving_mask"][None].as_tensor(), ddf[None])[0],
        "pair_id": "0001_0001",
        "spacing": torch.tensor([1.2, 1.0, 2.5]),
        "hyper": torch.tensor([0.2, 0.05]),
        "runtime": torch.tensor(1.0),
    }


def _write(tmp_path, pair, **options) -> OutputFiles:
    files = OutputFiles(tmp_path / "out")
    writer = InferenceWriter(files, [pair["pair_id"]], hyper_space=HyperSpace(), **options)
    files.run(lambda: writer.write_pair(pair))
    return files


def _array(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


def test_default_writes_the_registration_once_as_a_transform_itk_applies_as_the_bundle(tmp_path, pair):
    files = _write(tmp_path, pair, preview=False)
    out = files.root / "0001_0001"
    assert sorted(p.name for p in out.iterdir()) == ["transform.nii.gz", "warped_image.nii.gz", "warped_mask.nii.gz"]
    assert not (files.root / "submission").exists()
    # the warped image is in the file's units and type (HU, int16), and ITK warps the moving file to the same image
    warped = _array(out / "warped_image.nii.gz")
    assert warped.dtype == np.int16 and warped.min() < -300
    transform, grid = read_displacement_field(out / "transform.nii.gz")
    moving = image_from_nifti(tmp_path / "moving.nii.gz")
    by_itk = sitk.GetArrayFromImage(resample(moving, transform, grid)).transpose(2, 1, 0)
    target = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")) + pair["pred"].numpy()
    inside = np.all([(target[a] >= 0) & (target[a] <= SHAPE[a] - 1) for a in range(3)], axis=0)
    assert inside.mean() > 0.5 and np.abs(by_itk[inside].astype(float) - warped[inside]).max() <= 1  # HU, rounding
    assert np.allclose(nib.load(out / "warped_image.nii.gz").affine, _affine())
    # the mask: nearest, the step's own warp, as uint8 labels
    assert np.array_equal(_array(out / "warped_mask.nii.gz"), pair["warped_mask"][0].numpy().astype(np.uint8))


def test_the_written_warped_image_is_the_hu_file_shifted_by_the_written_field(tmp_path, pair):
    """A known field, 1.5 voxels along x everywhere: the written warped image is the moving file's HU values (float32
    here, no rounding) halfway between voxels x + 1 and x + 2, the last voxel repeated beyond the edge; the written
    transform is that shift in mm, and ITK applying it to the moving file gives the same image."""
    moving = (pair["moving_image"].as_tensor()[0].numpy() * 1500 - 1000).astype(np.float32)  # any HU volume
    path = tmp_path / "moving_float.nii.gz"
    nib.save(nib.Nifti1Image(moving, _affine()), path)
    pair["moving_image"].meta["filename_or_obj"] = str(path)
    pair["pred"] = torch.zeros(3, *SHAPE).index_fill_(0, torch.tensor([0]), 1.5)
    pair.pop("moving_mask")
    out = _write(tmp_path, pair, preview=False).root / "0001_0001"
    warped = _array(out / "warped_image.nii.gz")
    assert warped.dtype == np.float32
    np.testing.assert_allclose(warped[:-2], (moving[1:-1] + moving[2:]) / 2, rtol=0, atol=1e-3)
    np.testing.assert_allclose(warped[-2:], np.broadcast_to(moving[-1], warped[-2:].shape), rtol=0, atol=1e-3)
    field = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "transform.nii.gz"), sitk.sitkVectorFloat64))
    lps = np.diag([-1.0, -1.0, 1.0]) @ _affine()[:3, :3] @ np.array([1.5, 0.0, 0.0])  # mm, ITK's world
    np.testing.assert_allclose(field.reshape(-1, 3), np.broadcast_to(lps, (math.prod(SHAPE), 3)), atol=1e-5)
    transform, grid = read_displacement_field(out / "transform.nii.gz")
    by_itk = sitk.GetArrayFromImage(resample(image_from_nifti(path), transform, grid)).transpose(2, 1, 0)
    np.testing.assert_allclose(by_itk[:-2], warped[:-2], rtol=0, atol=1e-2)


def test_the_preview_is_the_picture_of_the_whole_warp_of_the_registered_images(tmp_path, pair):
    """The preview warps the moving image (as registered, the network's window) at its three cuts only: the same
    PNG, byte for byte, as the one drawn from the whole warped volume (the registration step's warp before)."""
    from elastic_hypermorph_bundle.visualize import save_pair_png

    written = (_write(tmp_path, pair).root / "0001_0001" / "preview.png").read_bytes()
    whole = warp_image(pair["moving_image"][None].as_tensor(), pair["pred"][None])[0, 0]
    expected = save_pair_png(tmp_path / "expected.png", pair["fixed_image"][0], pair["moving_image"][0], warped=whole,
                             ddf=pair["pred"], spacing=pair["spacing"].tolist(), window=(0.0, 1.0),
                             title="pair 0001_0001, λ = 0.2, μ = 0.05", fixed_mask=pair["fixed_mask"][0],
                             moving_mask=pair["moving_mask"][0])
    assert written == expected.read_bytes()


def test_the_other_layouts_on_request(tmp_path, pair):
    files = _write(tmp_path, pair, transform=False, warped=False, preview=False, ddf=True, submission=True,
                   jacobian=True, submission_dtype="int16", compression_level=0)
    out = files.root / "0001_0001"
    assert sorted(p.name for p in out.iterdir()) == ["ddf.nii.gz", "jacobian.nii.gz"]
    ddf = pair["pred"].movedim(0, -1).numpy()
    np.testing.assert_allclose(nib.load(out / "ddf.nii.gz").get_fdata(), ddf, atol=1e-6)
    submission = nib.load(files.root / "submission" / "disp_0001_0001.nii.gz")
    assert submission.get_data_dtype() == np.int16 and np.allclose(submission.affine, _affine())
    assert np.abs(submission.get_fdata() - ddf).max() <= np.abs(ddf).max() / 32000  # scaled int16: half the size
    det = nib.load(out / "jacobian.nii.gz").get_fdata()
    np.testing.assert_allclose(det[2:-2, 2:-2, 2:-2], jacobian_determinant(pair["pred"][None].double())[0], atol=1e-5)
    assert det.shape == SHAPE


def test_the_mask_is_warped_once_where_its_file_holds_the_loaded_voxels(tmp_path, pair):
    """The registration step's warp of the loaded mask is written as it is when the file on the fixed grid holds the
    voxels that were loaded (a stand-in result shows it was taken); a file whose voxels differ from the loaded ones
    is warped from the file."""
    stand_in = torch.zeros_like(pair["warped_mask"])
    stand_in[0, :4] = 1
    taken = _array(_write(tmp_path / "taken", {**pair, "warped_mask": stand_in}, preview=False).root
                   / "0001_0001" / "warped_mask.nii.gz")
    assert np.array_equal(taken, stand_in[0].numpy().astype(np.uint8))
    other = pair["moving_mask"].clone()
    other[0, 0, 0, 0] = 1 - other[0, 0, 0, 0]
    warped = _array(_write(tmp_path / "file", {**pair, "moving_mask": other, "warped_mask": stand_in}, preview=False).root
                    / "0001_0001" / "warped_mask.nii.gz")
    assert np.array_equal(warped, pair["warped_mask"][0].numpy().astype(np.uint8))


def test_fields_are_stored_and_images_compressed_by_default_one_level_for_all_on_request(tmp_path, pair):
    """Without a level the transform (float32 vectors, which deflate little) is a stored gzip stream, at least the
    size of its data, while the mask is deflated; ``compression_level`` sets every file's level."""
    def sizes(root):
        files = {name: root / "0001_0001" / f"{name}.nii.gz" for name in ("transform", "warped_mask")}
        return {name: (path.stat().st_size, len(gzip.decompress(path.read_bytes()))) for name, path in files.items()}

    default = sizes(_write(tmp_path / "default", pair, preview=False).root)
    level_1 = sizes(_write(tmp_path / "level_1", pair, preview=False, compression_level=1).root)
    assert default["transform"][0] >= default["transform"][1] > level_1["transform"][0]
    assert default["warped_mask"][0] < default["warped_mask"][1] / 2 and level_1["warped_mask"] == default["warped_mask"]


def test_bad_options_are_refused(tmp_path):
    files = OutputFiles(tmp_path / "out")
    with pytest.raises(ValueError, match="submission_dtype must be one of"):
        InferenceWriter(files, submission_dtype="float16")
    with pytest.raises(ValueError, match="compression_level must be an integer from 0 to 9 \\(or null\\), got 11"):
        InferenceWriter(files, compression_level=11)
    with pytest.raises(ValueError, match="write_jacobian must be true or false"):
        InferenceWriter(files, jacobian="maybe")


def test_a_moving_file_on_another_grid_is_warped_through_both_grids(tmp_path, pair):
    """The same moving volume stored flipped along x (its affine says so): a different file grid for the same
    anatomy, so the warped image must equal the one of the unflipped file (warped by ITK through both grids)."""
    expected = _array(_write(tmp_path / "same", pair, preview=False).root / "0001_0001" / "warped_image.nii.gz")
    moving = nib.load(tmp_path / "moving.nii.gz")
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1, SHAPE[0] - 1
    flipped = tmp_path / "moving_flipped.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(moving.dataobj)[::-1].copy(), moving.affine @ flip), flipped)
    pair["moving_image"].meta["filename_or_obj"] = str(flipped)
    pair.pop("moving_mask")
    warped = _array(_write(tmp_path / "flipped", pair, preview=False).root / "0001_0001" / "warped_image.nii.gz")
    target = np.stack(np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")) + pair["pred"].numpy()
    inside = np.all([(target[a] >= 0) & (target[a] <= SHAPE[a] - 1) for a in range(3)], axis=0)
    assert np.abs(warped[inside].astype(float) - expected[inside]).max() <= 1


def test_the_summary_names_the_folder_the_files_and_the_pairs_tre(tmp_path, pair, caplog):
    """One line at the end: where, which files (only those written), seconds per pair, and the TRE of a pair given
    corresponding points (here a point moved by exactly the field: TRE 0 after, the displacement before)."""
    from ignite.engine import Engine

    fixed_points = torch.tensor([[8.0, 9.0, 7.0], [12.0, 6.0, 9.0]])
    moved = warp_points(pair["pred"], fixed_points)
    pair.pop("moving_mask")
    files = OutputFiles(tmp_path / "out")
    writer = InferenceWriter(files, [pair["pair_id"]], preview=False, warped=False)
    engine = Engine(lambda engine, batch: [dict(pair, fixed_keypoints=fixed_points, moving_keypoints=moved)])
    writer.attach(engine)
    with caplog.at_level("INFO", logger="elastic_hypermorph_bundle"):
        files.run(lambda: engine.run([0], max_epochs=1))
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("registered")]
    before = torch.linalg.norm((moved - fixed_points) * pair["spacing"], dim=1).mean().item()
    assert f"registered 1 pair(s), 1.0 s per pair, TRE 0.00 mm (before {before:.2f} mm" in line
    assert line.endswith(f"outputs in {files.root}: <pair>/transform.nii.gz")


def _engine_run(files: OutputFiles, pairs: list[dict], fail_at: int | None = None, **options) -> None:
    """An engine whose iteration hands over ``pairs`` one by one (raising a ValueError at ``fail_at``), writing
    them with an InferenceWriter."""
    from ignite.engine import Engine

    def step(engine, index):
        if index == fail_at:
            raise ValueError(f"registration of pair {index} failed")
        return [pairs[index]]

    engine = Engine(step)
    InferenceWriter(files, [p["pair_id"] for p in pairs], hyper_space=HyperSpace(), **options).attach(engine)
    files.run(lambda: engine.run(list(range(len(pairs))), max_epochs=1))


def _three(pair) -> list[dict]:
    return [dict(pair, pair_id=f"000{k}_000{k}", pred=pair["pred"] * (k + 1) / 3) for k in range(3)]


def _bytes(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_writing_in_the_background_writes_the_same_files(tmp_path, pair):
    """The files of pairs written by the background thread while the next pair comes are byte for byte those
    written in place, and the summary line comes once they are all written."""
    outputs = {}
    for background in (False, True):
        files = OutputFiles(tmp_path / f"out_{background}")
        _engine_run(files, _three(pair), ddf=True, jacobian=True, preview=False, background=background)
        outputs[background] = _bytes(files.root)
    assert len(outputs[True]) == 3 * 5 + 1 and outputs[True] == outputs[False]


def test_a_failed_background_write_fails_the_run_with_one_line_and_leaves_no_file(tmp_path, pair, monkeypatch):
    """A full disk while pair 2's files are written in the background: the run stops with the clean NoSpaceError
    naming the pair, raised in the run's own thread, and neither the output folder nor a staging folder is left."""
    import errno

    from elastic_hypermorph_bundle.atomic import NoSpaceError

    original = InferenceWriter.write_file

    def write_file(self, kind, path, pair, *args):
        if pair["pair_id"] == "0001_0001" and kind == "moving_image":
            path.write_bytes(b"half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, kind, path, pair, *args)

    monkeypatch.setattr(InferenceWriter, "write_file", write_file)
    files = OutputFiles(tmp_path / "out")
    with pytest.raises(NoSpaceError, match=r"^no space left on .*\(writing the outputs of pair 0001_0001\)"):
        _engine_run(files, _three(pair), preview=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["fixed.nii.gz", "moving.nii.gz", "fixed_mask.nii.gz",
                                                                 "moving_mask.nii.gz"])


def test_a_failed_registration_waits_for_the_background_write_and_leaves_no_file(tmp_path, pair, monkeypatch):
    """The run fails while pair 1's files are still being written: the failure waits for the writer thread, so
    no file lands in the deleted staging folder, and the output folder is never made."""
    import time

    original = InferenceWriter.write_files

    def slow(self, *args):
        time.sleep(0.5)
        return original(self, *args)

    monkeypatch.setattr(InferenceWriter, "write_files", slow)
    with pytest.raises(ValueError, match="registration of pair 1 failed"):
        _engine_run(OutputFiles(tmp_path / "out"), _three(pair), fail_at=1, preview=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.staging-*"))
