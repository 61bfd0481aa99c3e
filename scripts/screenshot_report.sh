#!/bin/sh
# Render a run's report.html in headless Chromium and save a PNG, to check it looks right
# without a network (the page is self-contained: inline CSS and SVG, no script, no CDN).
#
#   scripts/screenshot_report.sh RUN_DIR [OUT.png] [WIDTHxHEIGHT]
#
# Needs Debian's chromium (apt-get install -y chromium). Every background network feature
# is switched off; a throwaway profile directory is used and removed.
set -eu
run_dir=${1:?usage: $0 RUN_DIR [OUT.png] [WIDTHxHEIGHT]}
out=${2:-$run_dir/report.png}
size=${3:-1280x2400}
browser=$(command -v chromium || command -v chromium-browser || true)
[ -n "$browser" ] || { echo "chromium not found (apt-get install -y chromium)" >&2; exit 3; }
[ -f "$run_dir/report.html" ] || { echo "$run_dir/report.html does not exist" >&2; exit 2; }
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
"$browser" --headless --no-sandbox --disable-gpu --disable-background-networking \
  --disable-component-update --disable-sync --no-first-run --disable-extensions \
  --user-data-dir="$profile" --hide-scrollbars --window-size="$(echo "$size" | tr x ,)" \
  --screenshot="$(realpath -m "$out")" "file://$(realpath "$run_dir/report.html")" >/dev/null 2>&1
[ -s "$out" ] || { echo "no screenshot written" >&2; exit 1; }
echo "$out"
