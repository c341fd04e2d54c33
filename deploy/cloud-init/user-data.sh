#!/bin/bash
# torchwarm node boot, as cloud-init user data (EC2 launch template, GCE instance
# template): paste this file as the user data. cloud-init runs it once, as root, at the
# end of first boot; its output goes to /var/log/cloud-init-output.log.
#
# The machine image already holds the app in a virtualenv (APP_VENV) and its systemd
# unit (APP_UNIT, installed, not enabled). This script:
#   1. writes the torchwarm config and the compile environment shared with the app;
#   2. installs torchwarm into the app's virtualenv, keeping the app's torch as it is
#      (the fingerprint is read from the app's own torch, Python and include paths);
#   3. pulls the verified cache with a deadline, fail-open: whatever happens, the app
#      starts, warm if the pull installed a cache, cold otherwise;
#   4. points the app at the cache (systemd drop-in) and starts it.
# Credentials: the instance profile (EC2) or the VM's service account (GCE), never here.
set -euo pipefail

# ---- settings ------------------------------------------------------------------
APP_VENV=${APP_VENV:-/opt/example-app/venv}       # the app's Python environment
APP_USER=${APP_USER:-example-app}                 # the user the app runs as
APP_UNIT=${APP_UNIT:-example-app.service}         # the app's systemd unit
TORCHWARM_VERSION=${TORCHWARM_VERSION:-0.1.0}
STORE=${STORE:-s3://example-torchwarm-cache/example-app}
DEADLINE_S=${DEADLINE_S:-120}                     # the whole pull; then start cold
PULL_GRACE_S=${PULL_GRACE_S:-60}                  # backstop on top, if the agent cannot run
CACHE_ROOT=${CACHE_ROOT:-/var/cache/torchwarm}    # a plain folder; cache_dir lives inside
ETC=${ETC:-/etc}
# ----------------------------------------------------------------------------------

CACHE_DIR="$CACHE_ROOT/inductor"    # the app's TORCHINDUCTOR_CACHE_DIR; not a mount point
CONFIG="$ETC/torchwarm/config.yaml"
COMPILE_ENV="$ETC/example-app/compile.env"
DROPIN_DIR="$ETC/systemd/system/$APP_UNIT.d"

log() { echo "torchwarm-boot: $*" >&2; }

# 1. Config and compile environment (written first: the pull needs both).
mkdir -p "$ETC/torchwarm" "$ETC/example-app" "$DROPIN_DIR"
cat > "$CONFIG" <<YAML
store: $STORE
cache_dir: $CACHE_DIR
format: cachedir
deadline_s: $DEADLINE_S
workloads:
  - name: mlp                       # replace with the app's own model factory
    model: torchwarm.models:mlp
    model_kwargs: {d_in: 64, hidden: 256, d_out: 64}
    inputs:
      - [{shape: [4, 64], dtype: float32, dynamic: [0]}]
      - [{shape: [1, 64], dtype: float32}]
YAML
if [ ! -e "$COMPILE_ENV" ]; then
  # Part of the fingerprint: the pull and the app must see the same values.
  printf '%s\n' 'OMP_NUM_THREADS=4' > "$COMPILE_ENV"
fi
mkdir -p "$CACHE_ROOT"
chown "$APP_USER:" "$CACHE_ROOT"

# 2. torchwarm in the app's virtualenv, pinned to the torch that is already there.
pulled=no
if torch_version=$("$APP_VENV/bin/python" -c 'import torch; print(torch.__version__)') \
  && "$APP_VENV/bin/python" -m pip install --quiet --no-cache-dir \
       "torchwarm==$TORCHWARM_VERSION" "torch==$torch_version"; then
  # 3. The pull, as the app's user (it must own the cache), with the app's compile env.
  set -a
  # shellcheck source=/dev/null
  . "$COMPILE_ENV"
  set +a
  rc=0
  timeout --kill-after=10 "$((DEADLINE_S + PULL_GRACE_S))" \
    runuser -u "$APP_USER" -- "$APP_VENV/bin/torchwarm" pull -c "$CONFIG" \
      --deadline "$DEADLINE_S" || rc=$?
  if [ "$rc" -eq 0 ]; then
    pulled=yes
  else
    log "pull exited $rc; starting cold"
  fi
else
  log "could not install torchwarm $TORCHWARM_VERSION into $APP_VENV; starting cold"
fi

# 4. The app: same cache dir and compile env; TRITON_CACHE_DIR unset (Triton's cache
# lives inside the cache dir and travels with it).
cat > "$DROPIN_DIR/torchwarm.conf" <<UNIT
[Service]
EnvironmentFile=$COMPILE_ENV
Environment=TORCHINDUCTOR_CACHE_DIR=$CACHE_DIR
UnsetEnvironment=TRITON_CACHE_DIR
UNIT
systemctl daemon-reload
systemctl enable --now "$APP_UNIT"
log "started $APP_UNIT (pull completed: $pulled; the ready marker $CACHE_ROOT/torchwarm-ready.json says warm or cold)"
