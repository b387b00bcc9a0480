"""Statuses built from refusals fit gRPC's trailer limit without garbling what fits: the message is clipped by its
UTF-8 size, the metadata only when all of it together is over its budget, the longest values first."""

from __future__ import annotations

from runledger_server.transport.errors import MAX_METADATA_BYTES, fit_metadata


def _size(metadata: dict[str, str]) -> int:
    return sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())


def test_metadata_that_fits_is_left_whole() -> None:
    suites = ",".join(f"suite-{i:03d}@" + "f" * 240 for i in range(10))  # ten named suites: ~2.5 KB
    metadata = {"suiteFingerprints": suites, "suiteCount": "14", "metric": "accuracy"}
    assert fit_metadata(metadata, MAX_METADATA_BYTES) == metadata


def test_metadata_over_its_budget_clips_the_longest_values_and_keeps_the_short_ones() -> None:
    metadata = {"field": "path", "conflictingPath": "d/" * 2_000, "key": "k" * 5_000, "runId": "r1"}
    fitted = fit_metadata(metadata, MAX_METADATA_BYTES)
    assert list(fitted) == list(metadata) and _size(fitted) <= MAX_METADATA_BYTES
    assert fitted["field"] == "path" and fitted["runId"] == "r1"
    assert fitted["key"].endswith("(5000 characters in all)") and fitted["conflictingPath"].startswith("d/d/")


def test_a_download_chunk_serialized_by_hand_is_the_message_protobuf_would_write() -> None:
    from runledger.v1 import artifact_service_pb2
    from runledger_server.transport.artifact_servicer import _chunk_message

    for size in (1, 127, 128, 16_383, 16_384, 1 << 20):
        chunk = bytes(range(256)) * (size // 256) + bytes(size % 256)
        written = _chunk_message(chunk)
        assert written == artifact_service_pb2.DownloadArtifactResponse(chunk=chunk).SerializeToString()
        assert artifact_service_pb2.DownloadArtifactResponse.FromString(written).chunk == chunk
