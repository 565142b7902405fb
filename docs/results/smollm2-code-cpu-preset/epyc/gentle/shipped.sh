#!/usr/bin/env bash
# The shipped adapter and the base under the same bench as the runs beside this script (human-setup.sh's
# `bench`: msn's default decoder cold, `ar` in the same run, held-out questions and the user's requests),
# so that their repeated-lines share (msn bench's `repeated_lines`) sits in the page's tables measured
# the same way. Skipped where written.
#   bash shipped.sh WORK   (WORK: gentle.sh's scratch folder; run from the repository root)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
W=${1:?usage: bash shipped.sh WORK}
source "$HERE/../human-setup.sh"
bench "$SHIPPED" shipped
bench "$MODEL" base
