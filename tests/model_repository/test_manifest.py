"""The weights manifest at serve start: random weights and an untrained head are said loudly."""

from __future__ import annotations

import pytest

from postsim.model_repository.manifest import WeightsManifest, log_weights


@pytest.mark.parametrize(
    ("head", "warned"),
    [({"seeded": 0}, True), (None, True), ({"checkpoint": "/h/head.pt", "sha256": "ab" * 32}, False)],
    ids=["seeded", "manifest-before-head-entries", "trained"],
)
def test_serve_warns_loudly_of_an_untrained_head_and_says_how_to_train_one(
    head: dict[str, object] | None, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    provenance: dict[str, object] = {"fuser": {"weights": "checkpoint:/h/head.pt" if not warned else "seeded:0"}}
    if head is not None:
        provenance["head"] = head
    manifest = WeightsManifest(target="embedded", dim=8, precision="fp32", random_weights=False, provenance=provenance)
    with caplog.at_level("WARNING", logger="postsim"):
        log_weights(manifest)
    warnings = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert bool(warnings) is warned
    if warned:
        assert "SERVING AN UNTRAINED HEAD" in warnings[0] and "postsim train CORPUS --out DIR" in warnings[0]
        assert "--head DIR/head.pt" in warnings[0]
