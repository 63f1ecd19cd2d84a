import pytest

from sfvideo.data.prompts import PromptStream
from sfvideo.files import read_prompt_file


def test_prompt_file_skips_blank_lines(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n  \nblue square  \n", encoding="utf-8")
    assert read_prompt_file(f) == ["a red circle", "blue square"]


@pytest.mark.parametrize(
    "content, match",
    [(None, "p.txt"), (b"", "p.txt"), (b"\n  \n", "p.txt"), (b"ok\n\xff\xfe bad\n", "p.txt:2")],
)
def test_prompt_file_errors_name_the_file_and_line(tmp_path, content, match):
    f = tmp_path / "p.txt"
    if content is not None:
        f.write_bytes(content)
    with pytest.raises((FileNotFoundError, ValueError), match=match):
        read_prompt_file(f)


def test_stream_is_rank_split_seeded_and_resumable():
    prompts = [f"p{i}" for i in range(10)]
    r0 = iter(PromptStream(prompts, 2, seed=3, rank=0, world_size=2))
    r1 = iter(PromptStream(prompts, 2, seed=3, rank=1, world_size=2))
    a, b = next(r0), next(r1)
    # One shared permutation, disjoint strides: the ranks draw different prompts in one pass.
    assert not set(a["generator"] + a["critic"]) & set(b["generator"] + b["critic"])
    again = iter(PromptStream(prompts, 2, seed=3, rank=0, world_size=2))
    assert next(again) == a
    batches = [next(r0) for _ in range(3)]
    resumed = iter(PromptStream(prompts, 2, seed=3, rank=0, world_size=2, start_batch=2))
    assert next(resumed) == batches[1]  # batch index 2
