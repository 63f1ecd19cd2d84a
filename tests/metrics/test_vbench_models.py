"""Tiny random CLIP and DINO saved with save_pretrained (the real folder layout), the LAION head as a .pth state
dict and a TorchScript interpolator, loaded through the same path as real weights; missing models are reported."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from vbench_fixtures import save_tiny_models, uniform_video

from sfvideo.metrics.vbench import VBenchMetric, VBenchModelPaths, VBenchModels, VideoScorer
from sfvideo.metrics.vbench import preprocess as P


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("vbench_models")
    paths = save_tiny_models(root)
    return root, paths, VBenchModels.load(VBenchModelPaths(**paths))


def _cut_video(seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = (torch.randint(0, 256, (3, 40, 56), generator=g, dtype=torch.uint8) for _ in range(2))
    return torch.stack([a] * 4 + [b] * 4)


def test_tiny_models_load_and_static_video_is_consistent(tiny):
    _, _, models = tiny
    assert set(models.available) == {"subject_consistency", "background_consistency", "temporal_flickering",
                                     "motion_smoothness", "aesthetic_quality"}
    assert set(models.missing) == {"dynamic_degree", "imaging_quality"}
    s = VideoScorer(models).score(uniform_video([77] * 6, h=40, w=56), fps=8)
    for d in ("subject_consistency", "background_consistency"):
        assert s.dimensions[d].value == pytest.approx(1.0, abs=1e-9)  # identical frames -> identical features
    cut = VideoScorer(models).score(_cut_video(), fps=8)
    assert cut.dimensions["subject_consistency"].value < 1.0


def test_clip_tower_equals_full_clip_model_and_aesthetic_formula(tiny):
    """The vision tower (CLIPVisionModelWithProjection) loaded from a whole-CLIP folder gives CLIPModel's own image
    features, i.e. the projection is the checkpoint's, not a random one; the aesthetic score is
    mean((w . e/|e| + b) / 10)."""
    from transformers import CLIPModel

    _, paths, models = tiny
    video = _cut_video(1)
    full = CLIPModel.from_pretrained(paths["clip_l14"]).eval()
    with torch.no_grad():
        ref = full.get_image_features(pixel_values=P.clip_transform(video)).pooler_output
    got = models.clip_l14(video)
    assert torch.allclose(got, ref, atol=1e-6)  # same weights and kernels; batch composition may differ
    sd = torch.load(paths["aesthetic_head"], weights_only=True)
    e = torch.nn.functional.normalize(ref, dim=-1)
    want = ((e @ sd["weight"].T).squeeze(-1) + sd["bias"]) / 10
    s = VideoScorer(models).score(video, fps=8)
    assert s.dimensions["aesthetic_quality"].value == pytest.approx(float(want.mean()), abs=1e-6)
    assert s.dimensions["aesthetic_quality"].curve == pytest.approx(want.tolist(), abs=1e-6)


def test_dino_position_interpolation(tiny):
    """Square input: DINO's position embeddings as stored (transformers' forward unchanged). Non-square (VBench
    resizes the short side to 224 and does not crop): DINO's scale-factor interpolation, close to but not the same
    as transformers' size-based one."""
    from transformers import ViTModel

    _, paths, models = tiny
    ref = ViTModel.from_pretrained(paths["dino"], add_pooling_layer=False).eval()
    sq = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        want = ref(pixel_values=P.dino_transform(sq)).last_hidden_state[:, 0]
    assert torch.allclose(models.dino(sq), want, atol=1e-6)
    wide = torch.randint(0, 256, (2, 3, 48, 84), dtype=torch.uint8)  # -> 224 x 392: 14 x 24 patches
    x = P.dino_transform(wide)
    emb = models.dino.model.embeddings
    dino_pe = emb.interpolate_pos_encoding(torch.zeros(1, 1 + 14 * 24, 16), 224, 392)
    hf_pe = type(emb).interpolate_pos_encoding(emb, torch.zeros(1, 1 + 14 * 24, 16), 224, 392)
    assert dino_pe.shape == hf_pe.shape == (1, 1 + 14 * 24, 16)
    assert not torch.allclose(dino_pe, hf_pe) and (dino_pe - hf_pe).abs().max() < 0.5 * hf_pe.abs().max()
    assert models.dino(wide).shape == (2, 16) and x.shape[-2:] == (224, 392)


def test_missing_models_are_reported_with_reasons(tiny, tmp_path):
    root, paths, _ = tiny
    from transformers import CLIPVisionConfig, CLIPVisionModel

    # A vision-only CLIP without the projection: loading it must fail, not initialise a random projection.
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=224, patch_size=32)).save_pretrained(
        tmp_path / "noproj")
    torch.save(torch.nn.Linear(5, 1).state_dict(), tmp_path / "head5.pth")
    m = VBenchModels.load(VBenchModelPaths(
        dino=str(tmp_path / "nope"), clip_b32=str(tmp_path / "noproj"), clip_l14=paths["clip_l14"],
        aesthetic_head=str(tmp_path / "head5.pth"), musiq=str(tmp_path / "musiq.pth"),
        raft=str(tmp_path / "raft.pth"), interpolator=paths["aesthetic_head"]))
    why = m.missing
    assert "--dino" in why["subject_consistency"] and "no such file or folder" in why["subject_consistency"]
    assert "missing or mismatched" in why["background_consistency"]
    assert "(1, 5)" in why["aesthetic_quality"] and "8-dim" in why["aesthetic_quality"]
    assert "no such file" in why["imaging_quality"] and "no such file" in why["dynamic_degree"]
    assert "TorchScript" in why["motion_smoothness"]
    assert m.available == ("temporal_flickering",)
    (tmp_path / "musiq.pth").write_bytes(b"x")
    (tmp_path / "raft.pth").write_bytes(b"x")
    m2 = VBenchModels.load(VBenchModelPaths(musiq=str(tmp_path / "musiq.pth"), raft=str(tmp_path / "raft.pth")),
                           dimensions=("imaging_quality", "dynamic_degree"))
    if importlib.util.find_spec("pyiqa") is None:
        assert "pyiqa" in m2.missing["imaging_quality"]
    if importlib.util.find_spec("torchvision") is None:
        assert "torchvision" in m2.missing["dynamic_degree"]
    r = _compute(m2)
    assert r["aggregate"]["quality"]["status"] == "partial"
    assert {"imaging_quality", "dynamic_degree"} <= set(r["aggregate"]["quality"]["missing"])


def _compute(models):
    metric = VBenchMetric(models, fps=8, max_frames=4)
    metric.update(uniform_video([0, 0, 0, 0]).unsqueeze(0))
    return metric.compute()


def test_unknown_dimension_is_an_error():
    with pytest.raises(ValueError, match="object_class"):
        VBenchModels.load(dimensions=("object_class",))


def test_coherence_curve_from_models(tiny):
    _, _, models = tiny
    metric = VBenchMetric(models, fps=8, max_frames=8, gaps=(1, 4, 7, 9))
    metric.update(_cut_video(2).unsqueeze(0))
    co = metric.compute()["coherence"]
    assert set(co) == {"dino", "clip_b32"}
    assert co["dino"]["gap"] == [1, 4, 7]  # gap 9 > 8 frames: no pair
    # frames 0-3 are image a, 4-7 image b: at gap 4 and 7 every pair crosses the cut, at gap 1 only one of 7 does
    assert co["dino"]["value"][0] > co["dino"]["value"][1]


def test_hub_ids_need_the_prefix(tmp_path, monkeypatch):
    """A missing local path that looks like ``owner/name`` is an error, not a download; ``hf:owner/name`` is a hub
    id (here offline, so it cannot be fetched and is reported missing)."""
    monkeypatch.chdir(tmp_path)
    m = VBenchModels.load(VBenchModelPaths(dino="facebook/dino-vitb16", clip_b32="hf:openai/clip-vit-base-patch32"),
                          dimensions=("subject_consistency", "background_consistency"))
    assert "no such file or folder" in m.missing["subject_consistency"]
    assert "hf:owner/name" in m.missing["subject_consistency"]
    assert "--clip_b32 hf:openai/clip-vit-base-patch32: cannot" in m.missing["background_consistency"]


def test_raft_path_with_torchvision(tmp_path):
    """Where torchvision imports (not in this project's CPU venv): a torchvision ``raft_large`` state dict loads
    through ``--raft`` and the dynamic degree uses its final flow (20 updates) on padded frames in [-1, 1]."""
    optical_flow = pytest.importorskip("torchvision.models.optical_flow")
    from vbench_fixtures import rolled_texture

    from sfvideo.metrics.vbench import formulas as Fm

    torch.manual_seed(0)
    torch.save(optical_flow.raft_large(weights=None, progress=False).state_dict(), tmp_path / "raft.pth")
    models = VBenchModels.load(VBenchModelPaths(raft=str(tmp_path / "raft.pth")), dimensions=("dynamic_degree",))
    assert not models.missing
    video = rolled_texture(5, 2, h=124, w=124)  # padded to 128, the smallest RAFT input
    s = VideoScorer(models).score(video, fps=8).dimensions["dynamic_degree"]
    x = P.pad_to_multiple(video.float(), 8) / 127.5 - 1
    with torch.no_grad():
        flows = models.raft(x[:-1], x[1:], num_flow_updates=20)[-1]
    thres = Fm.dynamic_params(124, 124, 5)[0]
    assert s.curve == pytest.approx([Fm.top_flow_magnitude(f) / thres for f in flows], rel=1e-4)


def test_musiq_path_with_pyiqa(tmp_path):
    """Where pyiqa imports (not in this project's venv): a MUSIQ state dict (random weights, pyiqa's default
    architecture) loads through ``--musiq`` as VBench builds it, and imaging quality is the per-frame MUSIQ / 100."""
    musiq_arch = pytest.importorskip("pyiqa.archs.musiq_arch")
    torch.manual_seed(0)
    torch.save(musiq_arch.MUSIQ(pretrained=False).state_dict(), tmp_path / "musiq.pth")
    models = VBenchModels.load(VBenchModelPaths(musiq=str(tmp_path / "musiq.pth")), dimensions=("imaging_quality",))
    assert not models.missing
    video = torch.randint(0, 256, (3, 3, 96, 128), dtype=torch.uint8)
    s = VideoScorer(models).score(video, fps=8).dimensions["imaging_quality"]
    with torch.no_grad():
        want = [float(models.musiq(video[i : i + 1].float() / 255)) / 100 for i in range(3)]
    assert s.curve == pytest.approx(want, rel=1e-5)
