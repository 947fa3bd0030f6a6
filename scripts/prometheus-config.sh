#!/usr/bin/env bash
# Writes SECRETS/prometheus.yml, the configuration of the demo's Prometheus
# (compose `metrics` profile), from deploy/prometheus/prometheus.yml with the
# observer's token (SECRETS/tokens/observer.token, from `registry init`) in
# place of @OBSERVER_TOKEN@. The copy holds a secret, so it is 0600 and owned
# as the token file is; it lives beside the other credentials, never in git.
#
#   scripts/prometheus-config.sh [SECRETS]     (default: $TRELLIS_SECRETS or .trellis)
set -euo pipefail
cd "$(dirname "$0")/.."

secrets=${1:-${TRELLIS_SECRETS:-.trellis}}
token_file=$secrets/tokens/observer.token
if [ ! -f "$token_file" ]; then
  echo "prometheus-config.sh: no $token_file; run scripts/demo.sh (or registry init) first" >&2
  exit 1
fi
token=$(cat "$token_file")
# init writes 64 hex characters; anything else would not survive sed.
if ! [[ "$token" =~ ^[0-9a-f]{64}$ ]]; then
  echo "prometheus-config.sh: $token_file is not a token written by registry init" >&2
  exit 1
fi
out=$secrets/prometheus.yml
tmp=$(mktemp "$secrets/.prometheus.yml.XXXXXX")
chmod 0600 "$tmp"
sed "s|@OBSERVER_TOKEN@|$token|" deploy/prometheus/prometheus.yml >"$tmp"
chown --reference="$token_file" "$tmp" 2>/dev/null || true
mv "$tmp" "$out"
echo "prometheus-config.sh: wrote $out"
