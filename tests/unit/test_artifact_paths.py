"""Which artifact paths, directories, prefixes and digests a run may use, and why the others are refused."""

from __future__ import annotations

import pytest

from runledger_server.domain import artifact_paths
from runledger_server.domain.errors import InvalidArgument

VALID = [
    "model.safetensors",
    "adapter/adapter_model.safetensors",
    "a/b/c/d.bin",
    "checkpoints/step-100/optimizer.pt",
    ".hidden",
    "..dots/x",  # only whole `..` segments are refused
    "a/...",
    "spaces are fine.txt",
    "ünïcödé/文件.bin",
    "a" * 255,
    "/".join(["x" * 200] * 5)[:1024].rstrip("/"),
]

INVALID = [
    ("", "is empty"),
    ("/etc/passwd", "absolute"),
    ("../escape", "'..' segment"),
    ("a/../b", "'..' segment"),
    ("a/..", "'..' segment"),
    ("./a", "'.' segment"),
    ("a/./b", "'.' segment"),
    ("a//b", "empty segment"),
    ("a/", "empty segment"),
    ("a\\b", "backslash"),
    ("a\x00b", "NUL"),
    ("a\nb", "control character"),
    ("a\tb", "control character"),
    ("x" * 1025, "longer than 1024"),
    ("a/" + "y" * 256, "segment longer than 255 bytes"),
    ("é" * 128, "segment longer than 255 bytes"),  # 256 bytes in UTF-8
]


@pytest.mark.parametrize("path", VALID)
def test_valid_file_paths_are_kept_as_given(path: str) -> None:
    assert artifact_paths.file_path(path) == path


@pytest.mark.parametrize(("path", "problem"), INVALID)
def test_invalid_file_paths_are_refused_naming_the_field(path: str, problem: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        artifact_paths.file_path(path)
    err = info.value
    assert problem in err.message
    assert err.field == "path" and err.metadata["field"] == "path"
    assert err.reason == "INVALID_ARTIFACT_PATH"


def test_the_field_name_is_the_callers() -> None:
    with pytest.raises(InvalidArgument) as info:
        artifact_paths.file_path("../x", field="artifact_path")
    assert info.value.field == "artifact_path" and "artifact_path" in info.value.message


@pytest.mark.parametrize(
    ("given", "directory"),
    [("", ""), ("adapter", "adapter"), ("adapter/", "adapter"), ("a/b/", "a/b"), ("a/b", "a/b")],
)
def test_directories_drop_one_trailing_slash_and_empty_is_the_root(given: str, directory: str) -> None:
    assert artifact_paths.directory_path(given) == directory


@pytest.mark.parametrize("given", ["/", "a//", "../a", "/a/", "a\\b/"])
def test_invalid_directories_are_refused(given: str) -> None:
    with pytest.raises(InvalidArgument):
        artifact_paths.directory_path(given)


@pytest.mark.parametrize("given", ["", "adapter", "adapter/", "ada", "a/b/c"])
def test_prefixes_may_end_inside_a_segment(given: str) -> None:
    assert artifact_paths.prefix(given) == given


@pytest.mark.parametrize("given", ["/abs", "a\x00", "a\\b", "x" * 1025])
def test_invalid_prefixes_are_refused_naming_prefix(given: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        artifact_paths.prefix(given)
    assert info.value.field == "prefix"


@pytest.mark.parametrize(
    ("given", "ok"),
    [
        ("0" * 64, True),
        ("ABCDEF" + "0" * 58, True),
        ("0" * 63, False),
        ("0" * 65, False),
        ("g" * 64, False),
        ("", False),
    ],
)
def test_sha256_digests_are_64_hex_characters_lowercased(given: str, ok: bool) -> None:
    if ok:
        assert artifact_paths.sha256_hex(given) == given.lower()
    else:
        with pytest.raises(InvalidArgument) as info:
            artifact_paths.sha256_hex(given)
        assert info.value.field == "sha256"


@pytest.mark.parametrize(
    ("path", "parents"),
    [("a", []), ("a/b", ["a"]), ("a/b/c.bin", ["a", "a/b"])],
)
def test_ancestors_are_the_directories_above_a_file(path: str, parents: list[str]) -> None:
    assert artifact_paths.ancestors(path) == parents


@pytest.mark.parametrize(
    ("path", "directory", "rel"),
    [("a/b/c", "a", "b/c"), ("a/b/c", "a/b", "c"), ("a/b", "", "a/b")],
)
def test_relative_paths_within_a_directory(path: str, directory: str, rel: str) -> None:
    assert artifact_paths.relative(path, directory) == rel
