#!/usr/bin/env bash
# GPU check of #11, for a lent GPU machine with no network and no torchwarm install:
#   bash bench/gpu.sh [bench/gpu.py options]      (default: --device cuda)
# 1. installs the wheels carried in .whl/ (zstandard) into a temp site folder;
# 2. makes `import torchwarm` work from this checkout (a symlink torchwarm -> agent);
# 3. runs bench/gpu.py unbuffered; the table and the log go to $OUT when set.
# Only the local-folder store is used: boto3, tenacity, cryptography and the GCS client
# are not needed.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
site=$(mktemp -d /tmp/torchwarm-site-XXXXXX)
if compgen -G "$repo/.whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --target "$site" "$repo"/.whl/*.whl \
        || echo "gpu.sh: could not install the carried wheels; going on with what is installed"
fi
ln -s "$repo/agent" "$site/torchwarm"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
out=${OUT:-$repo/.torchwarm/gpu}
mkdir -p "$out"
cd "$repo"
"$py" bench/gpu.py --out "$out" "$@" 2>&1 | tee "$out/gpu.log"
rc=${PIPESTATUS[0]}
rm -rf "$site"
exit "$rc"
