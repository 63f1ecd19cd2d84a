"""Wan transformer checkpoints: every on-disk format loads to the same weights and outputs; bad files fail loudly."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors.torch import save_file

from sfvideo.nn.checkpoint import (
    CheckpointError,
    export_diffusers,
    infer_wan_config,
    load_transformer,
    read_self_forcing_checkpoint,
    strip_wrapper_prefixes,
)

try:  # prefer our own model class; the keys are diffusers' either way
    from sfvideo.nn.wan import WanTransformer as MODEL_CLS
except Exception:  # noqa: BLE001 - nn/wan.py may not exist yet or may be mid-edit
    MODEL_CLS = WanTransformer3DModel


TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=12,
    in_channels=4,
    out_channels=4,
    text_dim=16,
    freq_dim=16,
    ffn_dim=32,
    num_layers=2,
)

# diffusers name -> original Wan name, the inverse of convert_wan_transformer_to_diffusers for a T2V model
# (test_inverse_mapping_inverts_diffusers_converter checks that it is an exact inverse on the tiny model's keys).
_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.to_([qkv])\.", r".\1."),
    (r"\.norm2\.", ".norm3."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
]


def to_original(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in _TO_ORIGINAL:
            k = re.sub(pattern, repl, k)
        out[k] = v
    return out


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = MODEL_CLS(**TINY).eval()
    with torch.no_grad():  # non-trivial values everywhere (diffusers zero-inits nothing here, but be explicit)
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def forward(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """x (B,F,C,H,W); diffusers' class takes (B,C,F,H,W)."""
    with torch.no_grad():
        if isinstance(model, WanTransformer3DModel):
            out = model(x.permute(0, 2, 1, 3, 4), t, ctx, return_dict=False)[0]
            return out.permute(0, 2, 1, 3, 4)
        return model(x, t, ctx)


@pytest.fixture(scope="module")
def reference():
    model = make_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, TINY["in_channels"], 4, 4, generator=g)
    t = torch.tensor([500.0])
    ctx = torch.randn(1, 5, TINY["text_dim"], generator=g)
    return model, (x, t, ctx), forward(model, x, t, ctx)


def assert_same_model(loaded, model, inputs, expected_out):
    ref_sd, got_sd = model.state_dict(), loaded.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    torch.testing.assert_close(forward(loaded, *inputs), expected_out, rtol=0, atol=0)  # same weights and shapes


def test_inverse_mapping_inverts_diffusers_converter(reference):
    model, _, _ = reference
    sd = model.state_dict()
    original = to_original(sd)
    assert "blocks.0.self_attn.q.weight" in original and "head.head.weight" in original
    assert "blocks.1.norm3.weight" in original and "head.modulation" in original
    back = convert_wan_transformer_to_diffusers(dict(original))
    assert back.keys() == sd.keys()
    assert all(back[k] is sd[k] for k in sd)


def test_every_format_loads_to_identical_outputs(tmp_path: Path, reference):
    model, inputs, out = reference
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    original = to_original(sd)
    other = {k: v + 1.0 for k, v in original.items()}  # a different network in the same file

    model.save_pretrained(tmp_path / "diffusers" / "transformer")
    export_diffusers(model, tmp_path / "sharded", max_shard_bytes=4096)
    save_file(original, str(tmp_path / "wan.safetensors"))
    torch.save(original, tmp_path / "wan.pth")
    torch.save(
        {
            "generator": {"model." + k: v for k, v in other.items()},
            "generator_ema": {"model." + k: v for k, v in original.items()},
        },
        tmp_path / "self_forcing.pt",
    )
    lightning = {f"generator.{k}": v for k, v in sd.items()} | {f"critic.{k}": v + 1 for k, v in sd.items()}
    torch.save({"state_dict": lightning}, tmp_path / "lightning.pt")
    fsdp = {
        f"model._fsdp_wrapped_module.{k.replace('blocks.0.', 'blocks.0._orig_mod.')}": v for k, v in original.items()
    }
    torch.save({"generator": fsdp, "critic": {"model." + k: v for k, v in other.items()}}, tmp_path / "fsdp.pt")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1

    cfg = {"attention_head_dim": TINY["attention_head_dim"]}  # head count is not visible in the weights
    sources = [
        (tmp_path / "diffusers", {}, None),  # root with transformer/ subfolder
        (tmp_path / "diffusers" / "transformer", {}, None),
        (tmp_path / "sharded", {}, None),
        (tmp_path / "wan.safetensors", cfg, None),
        (tmp_path / "wan.pth", cfg, None),
        (tmp_path / "self_forcing.pt", cfg, None),  # default picks generator_ema
        (tmp_path / "self_forcing.pt", cfg, "generator_ema"),
        (tmp_path / "fsdp.pt", cfg, "generator"),
    ]
    for source, config, key in sources:
        loaded = load_transformer(source, model_cls=MODEL_CLS, config=config, key=key)
        assert type(loaded) is MODEL_CLS
        assert not loaded.training
        assert dict(loaded.config)["num_attention_heads"] == TINY["num_attention_heads"], source
        assert_same_model(loaded, model, inputs, out)

    loaded = load_transformer(tmp_path / "lightning.pt", model_cls=MODEL_CLS, config=cfg, prefix="generator.")
    assert_same_model(loaded, model, inputs, out)
    with pytest.raises(CheckpointError, match="prefix 'teacher.'"):
        load_transformer(tmp_path / "lightning.pt", model_cls=MODEL_CLS, config=cfg, prefix="teacher.")

    if MODEL_CLS is not WanTransformer3DModel:  # default model_cls is sfvideo.nn.wan.WanTransformer
        assert type(load_transformer(tmp_path / "diffusers")) is MODEL_CLS

    # The other network in the same file really is different (the key selects it).
    gen = load_transformer(tmp_path / "self_forcing.pt", model_cls=MODEL_CLS, config=cfg, key="generator")
    assert not torch.equal(gen.state_dict()["proj_out.weight"], model.state_dict()["proj_out.weight"])


def test_read_self_forcing_checkpoint_strips_wrappers(tmp_path: Path):
    sd = {"blocks.0.self_attn.q.weight": torch.ones(2)}
    torch.save(
        {
            "generator": {
                "model._fsdp_wrapped_module.blocks.0._checkpoint_wrapped_module.self_attn.q.weight": torch.ones(2)
            }
        },
        tmp_path / "c.pt",
    )
    got = read_self_forcing_checkpoint(tmp_path / "c.pt", "generator")
    assert got.keys() == sd.keys()
    with pytest.raises(CheckpointError, match=r"no key 'critic'.*\['generator'\]"):
        read_self_forcing_checkpoint(tmp_path / "c.pt", "critic")
    # DDP's "module." prefix, only when every key has it; a real "model" submodule is kept otherwise
    assert strip_wrapper_prefixes({"module.a.b": 1, "module.c": 2}) == {"a.b": 1, "c": 2}
    assert strip_wrapper_prefixes({"model.a": 1, "b": 2}) == {"model.a": 1, "b": 2}


def test_config_inference_and_head_count(reference):
    model, _, _ = reference
    sd = model.state_dict()
    cfg = infer_wan_config(sd, attention_head_dim=12)
    truth = dict(model.config)
    for k, v in cfg.items():
        assert (tuple(v) if k == "patch_size" else v) == (tuple(truth[k]) if k == "patch_size" else truth[k]), k
    assert {"num_layers", "ffn_dim", "text_dim", "freq_dim", "in_channels", "out_channels", "qk_norm"} <= cfg.keys()
    assert infer_wan_config(sd, num_attention_heads=2)["attention_head_dim"] == 12
    # Default Wan head_dim 128 cannot split a width of 24: the error says how to fix it.
    with pytest.raises(CheckpointError, match="num_attention_heads"):
        infer_wan_config(sd)


def test_bf16_keeps_fp32_islands(tmp_path: Path, reference):
    model, _, _ = reference
    model.save_pretrained(tmp_path / "m")
    loaded = load_transformer(tmp_path / "m", model_cls=MODEL_CLS, dtype=torch.bfloat16)
    sd = loaded.state_dict()
    assert sd["blocks.0.attn1.to_q.weight"].dtype == torch.bfloat16
    if getattr(MODEL_CLS, "_keep_in_fp32_modules", None):
        assert sd["blocks.0.scale_shift_table"].dtype == torch.float32


def test_truncated_files_fail_naming_the_file(tmp_path: Path, reference):
    model, _, _ = reference
    original = to_original(model.state_dict())
    for name, writer in [
        ("w.safetensors", lambda p: save_file(original, str(p))),
        ("w.pt", lambda p: torch.save(original, p)),
    ]:
        path = tmp_path / name
        writer(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError, match=re.escape(str(path))) as err:
            load_transformer(path, model_cls=MODEL_CLS, config={"attention_head_dim": 12})
        assert "\n" not in str(err.value)


def test_shape_mismatch_names_key_shapes_and_file(tmp_path: Path, reference):
    model, _, _ = reference
    original = to_original(model.state_dict())
    original["blocks.1.ffn.0.weight"] = torch.zeros(31, 24)  # block 0 says ffn_dim 32
    path = tmp_path / "bad.safetensors"
    save_file(original, str(path))
    with pytest.raises(CheckpointError) as err:
        load_transformer(path, model_cls=MODEL_CLS, config={"attention_head_dim": 12})
    msg = str(err.value)
    assert "blocks.1.ffn.net.0.proj.weight" in msg and "(31, 24)" in msg and "(32, 24)" in msg and str(path) in msg


def test_missing_and_unexpected_keys_reported(tmp_path: Path, reference):
    model, inputs, _ = reference
    original = to_original(model.state_dict())
    del original["blocks.1.cross_attn.o.bias"]
    original["blocks.0.extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pt"
    torch.save({"generator": {"model." + k: v for k, v in original.items()}}, path)
    cfg = {"attention_head_dim": 12}
    with pytest.raises(
        CheckpointError,
        match=r"missing keys \[blocks\.1\.attn2\.to_out\.0\.bias\].*unexpected keys \[blocks\.0\.extra\.weight\]",
    ):
        load_transformer(path, model_cls=MODEL_CLS, config=cfg)
    with pytest.warns(UserWarning, match="missing keys"):
        loaded = load_transformer(path, model_cls=MODEL_CLS, config=cfg, strict=False)
    assert all(p.device.type == "cpu" for p in loaded.parameters())  # gaps were materialised, not left on meta
    sd = loaded.state_dict()
    assert torch.equal(sd["blocks.1.attn2.to_q.weight"], model.state_dict()["blocks.1.attn2.to_q.weight"])
    assert torch.isfinite(forward(loaded, *inputs)).all()


def test_missing_source_names_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.pt"))):
        load_transformer(tmp_path / "nope.pt", model_cls=MODEL_CLS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        load_transformer(tmp_path / "empty", model_cls=MODEL_CLS)


def test_export_diffusers_round_trip(tmp_path: Path, reference):
    model, inputs, out = reference
    path = export_diffusers(model, tmp_path / "export" / "transformer")
    assert json.loads((path / "config.json").read_text())["_class_name"] == "WanTransformer3DModel"
    assert_same_model(MODEL_CLS.from_pretrained(path).eval(), model, inputs, out)
    if MODEL_CLS is not WanTransformer3DModel:  # our class's export must also open in stock diffusers
        assert WanTransformer3DModel.from_pretrained(path).state_dict().keys() == model.state_dict().keys()

    # From an original-layout state dict plus config, with overwrite; no temporary folders left behind.
    with pytest.raises(FileExistsError, match="already exists"):
        export_diffusers(model, path)
    export_diffusers(to_original(model.state_dict()), path, dict(model.config), overwrite=True, max_shard_bytes=2048)
    assert_same_model(MODEL_CLS.from_pretrained(path).eval(), model, inputs, out)
    assert sorted(p.name for p in path.parent.iterdir()) == ["transformer"]
    with pytest.raises(ValueError, match="config is required"):
        export_diffusers(model.state_dict(), tmp_path / "x")
