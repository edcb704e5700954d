#!/bin/sh
# Init container of the postsim Deployment: puts the image's exported model repository on the
# shared volume that every replica serves, once.
#
# Every replica serves the same folder, so that an index published there (a new version of
# `retrieval`) is on disk for all of them, and a replica that starts later loads it too.
# The first pod to start copies the image's repository into a staging folder on the volume
# and renames it into place: a rename is atomic, so replicas starting together never see a
# half-copied repository, and only one copy wins.
#
# A volume that already holds a repository is kept only if it is this image's export
# (the same weights.json, which names the weights fingerprint and the repository id). An
# image with another export would serve models that its indexes were not built with, and
# postsim refuses a repository exported by another version: the pod then stops here, with
# the reason, and the replicas already running keep serving (the rollout waits).
set -eu

image_repository="${POSTSIM_IMAGE_REPOSITORY:-/models}"
shared_repository="${POSTSIM_SHARED_REPOSITORY:-/shared/model_repository}"
manifest=weights.json

if [ ! -f "${image_repository}/${manifest}" ]; then
    echo "postsim: ${image_repository} has no ${manifest}: this image holds no exported repository" >&2
    exit 1
fi

same_export() {
    cmp -s "${image_repository}/${manifest}" "${shared_repository}/${manifest}"
}

if [ ! -e "${shared_repository}" ]; then
    staging="$(mktemp -d "$(dirname "${shared_repository}")/.seed-XXXXXX")"
    cp -R "${image_repository}/." "${staging}/"
    chmod 0755 "${staging}"
    if mv -T "${staging}" "${shared_repository}" 2>/dev/null; then
        echo "postsim: seeded ${shared_repository} from the image" >&2
        exit 0
    fi
    # Another replica renamed its copy into place first.
    rm -rf "${staging}"
fi

if [ ! -f "${shared_repository}/${manifest}" ]; then
    echo "postsim: ${shared_repository} exists but holds no ${manifest}; it is not a repository this" \
        "Deployment seeded. Empty the volume or give the Deployment another claim." >&2
    exit 1
fi
if ! same_export; then
    echo "postsim: the volume holds another export than this image (${shared_repository}/${manifest}" \
        "differs from the image's). Indexes built for one export cannot serve the other: deploy a new" \
        "image with a new claim (docker/README.md, \"A new export\"), publish its index there, then" \
        "switch clients over." >&2
    exit 1
fi
echo "postsim: ${shared_repository} holds this image's export" >&2
