#!/bin/sh
# Entry point of the GPU image: the NGC image's tritonserver, started with the flags that
# `postsim serve` gives the tritonserver of the nvidia-pytriton wheel
# (postsim.model_repository.server.TritonServer.command). `postsim serve` itself cannot
# run here: it launches the wheel's binary, not /opt/tritonserver. So
#
#   postsim serve --repository R --http-port 8000 --grpc-port 8001 --metrics-port 8002
#
# is, in this image,
#
#   tritonserver --model-repository=R --model-control-mode=explicit \
#       --load-model=M1 --load-model=M2 ... \
#       --http-port=8000 --grpc-port=8001 --metrics-port=8002 ...
#
# Explicit model control is what lets `postsim index publish` load a new version of
# `retrieval` over gRPC while the server runs. The models are named one by one, as
# `postsim serve` does, rather than with --load-model=*: before the first index is
# published `retrieval` has no version, `*` would try to load it and `similar_posts`,
# fail, and --exit-on-error would stop the server. postsim's own loadable_models() decides.
#
# Arguments are appended: TLS flags (--grpc-use-ssl=true --grpc-server-cert=...) go after
# the image name or in the compose `command:`.
set -eu

# Fixed ports: EXPOSE, the HEALTHCHECK and the Prometheus target use them; remap them on
# the host side (-p 18001:8001) instead.
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

set -- \
    --model-repository="${repository}" \
    --model-control-mode=explicit \
    --http-port=8000 \
    --grpc-port=8001 \
    --metrics-port=8002 \
    --exit-timeout-secs=30 \
    --backend-config=python,shm-default-byte-size="${python_shm_bytes}" \
    --strict-readiness=true \
    --log-verbose=0 \
    "$@"
for model in ${models}; do
    set -- "$@" --load-model="${model}"
done

# As `postsim serve --admin-key` (same variable, same header): model control and shared
# memory then need the `postsim-admin-key` header. Unset or empty: unrestricted.
if [ -n "${POSTSIM_ADMIN_KEY:-}" ]; then
    restricted="model-repository,shared-memory:postsim-admin-key=${POSTSIM_ADMIN_KEY}"
    set -- "$@" --grpc-restricted-protocol="${restricted}" --http-restricted-api="${restricted}"
fi

echo "postsim: serving ${models} from ${repository}" >&2
exec tritonserver "$@"
