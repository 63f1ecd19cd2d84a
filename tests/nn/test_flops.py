"""``nn.flops.wan_forward_flops`` against ``torch.utils.flop_counter.FlopCounterMode`` on real forwards of the debug
transformer: bidirectional, the first cached call of a prompt (text K/V computed) and a later one (cached) against
a view of earlier frames, batch 2. SDPA runs its math backend so the counter sees the attention products."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from sfvideo.nn.flops import wan_forward_flops
from sfvideo.nn.wan import WanTransformer


def _counted(model, *args, **kwargs) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args, **kwargs)
    return counter.get_total_flops()


@pytest.mark.parametrize("batch", [1, 2])
def test_formula_equals_the_flop_counter(batch):
    torch.manual_seed(0)
    model = WanTransformer.from_flavor("debug").eval()
    tpf, text = 2 * 3, 7  # latent 4x6 -> 2x3 tokens per frame
    x = torch.randn(batch, 2, 4, 4, 6)
    t = torch.full((batch,), 500.0)
    context = torch.randn(batch, text, 32)
    config = model.config
    expected = wan_forward_flops(config, frames=2, tokens_per_frame=tpf, text_tokens=text, batch_size=batch)
    assert _counted(model, x, t, context) == expected.total

    cache = model.new_kv_cache(batch, tpf, 6)
    kwargs = dict(kv_cache=cache, attention="block_causal", frames_per_chunk=2)
    first = wan_forward_flops(config, frames=2, key_frames=2, tokens_per_frame=tpf, text_tokens=text,
                              batch_size=batch)
    assert _counted(model, x, t, context, start_frame=0, **kwargs) == first.total
    model(x, t, context, start_frame=2, **kwargs)  # now the cache holds frames 0-3
    later = wan_forward_flops(config, frames=2, key_frames=6, tokens_per_frame=tpf, text_tokens=text,
                              text_cached=True, batch_size=batch)
    assert _counted(model, x, t, context, start_frame=4, **kwargs) == later.total
    assert later.attention > first.attention and later.linear < first.linear  # more keys; no text projections
