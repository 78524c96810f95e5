#!/usr/bin/env bash
# Submit an influcoder job to a running Ray cluster; prints the exact command, then runs it.
#
#   jobs/submit.sh [--dry-run] [--no-wait] JOB.yaml [influcoder run options, e.g. --to fit --set k=v]
#
# Environment:
#   RAY_ADDRESS        the cluster's dashboard/jobs API (default http://127.0.0.1:8265: a local
#                      `ray start --head`, or the tunnel that `ray dashboard cluster.yaml` opens).
#   RAY_AUTH_MODE      must be `token` for clusters with token auth (the default in Ray 2.60); the token
#                      is read from ~/.ray/auth_token (or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN).
#   INFLUCODER_PYTHON  the Python that runs the entrypoint ON THE CLUSTER'S HEAD NODE. Default: this
#                      checkout's venv (right for a cluster started on this machine). For cluster.yaml
#                      use /home/ubuntu/influcoder/.venv/bin/python. An absolute venv path is used, not
#                      `python`, because the entrypoint inherits the PATH of the process that ran
#                      `ray start`, which may not have the venv (STACK.md pitfall 4).
#
# The working directory (this repository) is uploaded to the cluster; .gitignore'd paths and the
# excludes below (venv, runs, data, .git) are not, so the upload stays well under a megabyte.
# Job YAML paths must be readable from the cluster: URIs (s3://, gs://) or paths on shared storage.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dry_run=0
wait_flag=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --no-wait) wait_flag=(--no-wait); shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [[ $# -lt 1 ]]; then
  echo "usage: jobs/submit.sh [--dry-run] [--no-wait] JOB.yaml [influcoder run options]" >&2
  exit 2
fi
job="$1"; shift
if [[ ! -f "$repo/$job" && ! -f "$job" ]]; then
  echo "jobs/submit.sh: job file $job does not exist (give a path relative to the repository root)" >&2
  exit 2
fi

address="${RAY_ADDRESS:-http://127.0.0.1:8265}"
python="${INFLUCODER_PYTHON:-$repo/.venv/bin/python}"
if [[ "${RAY_AUTH_MODE:-}" != "token" ]]; then
  echo "jobs/submit.sh: note: RAY_AUTH_MODE is not 'token'; a cluster with token auth will refuse the" \
       "submission (export RAY_AUTH_MODE=token)." >&2
fi
runtime_env='{"excludes": [".git", ".venv", "runs", "data", "bench/out", ".pytest_cache", "*.egg-info"]}'

cmd=(ray job submit --address "$address" --working-dir . "${wait_flag[@]}"
     --runtime-env-json "$runtime_env"
     -- "$python" -m pipeline.cli run "$job" "$@")
quote() {  # readable shell quoting: bare words stay bare, anything else gets single quotes
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@+,-]+$ ]]; then printf '%s' "$1"; else printf "'%s'" "${1//\'/\'\\\'\'}"; fi
}
line=""
for w in "${cmd[@]}"; do line+="$(quote "$w") "; done
echo "${line% }"
if [[ $dry_run -eq 1 ]]; then
  exit 0
fi
cd "$repo"
ray_bin="ray"
command -v ray >/dev/null 2>&1 || ray_bin="$repo/.venv/bin/ray"
cmd[0]="$ray_bin"
exec "${cmd[@]}"
