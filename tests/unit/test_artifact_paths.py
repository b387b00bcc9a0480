"""Which artifact paths, directories, prefixes and digests a run may use, and why the others are refused; the
client's copy of the path rule agrees with the server's, and its download side stays below the destination."""

from __future__ import annotations

import os
import random
import unicodedata
from pathlib import Path

import pytest

from runledger import artifact_paths as client_paths, errors as client_errors
from runledger_server.domain import artifact_paths
from runledger_server.domain.errors import InvalidArgument

NFC = unicodedata.normalize("NFC", "café.bin")
NFD = unicodedata.normalize("NFD", "café.bin")

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
    f"d/{NFC}",
    "한국어/모델.bin",  # precomposed Hangul is NFC
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
    ("x" * 1025, "longer than 1024 bytes"),
    ("/".join(["模" * 63] * 6), "longer than 1024 bytes"),  # 383 characters, 1,139 bytes: too long an index key
    ("a/" + "y" * 256, "segment longer than 255 bytes"),
    ("é" * 128, "segment longer than 255 bytes"),  # 256 bytes in UTF-8
    (NFD, "not in Unicode NFC form"),
    (f"d/{NFD}", "not in Unicode NFC form"),
    ("\u1112\u1161\u11ab.bin", "not in Unicode NFC form"),  # Hangul as conjoining jamo
    ("\u212b", "not in Unicode NFC form"),  # U+212B ANGSTROM SIGN: NFC is U+00C5
    ("a\udcff.bin", "not valid Unicode"),  # a non-UTF-8 local file name, as Python decodes it
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


@pytest.mark.parametrize("given", ["/", "a//", "../a", "/a/", "a\\b/", f"{NFD}/"])
def test_invalid_directories_are_refused(given: str) -> None:
    with pytest.raises(InvalidArgument):
        artifact_paths.directory_path(given)


@pytest.mark.parametrize("given", ["", "adapter", "adapter/", "ada", "a/b/c"])
def test_prefixes_may_end_inside_a_segment(given: str) -> None:
    assert artifact_paths.prefix(given) == given


@pytest.mark.parametrize("given", ["/abs", "a\x00", "a\\b", "x" * 1025, NFD, f"d/{NFD[:5]}"])
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


# ---- the client's copy of the rule ---------------------------------------------------------------------
def _server_problem(path: str) -> str | None:
    try:
        artifact_paths.file_path(path)
    except InvalidArgument as exc:
        return exc.message
    return None


def _client_problem(path: str) -> str | None:
    try:
        client_paths.check_path(path)
    except client_errors.InvalidArgument as exc:
        assert exc.reason == "INVALID_ARTIFACT_PATH" and exc.metadata["field"] == "path"
        return exc.message
    return None


@pytest.mark.parametrize("path", VALID + [path for path, _ in INVALID])
def test_the_client_refuses_exactly_what_the_server_refuses_with_the_same_words(path: str) -> None:
    assert _client_problem(path) == _server_problem(path)


def test_the_client_and_server_rules_agree_on_random_paths() -> None:
    alphabet = ["a", "B", "/", ".", "\\", "\x00", "\n", "é", "e\u0301", "\u212b", "文", "\udcff", "x" * 120]
    rng = random.Random(7)
    for _ in range(5000):
        path = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12)))
        assert _client_problem(path) == _server_problem(path), repr(path)


def test_the_clients_limits_are_the_servers() -> None:
    assert (client_paths.MAX_PATH_BYTES, client_paths.MAX_SEGMENT_BYTES, client_paths.INVALID_PATH) == (
        artifact_paths.MAX_PATH_BYTES,
        artifact_paths.MAX_SEGMENT_BYTES,
        artifact_paths.INVALID_PATH,
    )


# ---- where a download may write ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "listed",
    ["../escape", "a/../../escape", "..", "/etc/passwd", "a\\..\\..\\escape", "", "a//b", "a/", "./a", NFD, "a\x00"],
)
def test_a_listed_path_that_could_leave_the_destination_is_refused(tmp_path: Path, listed: str) -> None:
    with pytest.raises(client_errors.FailedPrecondition) as info:
        client_paths.local_target(tmp_path / "out", listed)
    assert info.value.reason == "UNSAFE_ARTIFACT_PATH" and info.value.metadata["path"] == listed
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("listed", ["a.bin", "a/b/c.bin", "..dots/x", "a/...", NFC, "m" * 255])
def test_a_valid_listed_path_lands_at_its_names_below_the_destination(tmp_path: Path, listed: str) -> None:
    target = client_paths.local_target(tmp_path / "out", listed)
    assert target == (tmp_path / "out").joinpath(*listed.split("/"))
    assert os.path.commonpath([target, tmp_path / "out"]) == str(tmp_path / "out")


@pytest.mark.parametrize(
    ("paths", "clashes"),
    [
        (["Model.bin", "model.bin"], [("Model.bin", "model.bin")]),
        (["d/Model.bin", "d/sub/x", "d/MODEL.BIN"], [("d/Model.bin", "d/MODEL.BIN")]),
        (["Cfg", "cfg/x"], [("Cfg", "cfg")]),  # a file and another file's directory
        (["A/x", "a/y"], []),  # directories that differ in case just merge
        (["A/x", "a/x"], [("A/x", "a/x")]),
        (["É.bin", "é.bin"], [("É.bin", "é.bin")]),
        ([NFC, NFD], [(NFC, NFD)]),
        (["a.bin", "b.bin", "a/b"], []),
    ],
)
def test_paths_that_collide_ignoring_case_or_normalisation(paths: list[str], clashes: list[tuple[str, str]]) -> None:
    assert client_paths.colliding_paths(paths) == clashes


# ---- partial files -------------------------------------------------------------------------------------
def test_a_short_name_is_downloaded_next_to_itself_as_a_hidden_partial_file(tmp_path: Path) -> None:
    assert client_paths.partial_path(tmp_path / "big.bin") == tmp_path / ".big.bin.runledger-part"
    name = "n" * 239  # "." + name + ".runledger-part" is 255 bytes
    assert client_paths.partial_path(tmp_path / name) == tmp_path / f".{name}.runledger-part"
    # A user's own `big.bin.part` is not the download's: nothing named like that is resumed or removed.
    assert client_paths.partial_path(tmp_path / "big.bin") != tmp_path / "big.bin.part"


@pytest.mark.parametrize("name", ["m" * 240, "m" * 255, "模" * 85, "é" * 127, "é" * 126 + "x"])
def test_a_long_name_gets_a_short_stable_partial_name(tmp_path: Path, name: str) -> None:
    partial = client_paths.partial_path(tmp_path / name)
    assert partial.parent == tmp_path and partial.name.endswith(".runledger-part") and partial.name.startswith(".")
    assert len(os.fsencode(partial.name)) <= 80
    assert client_paths.partial_path(tmp_path / name) == partial  # the same target resumes the same file
    assert client_paths.partial_path(tmp_path / (name[:-1] + "z")) != partial


def test_c1_control_characters_are_refused_in_new_paths_and_read_in_stored_ones() -> None:
    assert artifact_paths.file_path("a\x85b") == "a\x85b"  # stored before the rule: still addressable
    for path in ("a\x85b", "a\x80", "\x9fz"):
        with pytest.raises(InvalidArgument, match="control character"):
            artifact_paths.file_path(path, incoming=True)
        with pytest.raises(client_errors.InvalidArgument, match="control character"):
            client_paths.check_upload_plan(Path("root"), [(Path("root/x"), path)])


def test_an_upload_plan_with_a_file_above_another_file_is_refused() -> None:
    plan = [(Path("r/a"), "m/a"), (Path("r/b"), "m/a/b")]
    with pytest.raises(client_errors.InvalidArgument, match="also a file") as info:
        client_paths.check_upload_plan(Path("r"), plan)
    assert info.value.metadata["field"] == "path"
    client_paths.check_upload_plan(Path("r"), [(Path("r/a"), "m/ab"), (Path("r/b"), "m/a/b")])  # a prefix only


def test_a_set_whose_file_is_another_ones_partial_download_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "x"
    client_paths.refuse_own_names([target, tmp_path / "y"])
    for own in (client_paths.partial_path(target), client_paths.partial_path(target, client_paths.LOCK_SUFFIX)):
        with pytest.raises(client_errors.FailedPrecondition) as info:
            client_paths.refuse_own_names([target, own])
        assert info.value.reason == "ARTIFACT_PATHS_COLLIDE"
