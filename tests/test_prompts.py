"""Prompt files: format, and one clear error (file + line) for each way a file can be wrong."""
import pytest

from megatron_rcm.data.prompts import PromptFileError, read_prompts


def _write(tmp_path, data: bytes):
    path = tmp_path / "prompts.txt"
    path.write_bytes(data)
    return path


def test_one_prompt_per_line_skipping_blanks_and_comments(tmp_path):
    path = _write(tmp_path, "\ufeff# my prompts\r\na cat\r\n\n   \n  # indented comment\n  a dog runs  \n"
                            "\tчайка над морем\n日落时的海滩\n#\nlast line without newline".encode())
    assert read_prompts(path) == ["a cat", "a dog runs", "чайка над морем", "日落时的海滩", "last line without newline"]


@pytest.mark.parametrize("data,message", [
    (b"a cat\nok\n\xff\xfe dog\n", r"prompts.txt, line 3: not UTF-8 \(byte 0xff at column 1\)"),
    (b"a cat\nfine\nbad \x00 line\n", r"prompts.txt, line 3: control character U\+0000"),
    (b"\n# only a comment\n\n", r"prompts.txt holds no prompts"),
    (b"", r"prompts.txt holds no prompts"),
])
def test_bad_files_name_the_file_and_line(tmp_path, data, message):
    with pytest.raises(PromptFileError, match=message):
        read_prompts(_write(tmp_path, data))


def test_missing_file(tmp_path):
    with pytest.raises(PromptFileError, match=r"prompt file .*nope.txt does not exist"):
        read_prompts(tmp_path / "nope.txt")
