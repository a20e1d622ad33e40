"""`python -m datasets.prepare`: downloads (faked here), manual instructions, layout report."""

import io
import os
import posixpath
import tarfile
import urllib.error
import urllib.request
import zipfile

import gdown
import pytest

from datasets import get_spec, load_dataset
from datasets.prepare import TASKS, main
from datasets.specs import SPECS
from tests.image_trees import DATASET_TREES, split_file_tree, write_classnames


def tar_gz(files):
    """Bytes of a .tar.gz holding {archive path: local file}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, path in files.items():
            archive.add(path, arcname=name)
    return buffer.getvalue()


def files_under(folder, prefix):
    """{prefix/relative path: path} for every file under folder."""
    found = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(directory, name)
            found[posixpath.join(prefix, os.path.relpath(path, folder))] = path
    return found


class FakeNetwork:
    """Serves URLs and Google Drive ids from memory and records what was asked."""

    def __init__(self, monkeypatch, urls=None, drive=None):
        self.urls, self.drive, self.requests = urls or {}, drive or {}, []
        monkeypatch.setattr(urllib.request, "urlopen", self.urlopen)
        monkeypatch.setattr(gdown, "download", self.gdown)

    def urlopen(self, url, timeout=None):
        self.requests.append(url)
        if url not in self.urls:
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        return io.BytesIO(self.urls[url])

    def gdown(self, id=None, output=None, quiet=False):
        self.requests.append(f"gdrive:{id}")
        if id not in self.drive:
            raise ConnectionError("Failed to resolve 'drive.google.com'")
        with open(output, "wb") as file:
            file.write(self.drive[id])
        return output


def drive_id_of_split_file(name):
    task = next(t for t in TASKS[name] if t.produces.endswith(SPECS[name].split_file))
    return task.steps[0].source[len("gdrive:"):]


def url_of(name, produces):
    task = next(t for t in TASKS[name] if t.produces == produces)
    return task.steps[0].source


def test_offline_prepare_explains_what_to_fetch_without_a_traceback(tmp_path, monkeypatch, capsys):
    network = FakeNetwork(monkeypatch)
    assert main(["caltech101", "--root", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip" in out
    drive_id = drive_id_of_split_file("Caltech101")
    assert f"https://drive.google.com/file/d/{drive_id}/view to caltech-101/split_zhou_Caltech101.json" in out
    assert network.requests == ["https://data.caltech.edu/records/mzrjq-6wc02/files/caltech-101.zip", f"gdrive:{drive_id}"]
    assert f"{tmp_path}/caltech-101/101_ObjectCategories does not exist" in err  # the layout check still runs
    assert "python -m datasets.prepare caltech101" in err


def test_check_reports_images_per_split(tmp_path, capsys):
    DATASET_TREES["DescribableTextures"](tmp_path)
    assert main(["dtd", "--root", str(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out
    assert "train: 25 images listed, 25 found, 0 missing (published: 2820)" in out
    assert "val: 15 images listed, 15 found, 0 missing" in out and "test: 12 images listed" in out
    assert "Complete." in out


def test_check_counts_and_names_missing_images(tmp_path, capsys, monkeypatch):
    network = FakeNetwork(monkeypatch)
    expected = DATASET_TREES["FGVCAircraft"](tmp_path)
    for path, _, _ in expected["val"][:2]:
        os.remove(path)
    assert main(["fgvc_aircraft", "--root", str(tmp_path), "--check"]) == 1
    out = capsys.readouterr().out
    assert f"val: 15 images listed, 13 found, 2 missing (published: 3333); first missing: {expected['val'][0][0]}" in out
    assert "Incomplete" in out and network.requests == []  # --check never downloads


@pytest.mark.parametrize("name", ["ImageNet", "ImageNetV2", "ImageNetA"])
def test_check_counts_folder_datasets(name, tmp_path, capsys):
    expected = DATASET_TREES[name](tmp_path)
    assert main([name, "--root", str(tmp_path), "--check"]) == 0
    out = capsys.readouterr().out
    for split, rows in expected.items():
        assert f"{split}: {len(rows)} images listed, {len(rows)} found, 0 missing" in out
    assert not os.path.exists(get_spec(name).path(str(tmp_path), "preprocessed.pkl"))  # a check writes nothing


def test_check_of_an_empty_root_shows_the_layout(tmp_path, capsys):
    assert main(["imagenet", "--root", str(tmp_path), "--check"]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path}/imagenet does not exist" in err and "images/" in err and "classnames.txt" in err


def test_unknown_name_is_a_usage_error(tmp_path, capsys):
    assert main(["imagenet1k", "--root", str(tmp_path)]) == 2
    assert "Unknown dataset 'imagenet1k'" in capsys.readouterr().err


def test_downloads_and_unpacks_an_archive_and_a_split_file(tmp_path, monkeypatch):
    source = tmp_path / "source"
    DATASET_TREES["DescribableTextures"](source)
    spec = get_spec("DescribableTextures")
    with open(spec.path(str(source), spec.split_file), "rb") as file:
        split_bytes = file.read()
    archive = tar_gz(files_under(spec.path(str(source), "images"), "dtd/images"))
    network = FakeNetwork(
        monkeypatch,
        urls={url_of("DescribableTextures", "dtd/images"): archive},
        drive={drive_id_of_split_file("DescribableTextures"): split_bytes},
    )
    root = str(tmp_path / "data")
    assert main(["dtd", "--root", root]) == 0
    assert len(network.requests) == 2
    assert not os.path.exists(os.path.join(root, "dtd-r1.0.1.tar.gz"))  # unpacked archives are deleted
    ours, theirs = load_dataset("dtd", root), load_dataset("dtd", str(source))
    assert [os.path.relpath(r.impath, root) for r in ours.train_x] == [os.path.relpath(r.impath, source) for r in theirs.train_x]

    network.requests.clear()
    assert main(["dtd", "--root", root]) == 0
    assert network.requests == []  # nothing is fetched twice


def test_fgvc_archive_data_folder_becomes_the_dataset_folder(tmp_path, monkeypatch):
    source = tmp_path / "source"
    DATASET_TREES["FGVCAircraft"](source)
    archive = tar_gz(files_under(get_spec("FGVCAircraft").dataset_dir(str(source)), "fgvc-aircraft-2013b/data"))
    FakeNetwork(monkeypatch, urls={url_of("FGVCAircraft", "fgvc_aircraft"): archive})
    root = str(tmp_path / "data")
    assert main(["fgvc_aircraft", "--root", root]) == 0
    assert len(load_dataset("fgvc_aircraft", root).test) == 12


def test_caltech_inner_archive_is_unpacked(tmp_path, monkeypatch):
    source = tmp_path / "source"
    split_file_tree(source, "caltech-101", "101_ObjectCategories", "Caltech101", ["accordion", "airplane", "anchor"],
                    lambda label, name, split, serial: f"{name}/image_{serial:04d}.jpg")
    spec = get_spec("Caltech101")
    inner = tar_gz(files_under(spec.path(str(source), "101_ObjectCategories"), "101_ObjectCategories"))
    outer = io.BytesIO()
    with zipfile.ZipFile(outer, "w") as archive:  # caltech-101.zip wraps the tar.gz in a caltech-101/ folder
        archive.writestr("caltech-101/101_ObjectCategories.tar.gz", inner)
        archive.writestr("caltech-101/Annotations.tar", b"")
    with open(spec.path(str(source), spec.split_file), "rb") as file:
        split_bytes = file.read()
    FakeNetwork(monkeypatch, urls={url_of("Caltech101", "caltech-101/101_ObjectCategories"): outer.getvalue()},
                drive={drive_id_of_split_file("Caltech101"): split_bytes})
    root = str(tmp_path / "data")
    assert main(["caltech101", "--root", root]) == 0
    assert load_dataset("caltech101", root).classnames == ["accordion", "airplane", "anchor"]


def test_html_instead_of_a_split_file_is_refused(tmp_path, monkeypatch, caplog):
    DATASET_TREES["EuroSAT"](tmp_path)
    spec = get_spec("EuroSAT")
    split_path = spec.path(str(tmp_path), spec.split_file)
    os.remove(split_path)
    FakeNetwork(monkeypatch, drive={drive_id_of_split_file("EuroSAT"): b"<html>Too many users have viewed</html>"})
    assert main(["eurosat", "--root", str(tmp_path)]) == 1
    assert not os.path.exists(split_path) and not os.path.exists(split_path + ".partial")
    assert "did not return JSON" in caplog.text


def test_variant_copies_imagenet_classnames_instead_of_downloading(tmp_path, monkeypatch):
    source = tmp_path / "source"
    DATASET_TREES["ImageNetA"](source)
    image_dir = get_spec("ImageNetA").path(str(source), "imagenet-a")
    network = FakeNetwork(monkeypatch, urls={
        url_of("ImageNetA", "imagenet-adversarial/imagenet-a"): tar_gz(files_under(image_dir, "imagenet-a")),
    })
    root = tmp_path / "data"
    write_classnames(str(root / "imagenet" / "classnames.txt"))
    assert main(["imagenet_a", "--root", str(root)]) == 0
    assert not any(request.startswith("gdrive:") for request in network.requests)
    assert load_dataset("imagenet_a", str(root)).classnames == load_dataset("imagenet_a", str(source)).classnames


def test_synthetic_dataset_is_generated(tmp_path):
    assert main(["synthetic_shapes", "--root", str(tmp_path)]) == 0
    assert load_dataset("SyntheticShapes", str(tmp_path)).num_classes == 10


@pytest.mark.parametrize("name", list(SPECS))
def test_every_required_path_has_a_task(name):
    """A task must create (or contain) each required path, else prepare could never finish."""
    spec = SPECS[name]
    produced = [task.produces for task in TASKS[name]]
    for entry in spec.entries:
        if entry.required:
            path = posixpath.join(spec.folder, entry.path.rstrip("/"))
            assert any(path == target or path.startswith(target + "/") for target in produced), path
