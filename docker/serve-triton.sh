#!/bin/sh
# Entry point of the GPU image: `postsim serve` on the NGC image's own Triton
# (/opt/tritonserver, a release with the request-cancellation fixes, see docker/README.md)
# instead of the nvidia-pytriton wheel's. So the GPU image runs what the CPU image runs:
# postsim's front end on the public ports (TLS on gRPC, HTTP and metrics when given a
# certificate; the admin key; UNAVAILABLE while Triton starts, restarts or stops),
# tritonserver on a private unix socket and loopback behind it, restarted if it dies.
#
#   postsim serve --triton-dir /opt/tritonserver --repository R \
#       --grpc-port=8001 --http-port=8000 --metrics-port=8002 --health-address=127.0.0.1:8003
#
# postsim serve gives tritonserver the flags it always does: explicit model control (so
# `postsim index publish` loads new `retrieval` versions), one --load-model per model that
# postsim.model_repository.layout.loadable_models finds complete (before the first index,
# neither `retrieval` nor `similar_posts`), --strict-readiness, a 30 s exit timeout.
#
# Arguments are appended: `postsim serve` options (--tls-cert ... --tls-ca ...) go after
# the image name or in the compose `command:`. POSTSIM_ADMIN_KEY reaches postsim serve
# through the environment, never a command line (which every local user can read).
set -eu

# Fixed ports: EXPOSE, the HEALTHCHECK and the Prometheus target use them; remap them on
# the host side (-p 18001:8001) instead. 8003 answers /v2/health/* only, in plaintext, on
# the container's loopback: the HEALTHCHECK's, whether the public ports speak TLS or not.
repository="${POSTSIM_REPOSITORY:-/models}"
# Shared memory each Python-backend model instance starts with (ServerSettings default).
python_shm_bytes="${POSTSIM_PYTHON_SHM_BYTES:-16777216}"

models="$(python3 -c '
import sys
from pathlib import Path
from postsim.model_repository.layout import loadable_models
print(" ".join(loadable_models(Path(sys.argv[1]))))
' "${repository}")"
if [ -z "${models}" ]; then
    echo "postsim: no loadable model in ${repository}: run \`postsim export --target triton\`" >&2
    exit 1
fi

echo "postsim: serving ${models} from ${repository}" >&2
exec postsim serve \
    --triton-dir=/opt/tritonserver \
    --repository="${repository}" \
    --http-port=8000 \
    --grpc-port=8001 \
    --metrics-port=8002 \
    --health-address=127.0.0.1:8003 \
    --shm-default-bytes="${python_shm_bytes}" \
    --log-file=/tmp/tritonserver.log \
    "$@"
