"""What the pyfunc model's `pip_requirements` say about medray, for each way medray can be
installed (PEP 610 direct_url.json), and that a local wheel travels inside the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medray.registry import pyfunc


class FakeDist:
    """The two things `medray_requirement` reads from an importlib.metadata Distribution."""

    def __init__(self, direct_url: dict | None, version: str = "0.1.0") -> None:
        self.version = version
        self._raw = None if direct_url is None else json.dumps(direct_url)

    def read_text(self, name: str) -> str | None:
        return self._raw if name == "direct_url.json" else None


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize(
    "direct_url, expected",
    [
        (
            {"url": "https://github.com/org/medray.git",
             "vcs_info": {"vcs": "git", "commit_id": COMMIT, "requested_revision": "main"}},
            f"medray @ git+https://github.com/org/medray.git@{COMMIT}",
        ),
        (
            {"url": "ssh://git@host/org/mono.git", "subdirectory": "medray",
             "vcs_info": {"vcs": "git", "commit_id": COMMIT}},
            f"medray @ git+ssh://git@host/org/mono.git@{COMMIT}#subdirectory=medray",
        ),
        (
            {"url": "https://files.example/medray-0.1.0-py3-none-any.whl",
             "archive_info": {"hashes": {"sha256": "ab" * 32}}},
            f"medray @ https://files.example/medray-0.1.0-py3-none-any.whl#sha256={'ab' * 32}",
        ),
        (
            {"url": "https://files.example/medray-0.1.0.tar.gz",
             "archive_info": {"hash": "sha256=" + "cd" * 32}},
            f"medray @ https://files.example/medray-0.1.0.tar.gz#sha256={'cd' * 32}",
        ),
        (
            {"url": "file:///gone/medray-0.1.0-py3-none-any.whl", "archive_info": {}},
            "medray @ file:///gone/medray-0.1.0-py3-none-any.whl",
        ),
        ({"url": "file:///src/medray", "dir_info": {"editable": True}}, "medray @ file:///src/medray"),
        ({"url": "file:///src/medray", "dir_info": {}}, "medray @ file:///src/medray"),
        (None, "medray==0.1.0"),  # from an index: no direct_url.json
    ],
)  # fmt: skip
def test_requirement_for_each_install_mode(direct_url, expected):
    assert pyfunc.medray_requirement(FakeDist(direct_url)) == (expected, None)


def test_not_installed_pins_the_version():
    import medray

    assert pyfunc.medray_requirement(None) == (f"medray=={medray.__version__}", None)


def test_an_install_from_this_checkout_names_it():
    """`make` installs medray editable (`pip install -e .`): the checkout's file URL."""
    from importlib import metadata

    info = json.loads(metadata.distribution("medray").read_text("direct_url.json") or "{}")
    if "dir_info" not in info:
        pytest.skip("medray is not installed from a local checkout here")
    line, wheel = pyfunc.medray_requirement()
    root = Path(pyfunc.__file__).resolve().parents[3]
    assert (line, wheel) == (f"medray @ {root.as_uri()}", None)


@pytest.mark.filterwarnings("ignore:.*input example.*:UserWarning")
def test_a_local_wheel_is_logged_into_the_model(tmp_path, monkeypatch):
    """`pip install dist/medray-*.whl`: the wheel is copied into the model's artifacts and
    requirements.txt names it by its path inside the model directory."""
    import mlflow

    wheel = tmp_path / "dist" / "medray-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"PK\x05\x06" + b"\0" * 18)  # an empty zip: only copied here
    dist = FakeDist({"url": wheel.as_uri(), "archive_info": {}})
    assert pyfunc.medray_requirement(dist) == (f"artifacts/{wheel.name}", str(wheel))
    real = pyfunc.medray_requirement
    monkeypatch.setattr(pyfunc, "medray_requirement", lambda: real(dist))
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text("{}")
    out = tmp_path / "model"
    mlflow.pyfunc.save_model(path=str(out), **pyfunc.model_kwargs(str(bundle)))
    requirements = (out / "requirements.txt").read_text().splitlines()
    assert f"artifacts/{wheel.name}" in requirements
    assert (out / "artifacts" / wheel.name).read_bytes() == wheel.read_bytes()
    assert not any(r.strip() == "medray" for r in requirements)
