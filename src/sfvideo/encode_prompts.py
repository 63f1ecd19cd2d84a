"""``sfvideo encode-prompts``: precompute umT5 embeddings of a prompt file (plus the negative prompt) to disk."""

from __future__ import annotations

from collections.abc import Sequence

from sfvideo.nn.prompt_embeddings import precompute_prompt_embeddings
from sfvideo.nn.umt5 import UMT5TextEncoder


def main(argv: Sequence[str] | None = None) -> None:
    """``sfvideo encode-prompts``: precompute umT5 embeddings of a prompt file (plus the negative prompt)."""
    from sfvideo.errors import ArgParser, fail

    p = ArgParser(prog="sfvideo encode-prompts", description=main.__doc__)
    p.add_argument("--model", required=True, help="diffusers Wan folder (text_encoder/ + tokenizer/) or hub id")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--negative_prompt", default="", help="also encode this prompt (the CFG branch)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        encoder = UMT5TextEncoder(args.model, dtype=args.dtype, device=args.device)
        # The CFG branch is looked up like any prompt, so it is stored with them.
        extra = [args.negative_prompt] if args.negative_prompt else []
        precompute_prompt_embeddings(encoder, args.prompts, args.out, args.batch_size, extra_prompts=extra)
    except (FileNotFoundError, ValueError, OSError) as e:
        fail("sfvideo encode-prompts", e)
    print(f"wrote {args.out}")
