#!/usr/bin/env bash
# Sandrun's main flows with curl and jq. Run it against a server:
#   SANDRUN_URL=http://127.0.0.1:8443 bash examples/curl_examples.sh
set -euo pipefail
url=${SANDRUN_URL:-http://127.0.0.1:8443}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== What the server offers"
curl -sf "$url/" | jq '{version, interpreters, limits}'

echo "== A snippet, answered when it ends (?wait holds the answer up to 60 s)"
curl -sf -H 'Content-Type: application/json' \
     -d '{"code": "print(6 * 7)", "interpreter": "python3"}' \
     "$url/submit?wait=30" | jq '{job_id, status, exit_code, execution_metadata}'

echo "== A project as an archive, with arguments and an output file"
mkdir "$work/project"
printf 'import sys\nopen("result.txt", "w").write(" ".join(sys.argv[1:]))\nprint("wrote result.txt")\n' > "$work/project/main.py"
tar czf "$work/project.tar.gz" -C "$work/project" .
job=$(curl -sf -F "files=@$work/project.tar.gz" \
           -F 'manifest={"entrypoint": "main.py", "args": ["hello", "sandrun"], "outputs": ["*.txt"]}' \
           "$url/submit" | jq -r .job_id)
echo "submitted $job"

echo "== Its status, long-polled until it ends"
curl -sf "$url/status/$job?wait=30" | jq '{status, reason, exit_code}'

echo "== Its output, and its files"
curl -sf "$url/logs/$job" | jq -r .stdout
curl -sf "$url/outputs/$job" | jq -r '.files[] | "\(.name) \(.size) bytes \(.sha256)"'
curl -sf -o "$work/result.txt" "$url/download/$job/result.txt"
echo "result.txt says: $(cat "$work/result.txt")"

echo "== Live output as Server-Sent Events"
job=$(curl -sf -H 'Content-Type: application/json' \
           -d '{"code": "import time\nfor i in range(3):\n    print(i, flush=True); time.sleep(0.3)", "interpreter": "python3"}' \
           "$url/submit" | jq -r .job_id)
curl -sfN "$url/logs/$job?follow=1" | grep '^event: \|^data: [0-9]'

echo "== Errors are JSON with error and details"
curl -s -H 'Content-Type: application/json' -d '{"code": "x", "interpreter": "cobol"}' "$url/submit" | jq '{error, details}'

echo "== Quota, then delete a job"
curl -sf "$url/stats" | jq .your_quota
curl -sf -X DELETE -o /dev/null -w 'DELETE: %{http_code}\n' "$url/jobs/$job"
