"""The dependency direction of docs/design.md: model and maths layers never import Lightning or upper layers."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sfvideo"

# layer -> imports it must not make
FORBIDDEN = {
    "nn": ("lightning", "pytorch_lightning", "sfvideo.training", "sfvideo.diffusion", "sfvideo.losses", "sfvideo.cli"),
    "diffusion": ("lightning", "pytorch_lightning", "sfvideo.training", "sfvideo.losses", "sfvideo.cli"),
    "losses": ("lightning", "pytorch_lightning", "sfvideo.training", "sfvideo.cli"),
    "geometry.py": ("lightning", "pytorch_lightning", "sfvideo."),
}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_does_not_import_upper_layers(layer):
    target = SRC / layer
    files = [target] if target.is_file() else sorted(target.rglob("*.py"))
    assert files, f"no files for layer {layer}"
    bad = [
        f"{f.relative_to(SRC)} imports {name}"
        for f in files
        for name in _imports(f)
        if any(name == p.rstrip(".") or name.startswith(p if p.endswith(".") else p + ".") for p in FORBIDDEN[layer])
    ]
    assert not bad, "\n".join(bad)


def test_no_cuda_calls_in_library_code():
    offenders = [str(f.relative_to(SRC)) for f in SRC.rglob("*.py") if ".cuda()" in f.read_text()]
    assert not offenders, offenders
