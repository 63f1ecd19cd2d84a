"""The dependency direction of docs/design.md: each layer imports only the layers below it (and never Lightning
below ``training``)."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sfvideo"

LIGHTNING = ("lightning", "pytorch_lightning")
COMMANDS = ("sfvideo.cli", "sfvideo.generate", "sfvideo.bench", "sfvideo.export", "sfvideo.demo",
            "sfvideo.encode_prompts", "sfvideo.ode_pairs", "sfvideo.reproduce")
ABOVE_INFERENCE = ("sfvideo.training", "sfvideo.data", *COMMANDS)

# layer -> imports it must not make
FORBIDDEN = {
    "geometry.py": (*LIGHTNING, "sfvideo."),
    "files.py": (*LIGHTNING, "sfvideo."),
    "seeding.py": (*LIGHTNING, "sfvideo."),
    "errors.py": (*LIGHTNING, "sfvideo."),
    "nn": (*LIGHTNING, "sfvideo.diffusion", "sfvideo.losses", "sfvideo.config", "sfvideo.checkpoints",
           "sfvideo.inference", "sfvideo.toy", "sfvideo.metrics", *ABOVE_INFERENCE),
    "diffusion": (*LIGHTNING, "sfvideo.losses", "sfvideo.config", "sfvideo.checkpoints", "sfvideo.inference",
                  *ABOVE_INFERENCE),
    "losses": (*LIGHTNING, "sfvideo.config", "sfvideo.checkpoints", "sfvideo.inference", *ABOVE_INFERENCE),
    "config.py": (*LIGHTNING, "sfvideo.losses", "sfvideo.checkpoints", "sfvideo.inference", *ABOVE_INFERENCE),
    "checkpoints.py": (*LIGHTNING, "sfvideo.losses", "sfvideo.inference", *ABOVE_INFERENCE),
    "inference": (*LIGHTNING, "sfvideo.losses", *ABOVE_INFERENCE),
    "toy": (*LIGHTNING, "sfvideo.inference", *ABOVE_INFERENCE),
    "metrics": ("sfvideo.inference", *ABOVE_INFERENCE),
    "training": COMMANDS,
    "data": ("sfvideo.training", *COMMANDS),
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


def test_no_private_names_imported_across_modules():
    offenders = [
        f"{f.relative_to(SRC)} imports {node.module}.{alias.name}"
        for f in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(f.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(("sfvideo", "lightning"))
        for alias in node.names
        if alias.name.startswith("_") and alias.name != "__version__"
    ]
    assert not offenders, "\n".join(offenders)
