"""A regular (non-editable) install holds every subpackage and the shipped data."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_holds_every_subpackage_and_the_shipped_files(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("tram_dist-*.whl"))).namelist())
    packages = {str(p.parent.relative_to(ROOT)) for p in (ROOT / "tram_dist").rglob("__init__.py")}
    for package in packages:
        assert f"{package}/__init__.py" in names, package
    for path in ("tram_dist/kernels/__init__.py", "tram_dist/run/run.py",
                 "tram_dist/data/pretrained/tiny-gpt2-m2d2/model.safetensors",
                 "tram_dist/data/tokenizer/tokenizer.json"):
        assert path in names, path
    assert not any(n.startswith("kernels/") for n in names)  # never a top-level `kernels`
